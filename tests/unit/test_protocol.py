"""The IPC framing without processes: a byte stream cut anywhere decodes to the same
frames, bad headers are refused before their payload is kept, and payloads round-trip or
are refused with a ProtocolError or MessageError that says why."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pycluster
from pycluster._protocol import (
    CONTROL,
    HEADER,
    FrameDecoder,
    decode_control,
    decode_message,
    encode_control,
    encode_message,
)

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1024
#: Generated cases are checked without a deadline (the machine is shared) or a database
#: (no .hypothesis directory in the checkout).
PROPERTY = settings(deadline=None, database=None)


def kind_of(frame: bytes) -> int:
    """The kind byte in the header of *frame*."""
    kind: int = HEADER.unpack_from(frame)[1]
    return kind


JSON_KIND = kind_of(encode_message(None, "json", LIMIT))
PICKLE_KIND = kind_of(encode_message(None, "pickle", LIMIT))
KINDS = (CONTROL, JSON_KIND, PICKLE_KIND)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


# -- FrameDecoder ------------------------------------------------------------------------


@PROPERTY
@given(frames=st.lists(st.tuples(st.sampled_from(KINDS), st.binary(max_size=64)), max_size=8),
       data=st.data())
def test_any_chunking_gives_the_same_frames(frames, data):
    """Frames written back to back and fed to a decoder in chunks cut at arbitrary
    points (mid-header, mid-payload, empty chunks) come out whole, in order, exactly as
    written; after each chunk ``pending`` is the bytes of the unfinished frame."""
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    decoder = FrameDecoder(LIMIT)
    got: list[tuple[int, bytes]] = []
    fed = 0
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += decoder.feed(stream[start:end])
        fed = end
        done = sum(HEADER.size + len(p) for _, p in got)
        assert decoder.pending == fed - done
    assert got == frames
    assert decoder.pending == 0


def test_pending_counts_an_unfinished_frame_until_it_completes():
    """``pending`` is 0 on a fresh decoder, counts the bytes of a frame fed in part
    (header included), and is 0 again once the frame is complete; an empty payload is a
    frame of its own."""
    decoder = FrameDecoder(LIMIT)
    assert decoder.pending == 0
    whole = frame(JSON_KIND, b'{"a":1}')
    assert decoder.feed(whole[:3]) == []
    assert decoder.pending == 3
    assert decoder.feed(whole[3:9]) == []
    assert decoder.pending == 9
    assert decoder.feed(whole[9:] + frame(CONTROL, b"")) == [(JSON_KIND, b'{"a":1}'),
                                                             (CONTROL, b"")]
    assert decoder.pending == 0


def test_a_payload_of_exactly_the_limit_is_accepted():
    """A header announcing exactly *limit* bytes is accepted and waits for its payload."""
    decoder = FrameDecoder(LIMIT)
    assert decoder.feed(HEADER.pack(LIMIT, JSON_KIND)) == []
    assert decoder.pending == HEADER.size
    assert decoder.feed(b"x" * LIMIT) == [(JSON_KIND, b"x" * LIMIT)]


@pytest.mark.parametrize("size", [LIMIT + 1, 2**32 - 1])
def test_an_oversized_header_is_refused_before_its_payload(size):
    """A header announcing more than the limit raises ProtocolError naming the size and
    the limit as soon as its 5 bytes are in, fed one byte at a time: no payload byte is
    needed (or kept) to refuse it."""
    decoder = FrameDecoder(LIMIT)
    header = HEADER.pack(size, JSON_KIND)
    for i in range(HEADER.size - 1):
        assert decoder.feed(header[i:i + 1]) == []
    with pytest.raises(pycluster.ProtocolError,
                       match=f"frame of {size} bytes is over the {LIMIT}-byte limit"):
        decoder.feed(header[-1:])


@pytest.mark.parametrize("kind", [3, 255])
def test_an_unknown_kind_is_refused_before_its_payload(kind):
    """A header with a kind byte other than control, JSON or pickle raises ProtocolError
    naming the kind, from the header alone (the payload it announces is never fed)."""
    decoder = FrameDecoder(LIMIT)
    with pytest.raises(pycluster.ProtocolError, match=f"unknown frame kind {kind} "):
        decoder.feed(HEADER.pack(10, kind))


def test_frames_before_a_bad_header_do_not_hide_it():
    """A good frame followed by a bad header in one chunk still raises ProtocolError:
    the bad header is not skipped for the sake of the frame before it."""
    decoder = FrameDecoder(LIMIT)
    with pytest.raises(pycluster.ProtocolError, match="unknown frame kind 7"):
        decoder.feed(frame(CONTROL, b'{"act":"x"}') + HEADER.pack(1, 7))


# -- control frames ------------------------------------------------------------------------


@PROPERTY
@given(act=st.text(), fields=st.dictionaries(st.text().filter(lambda k: k != "act"),
                                             json_values, max_size=5))
def test_control_frames_round_trip(act, fields):
    """encode_control(act, **fields) makes one control frame whose header gives its
    length, and decode_control of its payload gives back the fields with ``act``."""
    encoded = encode_control(act, **fields)
    size, kind = HEADER.unpack_from(encoded)
    assert (size, kind) == (len(encoded) - HEADER.size, CONTROL)
    assert decode_control(encoded[HEADER.size:]) == {**fields, "act": act}


@pytest.mark.parametrize("payload", [b"[1]", b'"online"', b"null", b'{"id":1}',
                                     b'{"act":1}', b'{"act":null}'])
def test_a_control_frame_must_be_an_object_with_a_string_act(payload):
    """A control payload that is valid JSON but not an object with a string ``act``
    raises ProtocolError quoting the payload."""
    with pytest.raises(pycluster.ProtocolError, match="control frame without an 'act'") as info:
        decode_control(payload)
    assert repr(payload) in str(info.value)


BAD_JSON = [
    pytest.param(b'{"act":"x"} {}', "extra data after the value", id="extra-object"),
    pytest.param(b'{"act":"x"}\n', "extra data after the value", id="trailing-newline"),
    pytest.param(b"", "not a JSON value", id="empty"),
    pytest.param(b"{", "JSONDecodeError", id="unclosed-object"),
    pytest.param(b"[1,", "not a JSON value", id="unfinished-list"),
    pytest.param(b"\xff", "UnicodeDecodeError", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "RecursionError", id="too-deep"),
]


@pytest.mark.parametrize(("payload", "problem"), BAD_JSON)
def test_a_payload_that_is_not_one_json_value_is_a_protocol_error(payload, problem):
    """A control or JSON message payload with data after the value, no value, bad
    UTF-8 or nesting too deep to parse raises ProtocolError saying which, never a raw
    JSONDecodeError, UnicodeDecodeError or RecursionError."""
    for decode in (decode_control, lambda p: decode_message(JSON_KIND, p, "json")):
        with pytest.raises(pycluster.ProtocolError,
                           match=rf"a frame is not valid JSON \({problem}\): "):
            decode(payload)


# -- user messages ---------------------------------------------------------------------------


@PROPERTY
@given(message=json_values)
def test_json_messages_round_trip(message):
    """Any JSON value (no NaN or infinity) sent on a JSON channel is a JSON-kind frame
    whose payload decodes to an equal value, on a JSON or a pickle channel."""
    encoded = encode_message(message, "json", 2**20)
    assert kind_of(encoded) == JSON_KIND
    for serialization in ("json", "pickle"):
        assert decode_message(JSON_KIND, encoded[HEADER.size:], serialization) == message


@PROPERTY
@given(message=st.recursive(
    st.none() | st.integers() | st.binary() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(st.integers()),
    max_leaves=8))
def test_pickle_messages_round_trip(message):
    """On a pickle channel, values JSON cannot carry (bytes, tuples, frozensets,
    infinities) come back equal, in a pickle-kind frame."""
    encoded = encode_message(message, "pickle", 2**20)
    assert kind_of(encoded) == PICKLE_KIND
    assert decode_message(PICKLE_KIND, encoded[HEADER.size:], "pickle") == message


@pytest.mark.parametrize("serialization", ["json", "pickle"])
def test_the_message_limit_is_on_the_payload_and_inclusive(serialization):
    """A message whose payload is exactly the limit is sent; one byte more raises
    MessageError naming both sizes and the setting to raise."""
    probe = "x" * (LIMIT // 2)  # long enough for the payload's length field to be full size
    overhead = len(encode_message(probe, serialization, LIMIT)) - HEADER.size - len(probe)
    fits = "x" * (LIMIT - overhead)
    assert len(encode_message(fits, serialization, LIMIT)) == HEADER.size + LIMIT
    with pytest.raises(pycluster.MessageError,
                       match=rf"a message of {LIMIT + 1} bytes: the limit is {LIMIT} bytes "
                             r"\(raise Master\(max_message_size=\.\.\.\)"):
        encode_message(fits + "x", serialization, LIMIT)


def test_a_pickle_frame_that_does_not_unpickle_is_a_protocol_error():
    """On a pickle channel, a pickle-kind payload that is not a pickle raises
    ProtocolError saying so, not the unpickler's own exception."""
    with pytest.raises(pycluster.ProtocolError, match="a pickle frame does not unpickle"):
        decode_message(PICKLE_KIND, b"not a pickle", "pickle")


