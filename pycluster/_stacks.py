"""Every thread's Python stack, formatted: what a hung worker was doing when it hung."""

from __future__ import annotations

import sys
import threading
import traceback

__all__ = ["format_stacks"]


def format_stacks() -> str:
    """The current Python stack of every thread of this process, main thread first.

    The calling thread is named but its stack is left out (it is only answering). Each
    stack reads like a traceback: outermost call first, the line running now last.
    """
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    main = threading.main_thread().ident
    me = threading.get_ident()

    def order(ident: int) -> tuple[bool, str]:
        thread = threads.get(ident)
        return ident != main, thread.name if thread is not None else ""

    parts = []
    for ident in sorted(frames, key=order):
        thread = threads.get(ident)
        name = repr(thread.name) if thread is not None else "(not made by threading)"
        daemon = ", daemon" if thread is not None and thread.daemon else ""
        title = f"Thread {name} (ident {ident}{daemon})"
        if ident == me:
            parts.append(f"{title}: answering this stack request\n")
            continue
        parts.append(f"{title}, most recent call last:\n"
                     + "".join(traceback.format_stack(frames[ident])))
    return "\n".join(parts)
