"""The worker's inbox: the thread that reads the channel, and where its handlers run.

A daemon thread (``pycluster-ipc``) always has a read pending on the channel, so replies
reach a ``listen()`` blocked in the main thread. Events are dispatched on that thread,
or on an asyncio loop once the app attaches one. Messages that arrive before the app
adds its first ``message`` listener are kept, as Node delivers them after the worker's
startup code: a master may send as soon as it forks.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from ._emitter import Emitter
from ._protocol import READ_SIZE, FrameDecoder, recv_fds

__all__ = ["EARLY_LIMIT", "Dispatcher", "exit_now", "read_frames"]

#: Messages kept for a worker that has not added a ``message`` listener yet.
EARLY_LIMIT = 10_000


class Dispatcher:
    """Runs an emitter's handlers on the calling (IPC) thread, or on an attached loop."""

    def __init__(self, emitter: Emitter) -> None:
        self._emitter = emitter
        self.loop: Any = None
        self._early: list[Any] | None = []
        self._early_lock = threading.Lock()
        self._flushing = False

    def call(self, fn: Callable[[], object]) -> None:
        """Run *fn* on the attached loop, or now."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:  # closed in between
                pass
            else:
                return
        fn()

    def call_and_wait(self, fn: Callable[[], object], timeout: float) -> None:
        """Run *fn* on the attached loop and wait up to *timeout* s for it, or run it now."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.call(run)
        done.wait(timeout)

    def emit(self, event: str, *args: Any) -> None:
        """Emit *event* where handlers run (see :meth:`call`)."""
        self.call(partial(self._emitter.emit, event, *args))

    def deliver(self, message: Any) -> None:
        """Emit ``message``, or keep it while no ``message`` listener was ever added."""
        if self._early is None:  # the usual case, once a listener exists: no lock needed
            self.emit("message", message)
            return
        with self._early_lock:
            early = self._early
            if early is not None:
                if len(early) < EARLY_LIMIT:
                    early.append(message)
                return
        self.emit("message", message)

    def message_listener_added(self) -> None:
        """The app added a ``message`` listener: deliver what was kept, in order."""
        with self._early_lock:
            early = self._early
            if early is None or self._flushing:
                return
            if not early:
                self._early = None
                return
            self._flushing = True
        # Not on the caller's thread: its handler may use names defined after on().
        threading.Thread(target=self._flush_early, name="pycluster-ipc-early", daemon=True).start()

    def _flush_early(self) -> None:
        try:
            while True:
                with self._early_lock:
                    batch = self._early
                    if not batch:
                        self._early = None
                        return
                    self._early = []
                for message in batch:
                    self.emit("message", message)
        except SystemExit as exc:  # sys.exit() in a handler ends the process, as on the reader
            exit_now(exit_code(exc))


def read_frames(
    sock: socket.socket,
    limit: int,
    master_pid: int,
    on_frame: Callable[[int, bytes, collections.deque[int]], None],
) -> None:
    """Read frames from the master until EOF, handing each to *on_frame* with the fds
    received so far (a reply takes the ones it carries from the left).

    Returns at EOF, when the master is gone, or after a frame that breaks the protocol
    (raised as :class:`ProtocolError`).
    """
    decoder = FrameDecoder(limit)
    fds: collections.deque[int] = collections.deque()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    # On Linux PR_SET_PDEATHSIG backs up EOF, so a plain blocking read (one syscall a
    # message) is enough; elsewhere poll with a timeout to check the parent pid.
    flags = 0 if sys.platform.startswith("linux") else socket.MSG_DONTWAIT
    while True:
        try:
            data, got = recv_fds(sock, READ_SIZE, 16, flags)
        except (BlockingIOError, InterruptedError):
            if not poller.poll(1000) and os.getppid() != master_pid:
                return  # the master is gone, though its end of the channel is not
            continue
        except OSError:
            data, got = b"", []
        fds.extend(got)
        if not data:
            return
        for kind, payload in decoder.feed(data):
            on_frame(kind, payload, fds)


def exit_code(exc: SystemExit) -> int:
    """The process exit code ``sys.exit(code)`` asks for."""
    code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def exit_now(code: int) -> None:
    """End the process now (from any thread), flushing what Python buffered for stdio."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(code)