def test_pickle_is_opt_in_refused_on_json_channels_and_documented_as_trusting_workers(tmp_path):
    """Serialization defaults to JSON; a pickle frame on a JSON channel is refused as a
    ProtocolError without being unpickled (its payload would create a file); and the
    README says that pickle lets a worker run code in the master, for trusted workers
    only. (A real worker sending such a frame is in test_messages.py, mode
    'pickle-on-json'.)"""
    canary = tmp_path / "canary"

    class Canary:
        def __reduce__(self) -> Any:
            return (os.mkdir, (str(canary),))

    assert pycluster.Settings().serialization == "json"
    with pytest.raises(pycluster.ProtocolError, match="pickle frame .* serialization='json'"):
        decode_message(PICKLE_KIND, pickle.dumps(Canary()), "json")
    assert not canary.exists()
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "`serialization`" in line)
    for words in ("pickle", "run code in the master", "trust"):
        assert words in line, line


def test_recv_fds_passes_its_flags_on_and_returns_the_fds():
    """recv_fds() with MSG_DONTWAIT raises BlockingIOError on an empty socket instead of
    blocking (socket.recv_fds() before 3.12 drops its flags), and returns the message
    with the fds it carried, close-on-exec."""
    import socket

    from pycluster._protocol import recv_fds

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        with pytest.raises(BlockingIOError):
            recv_fds(b, 100, 1, socket.MSG_DONTWAIT)
        socket.send_fds(a, [b"hello"], [r])
        data, fds = recv_fds(b, 100, 1, socket.MSG_DONTWAIT)
        assert data == b"hello" and len(fds) == 1
        assert not os.get_inheritable(fds[0])
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
