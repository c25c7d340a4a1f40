"""Framing of the master↔worker IPC channel, shared by both sides.

Every frame is a 5-byte header (payload length as a big-endian uint32, then a kind byte)
followed by the payload. The kind keeps cluster control messages and user messages apart:
a user message is always of kind ``JSON`` or ``PICKLE`` and is only ever delivered as a
``message`` event, whatever it looks like. Control frames are JSON objects with an
``"act"`` key. Lengths are checked before a payload is buffered, so an oversized or
garbage frame is rejected at once instead of being read into memory.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

from ._errors import MessageError, ProtocolError

__all__ = [
    "CONTROL",
    "DEFAULT_MAX_MESSAGE",
    "READ_SIZE",
    "FrameDecoder",
    "decode_control",
    "decode_message",
    "encode_act",
    "encode_control",
    "encode_message",
]

HEADER = struct.Struct(">IB")
CONTROL = 0
JSON = 1
PICKLE = 2
_USER_KINDS = {"json": JSON, "pickle": PICKLE}

#: Largest payload accepted on a channel, in bytes, unless the settings say otherwise.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
#: Bytes asked of the socket per read, on both sides. A larger buffer is above malloc's
#: mmap threshold and costs ~25 µs per read.
READ_SIZE = 64 * 1024


def _unserializable(value: Any) -> Any:
    msg = f"Object of type {type(value).__name__} is not JSON serializable"
    raise TypeError(msg)


def _make_dumps() -> Callable[[Any], str]:
    # JSONEncoder.encode builds a new C encoder on every call; build it once. Without a
    # markers dict a circular value ends in RecursionError, which encode_message reports.
    from json import encoder

    make = getattr(encoder, "c_make_encoder", None)
    if make is None:
        plain = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
        encode: Callable[[Any], str] = plain.encode
        return encode
    c_encode = make(
        None, _unserializable, encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )
    join = "".join
    return lambda value: join(c_encode(value, 0))


_dumps = _make_dumps()
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def encode_control(act: str, **fields: Any) -> bytes:
    """Return the frame of one control message (pycluster's own fields: they serialize)."""
    fields["act"] = act
    payload: bytes = _dumps(fields).encode()
    return HEADER.pack(len(payload), CONTROL) + payload


def encode_act(act: str, limit: int, **fields: Any) -> bytes:
    """Return the frame of a control message that carries a plugin's data.

    Raises:
        MessageError: a field does not serialize as JSON, or the frame is over *limit*.
    """
    try:
        frame = encode_control(act, **fields)
    except Exception as exc:  # TypeError, ValueError, RecursionError
        msg = f"cannot send {_short(fields.get('data'))}: it does not serialize as JSON: {exc}"
        raise MessageError(msg) from exc
    if len(frame) - HEADER.size > limit:
        msg = (
            f"cannot send a message of {len(frame) - HEADER.size} bytes: the limit is "
            f"{limit} bytes (raise Master(max_message_size=...) or send less)"
        )
        raise MessageError(msg)
    return frame


def encode_message(message: Any, serialization: str, limit: int) -> bytes:
    """Return the frame of one user message.

    Raises:
        MessageError: *message* does not serialize, or its payload is over *limit* bytes.
            Nothing has been written anywhere, so the channel is unaffected.
    """
    payload: bytes
    try:
        if serialization == "json":
            payload = _dumps(message).encode()
        else:
            import pickle  # only a channel that opted in pays for it

            payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # TypeError, ValueError, PicklingError, RecursionError, ...
        msg = f"cannot send {_short(message)}: it does not serialize as {serialization}: {exc}"
        if serialization == "json":
            msg += " (send dicts, lists, strings, numbers, booleans and None)"
        raise MessageError(msg) from exc
    if len(payload) > limit:
        msg = (
            f"cannot send a message of {len(payload)} bytes: the limit is {limit} bytes "
            "(raise Master(max_message_size=...) or send less)"
        )
        raise MessageError(msg)
    return HEADER.pack(len(payload), _USER_KINDS[serialization]) + payload


def decode_control(payload: bytes) -> dict[str, Any]:
    """Parse a control payload.

    Raises:
        ProtocolError: not a JSON object with a string ``act``.
    """
    obj = _parse_json(payload)
    if not isinstance(obj, dict) or not isinstance(obj.get("act"), str):
        msg = f"control frame without an 'act': {payload[:80]!r}"
        raise ProtocolError(msg)
    return obj


def decode_message(kind: int, payload: bytes, serialization: str) -> Any:
    """Parse a user-message payload of *kind*, refusing pickle unless it was asked for.

    Raises:
        ProtocolError: the payload does not parse, or it is pickle on a JSON channel.
    """
    if kind == JSON:
        return _parse_json(payload)
    if serialization != "pickle":
        msg = "a pickle frame arrived on a channel set to serialization='json'; refused"
        raise ProtocolError(msg)
    import pickle

    try:
        return pickle.loads(payload)  # noqa: S301 - opt-in; the docs say it trusts the workers
    except Exception as exc:
        msg = f"a pickle frame does not unpickle: {exc!r}"
        raise ProtocolError(msg) from exc


def _parse_json(payload: bytes) -> Any:
    # The scanner alone: json.loads would also sniff the encoding of bytes and match
    # whitespace around the value twice, which our own encoder never writes.
    try:
        text = payload.decode()
        value, end = _scan(text, 0)
        if end == len(text):
            return value
        problem = "extra data after the value"
    except StopIteration:
        problem = "not a JSON value"
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        problem = type(exc).__name__
    msg = f"a frame is not valid JSON ({problem}): {payload[:80]!r}"
    raise ProtocolError(msg) from None


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. an int over sys.get_int_max_str_digits(), or a broken __repr__
        text = object.__repr__(value)
    return text if len(text) <= 80 else text[:77] + "..."


class FrameDecoder:
    """Splits a byte stream into ``(kind, payload)`` frames.

    Args:
        limit: the largest payload accepted; a larger length in a header is a
            :class:`ProtocolError` before any of its payload is kept.
    """

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit

    @property
    def pending(self) -> int:
        """How many bytes of an unfinished frame are buffered."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add *data* and return every frame it completes, in order.

        Raises:
            ProtocolError: a header names an unknown kind or a payload over the limit.
        """
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data  # the usual case: slice the bytes we got, no copy into a buffer
        frames: list[tuple[int, bytes]] = []
        append = frames.append
        pos = 0
        end = len(buf)
        unpack = HEADER.unpack_from
        limit = self._limit
        while end - pos >= 5:
            size, kind = unpack(buf, pos)
            if kind > PICKLE:
                msg = f"unknown frame kind {kind} (the channel carries kinds 0-2)"
                raise ProtocolError(msg)
            if size > limit:
                msg = f"frame of {size} bytes is over the {limit}-byte limit"
                raise ProtocolError(msg)
            start = pos + 5
            pos = start + size
            if pos > end:
                pos = start - 5
                break
            append((kind, bytes(buf[start:pos])))
        if buf is data:
            if pos < end:
                self._buf += data[pos:]
        elif pos:
            del self._buf[:pos]
        return frames


_FD_SIZE = array.array("i").itemsize


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds that ``SCM_RIGHTS`` ancillary data (from ``recvmsg()``) carries."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def recv_fds(sock: socket.socket, size: int, maxfds: int, flags: int = 0
             ) -> tuple[bytes, list[int]]:
    """One message and the fds it carries (close-on-exec). Unlike
    ``socket.recv_fds()`` before Python 3.12, it passes *flags* on (``MSG_DONTWAIT``)."""
    ancsize = socket.CMSG_SPACE(maxfds * _FD_SIZE)
    data, ancdata, _, _ = sock.recvmsg(size, ancsize, flags | socket.MSG_CMSG_CLOEXEC)
    return data, _received_fds(ancdata) if ancdata else []
