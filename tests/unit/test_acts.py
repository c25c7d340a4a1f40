"""Unit tests of the control-act helpers shared by both ends: pending requests, replies,
and the listen-request checks."""

from __future__ import annotations

import json
import os

import pytest

from pycluster import SettingsError
from pycluster._acts import ActError, Pending, Reply, check_listen, encode_reply
from pycluster._protocol import FrameDecoder


def decode(frame: bytes) -> dict:
    [(kind, payload)] = FrameDecoder(1 << 20).feed(frame)
    assert kind == 0
    return json.loads(payload)


def test_pending_routes_each_reply_to_its_request_once():
    """Replies reach the request with their seq, in any order; a second reply with the same
    seq, or one for an unknown seq, is ignored."""
    pending, got = Pending(), []
    first = pending.add(lambda ctl, fds: got.append(("first", ctl["v"])))
    second = pending.add(lambda ctl, fds: got.append(("second", ctl["v"])))
    assert first != second
    pending.resolve({"seq": second, "v": 2}, [])
    pending.resolve({"seq": first, "v": 1}, [])
    pending.resolve({"seq": first, "v": 3}, [])
    pending.resolve({"seq": "x", "v": 4}, [])
    assert got == [("second", 2), ("first", 1)]


def test_pending_close_fails_waiting_and_later_requests_with_none():
    """When the channel closes, every waiting request gets None at once, and so does any
    request made afterwards; a dropped (timed-out) request hears nothing."""
    pending, got = Pending(), []
    dropped = pending.add(lambda ctl, fds: got.append(("dropped", ctl)))
    pending.add(lambda ctl, fds: got.append(("waiting", ctl)))
    pending.drop(dropped)
    pending.close()
    pending.add(lambda ctl, fds: got.append(("late", ctl)))
    assert got == [("waiting", None), ("late", None)]


def test_an_unclaimed_reply_closes_the_fds_it_carried():
    """A reply nobody waits for (its request timed out) does not leak the fd it carried."""
    read, write = os.pipe()
    try:
        Pending().resolve({"seq": 7}, [read])
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(read)
    finally:
        os.close(write)


def test_encode_reply_answers_values_replies_and_errors():
    """A dict is the reply's fields, a Reply carries fds too, an ActError keeps its errno,
    and any other exception is answered as an error naming its type."""
    assert decode(encode_reply(1, {"a": 1})[0]) == {"act": "reply", "seq": 1, "ok": True, "a": 1}
    frame, fds = encode_reply(2, Reply({"port": 80}, [5]))
    assert decode(frame)["port"] == 80 and fds == [5]
    error = decode(encode_reply(3, ActError("in use", 98))[0])
    assert (error["ok"], error["errno"], error["error"]) == (False, 98, "in use")
    other = decode(encode_reply(4, ValueError("bad"))[0])
    assert (other["ok"], other["errno"], other["error"]) == (False, 0, "ValueError: bad")


@pytest.mark.parametrize(("host", "port", "path", "backlog", "names"), [
    ("127.0.0.1", None, None, 5, "a port or a unix socket path"),
    ("127.0.0.1", 80, "/x.sock", 5, "not both"),
    ("127.0.0.1", 65536, None, 5, "port=65536"),
    ("127.0.0.1", True, None, 5, "port=True"),
    ("", 80, None, 5, "host=''"),
    ("a\0b", 80, None, 5, "host="),
    (None, None, "relative.sock", 5, "absolute"),
    (None, None, "/a\0b", 5, "NUL"),
    ("127.0.0.1", 80, None, 0, "backlog=0"),
    ("127.0.0.1", 80, None, 2**31, "backlog="),
])
def test_check_listen_refuses_each_bad_field_by_name(host, port, path, backlog, names):
    """Each malformed field of a listen request is refused with a message naming it."""
    with pytest.raises(SettingsError, match=names.replace("(", r"\(")):
        check_listen(host, port, path, backlog)


def test_check_listen_accepts_tcp_and_unix_requests():
    """A host and port, or an absolute path, with a backlog, pass."""
    check_listen("::1", 0, None, 1)
    check_listen(None, None, "/run/app.sock", 2**31 - 1)
