"""Unit tests of how a silent worker's output is cut into lines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pycluster._output import LineBuffer


@given(st.lists(st.binary(max_size=50), max_size=20))
def test_lines_are_the_same_however_the_bytes_arrive(chunks):
    """Fed in any chunking, the buffer yields the newline-separated lines of the whole
    stream, and finish() yields the unterminated rest."""
    whole = b"".join(chunks)
    lines = LineBuffer(longest=1 << 20)
    got = [line for chunk in chunks for line in lines.feed(chunk)] + lines.finish()
    expected = whole.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert got == expected


def test_a_line_that_never_ends_is_cut_not_hoarded():
    """A line longer than the limit comes out in pieces of the limit; the rest waits."""
    lines = LineBuffer(longest=4)
    assert lines.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert lines.feed(b"k\nxy") == [b"ijk"]
    assert lines.finish() == [b"xy"]
    assert lines.finish() == []
