"""The master's end of one worker's IPC socketpair, driven by the asyncio loop."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable

from ._errors import ChannelClosedError, ProtocolError
from ._protocol import FrameDecoder

__all__ = ["Channel"]

_READ_SIZE = 256 * 1024


class Channel:
    """Non-blocking frame reader and writer for one worker.

    Frames are handed to *on_frames* in order. EOF, a reset and a protocol error all end
    the channel, exactly once, through *on_close* (with the error, or ``None`` for EOF).
    Writes made before the loop runs are queued and sent once :meth:`attach` is called.
    """

    def __init__(
        self,
        sock: socket.socket,
        limit: int,
        on_frames: Callable[[list[tuple[int, bytes]]], None],
        on_close: Callable[[ProtocolError | None], None],
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._decoder = FrameDecoder(limit)
        self._on_frames = on_frames
        self._on_close = on_close
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        self.closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading on *loop*, and send what was queued before."""
        if self.closed or self._loop is not None:
            return
        self._loop = loop
        loop.add_reader(self._fd, self.read)
        if self._out:
            self._flush()

    def read(self) -> None:
        """Read whatever is buffered in the socket now (the reader callback)."""
        while not self.closed:
            try:
                data = self._sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close(None)
                return
            try:
                frames = self._decoder.feed(data)
            except ProtocolError as exc:
                self.close(exc)
                return
            if frames:
                self._on_frames(frames)
            if len(data) < _READ_SIZE:
                return

    def write(self, data: bytes, fds: list[int] | None = None) -> None:
        """Queue *data* (with *fds* passed along its first byte) and send what can go now.

        Raises:
            ChannelClosedError: the channel is closed.
        """
        if self.closed:
            msg = "the IPC channel is closed"
            raise ChannelClosedError(msg)
        self._out.append((memoryview(data), fds or []))
        if len(self._out) == 1:  # nothing was waiting, so nothing is registered to send
            self._flush()

    def _flush(self) -> None:
        out = self._out
        while out:
            data, fds = out[0]
            try:
                if fds:
                    sent = socket.send_fds(self._sock, [data], fds)
                else:
                    sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # The worker is gone; its EOF is on the way and will close the channel.
                out.clear()
                return
            if sent < len(data):
                out[0] = (data[sent:], [])
                break
            out.popleft()
        want = bool(out) and self._loop is not None
        if want != self._writing and self._loop is not None:
            if want:
                self._loop.add_writer(self._fd, self._flush)
            else:
                self._loop.remove_writer(self._fd)
            self._writing = want

    def close(self, error: ProtocolError | None = None) -> None:
        """Stop reading and writing; tell the owner once."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._out.clear()
        self._sock.close()
        self._on_close(error)
