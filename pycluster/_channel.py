"""The master's end of one worker's IPC socketpair, driven by the asyncio loop."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable

from ._errors import ChannelClosedError, ProtocolError
from ._protocol import FrameDecoder

__all__ = ["Channel"]

# 64 KiB: a larger buffer is above malloc's mmap threshold and costs ~25 µs per read.
_READ_SIZE = 64 * 1024


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
                pending = self._decoder.pending
                if pending:  # the worker closed its end after part of a frame
                    msg = f"the channel ended in the middle of a frame ({pending} bytes of it)"
                    self.close(ProtocolError(msg))
                else:
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
        if not self._out and not fds:  # the common case: nothing queued, send now
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the worker is gone; its EOF is on the way and will close the channel
            if sent == len(data):
                return
            data = data[sent:]
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
        """Stop reading and writing; tell the owner once, then close the socket.

        The owner hears first so that it can SIGKILL a worker that broke the protocol
        before that worker sees EOF and leaves by itself with code 0.
        """
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._out.clear()
        try:
            self._on_close(error)
        finally:
            self._sock.close()
