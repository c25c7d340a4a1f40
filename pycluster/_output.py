"""A silent worker's stdout and stderr, read on the master's loop and cut into lines."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

__all__ = ["LONGEST_LINE", "LineBuffer", "OutputReader"]

#: Longest line of a silent worker's output kept whole; longer ones come in pieces.
LONGEST_LINE = 1024 * 1024


class LineBuffer:
    """Bytes in, whole lines out; a line that never ends is cut every *longest* bytes."""

    __slots__ = ("_buf", "_longest")

    def __init__(self, longest: int = LONGEST_LINE) -> None:
        self._buf = bytearray()
        self._longest = longest

    def feed(self, data: bytes) -> list[bytes]:
        """Add *data*; return the lines it completes (without their newline)."""
        self._buf += data
        *complete, rest = self._buf.split(b"\n")
        lines = [bytes(line) for line in complete]
        while len(rest) > self._longest:  # a line that never ends is cut, not hoarded
            lines.append(bytes(rest[: self._longest]))
            rest = rest[self._longest :]
        self._buf[:] = rest
        return lines

    def finish(self) -> list[bytes]:
        """The stream ended: what is left is a last line, if anything is."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest else []


class OutputReader:
    """Reads one pipe of a worker without blocking; calls ``on_line(text)`` per line."""

    def __init__(self, stream: IO[bytes], on_line: Callable[[str], None]) -> None:
        self._stream = stream
        self._fd = stream.fileno()
        self._lines = LineBuffer()
        self._on_line = on_line
        self._loop: asyncio.AbstractEventLoop | None = None
        os.set_blocking(self._fd, False)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read whenever the pipe has data."""
        self._loop = loop
        loop.add_reader(self._fd, self.read)

    def read(self, final: bool = False) -> None:
        """Read what the pipe holds now; at EOF (or *final*: the worker is dead) close it."""
        if self._stream.closed:
            return
        data: bytes | None = None
        lines: list[bytes] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if not data:
                break
            lines += self._lines.feed(data)
        if data == b"" or final:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._stream.close()
            lines += self._lines.finish()
        for line in lines:
            self._on_line(line.decode("utf-8", "replace"))
