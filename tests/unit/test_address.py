"""Bind addresses as users type them (``Master(bind=...)``, ``pycluster run --bind``):
``parse_address`` turns each accepted form into ``listen()`` arguments and refuses the
rest with a SettingsError that quotes the address."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pycluster
from pycluster._settings import parse_address

PROPERTY = settings(deadline=None, database=None)

GOOD = [
    ("127.0.0.1:8000", (8000, "127.0.0.1")),
    ("localhost:0", (0, "localhost")),
    ("example.com:65535", (65535, "example.com")),
    ("[::1]:8080", (8080, "::1")),
    ("[::]:80", (80, "::")),
    ("[fe80::1%eth0]:443", (443, "fe80::1%eth0")),
    (":8000", (8000, "0.0.0.0")),
    ("8000", (8000, "0.0.0.0")),
    ("0", (0, "0.0.0.0")),
    ("0.0.0.0:007", (7, "0.0.0.0")),
    ("unix:/run/app.sock", ("/run/app.sock",)),
    ("unix:/run/with space.sock", ("/run/with space.sock",)),
    ("unix:/run/../tmp/x.sock", ("/tmp/x.sock",)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD, ids=[t for t, _ in GOOD])
def test_each_accepted_form_gives_listen_arguments(text, expected):
    """HOST:PORT, [IPv6]:PORT (brackets dropped), :PORT and a bare PORT (all
    interfaces) give ``(port, host)``; unix:PATH gives ``(path,)``, normalised."""
    assert parse_address(text) == expected


def test_a_relative_unix_path_is_made_absolute(tmp_path, monkeypatch):
    """unix:PATH with a relative PATH is made absolute against the current directory
    when it is parsed (a worker may start somewhere else)."""
    monkeypatch.chdir(tmp_path)
    assert parse_address("unix:run/app.sock") == (str(tmp_path / "run" / "app.sock"),)
    assert parse_address("unix:app.sock") == (os.path.join(tmp_path, "app.sock"),)


@PROPERTY
@given(host=st.ip_addresses(v=4).map(str)
       | st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6})?\Z"),
       port=st.integers(0, 65535))
def test_any_host_and_port_in_range_round_trip(host, port):
    """For any IPv4 address or host name and any port 0-65535, ``HOST:PORT`` parses to
    exactly that port and host."""
    assert parse_address(f"{host}:{port}") == (port, host)


@PROPERTY
@given(ip=st.ip_addresses(v=6), port=st.integers(0, 65535))
def test_any_bracketed_ipv6_address_round_trips(ip, port):
    """For any IPv6 address, ``[ADDRESS]:PORT`` parses to that port and the address
    without its brackets."""
    assert parse_address(f"[{ip}]:{port}") == (port, str(ip))


@PROPERTY
@given(port=st.integers(65536, 10**30) | st.integers(max_value=-1))
def test_a_port_out_of_range_is_refused(port):
    """Any port above 65535 or below 0, with or without a host, raises SettingsError
    quoting the address."""
    for text in (f"127.0.0.1:{port}", f":{port}", str(port)):
        with pytest.raises(pycluster.SettingsError,
                           match=rf"bind address '{text}' is not HOST:PORT \(port 0-65535\)"):
            parse_address(text)


BAD = [
    "127.0.0.1:http", "127.0.0.1:", "127.0.0.1", "localhost", "", ":", "[::1]", "[::1]8000",
    "127.0.0.1:80 ", " 80", "+80", "8_000", "0x50", "unix:", "UNIX:/run/app.sock",
]


@pytest.mark.parametrize("text", BAD)
def test_a_malformed_address_is_a_settings_error_quoting_it(text):
    """A port that is not all digits, a missing port, a bracketed IPv6 address without
    ``:PORT``, stray spaces or signs, and ``unix:`` without a path raise SettingsError
    (also a ValueError) that quotes the address and shows a good one."""
    with pytest.raises(pycluster.SettingsError,
                       match=rf"bind address {re.escape(repr(text))} is not HOST:PORT .* "
                             r"e\.g\. '127\.0\.0\.1:8000'") as info:
        parse_address(text)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", [
    pytest.param("::1", id="bare-ipv6"),
    pytest.param("fe80::1:8000", id="bare-ipv6-with-port"),
    pytest.param("a:b:80", id="two-colons"),
    pytest.param("[::1:80", id="unclosed-bracket"),
    pytest.param("[]:80", id="empty-brackets"),
    pytest.param("127.0.0.1:\u00b2", id="superscript-digit"),
    pytest.param("\uff18\uff10", id="fullwidth-digits"),
])
def test_an_ambiguous_or_non_ascii_address_is_refused(text):
    """A bare IPv6 address (with or without a port: which colon is the port's?), a host
    with colons, an unclosed bracket and a port in non-ASCII digits raise SettingsError
    quoting the address."""
    with pytest.raises(pycluster.SettingsError, match=re.escape(repr(text))):
        parse_address(text)


@pytest.mark.parametrize("value", [8000, None, b"127.0.0.1:80", ["127.0.0.1:80"]],
                         ids=["int", "None", "bytes", "list"])
def test_an_address_that_is_not_a_str_is_a_settings_error_naming_it(value):
    """A non-str address raises SettingsError naming it and showing both kinds of good
    address, instead of failing inside string methods."""
    with pytest.raises(pycluster.SettingsError,
                       match=rf"bind address {re.escape(repr(value))} must be a string like "
                             r"'127\.0\.0\.1:8000' or 'unix:/run/app\.sock'"):
        parse_address(value)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::", "fe80::1"])
def test_a_numeric_host_is_not_resolved(host, monkeypatch):
    """A numeric host is used as it is, without getaddrinfo() (whose first call costs a
    forked worker milliseconds on its way to listening)."""
    from pycluster import _listen

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("getaddrinfo() was called")

    monkeypatch.setattr(_listen.socket, "getaddrinfo", refuse)
    assert _listen.numeric_host(host, 80, host) == host


@pytest.mark.parametrize(("host", "expected"), [("localhost", {"127.0.0.1", "::1"}),
                                               ("127.1", {"127.0.0.1"})])
def test_other_hosts_are_resolved_to_a_numeric_address(host, expected):
    """A name, or an IPv4 short form that inet_pton refuses, still goes through
    getaddrinfo() and comes back numeric."""
    from pycluster._listen import numeric_host

    assert numeric_host(host, 80, host) in expected


@pytest.mark.parametrize(("host", "canonical"), [("0:0::1", "::1"), ("0::0", "::"),
                                                 ("FE80:0::1", "fe80::1")])
def test_a_numeric_host_is_written_the_canonical_way(host, canonical):
    """Two spellings of one IPv6 address give the same host, so the master finds the
    socket it bound for the other spelling instead of binding the address twice."""
    from pycluster._listen import numeric_host

    assert numeric_host(host, 80, host) == canonical
