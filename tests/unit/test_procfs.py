"""``pycluster._procfs``: the parsers on tricky samples of each /proc file, and the readers
on this very process (its own pipes and sockets; no child process is started)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pycluster import _procfs
from pycluster._procfs import Stat, TcpSocket

PROPERTY = settings(deadline=None, database=None)

#: /proc/PID/stat of a sleeping process; COMM is replaced by each test.
STAT = ("4242 (COMM) S 1 4242 4242 0 -1 4194560 4821 0 3 0 157 42 0 0 20 0 1 0 3131 "
        "23416832 5376 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 "
        "0 0 0 0 0 0 0 0 0 0 0\n")

# -- parsers -------------------------------------------------------------------------------


@pytest.mark.parametrize("comm", ["python3", "a b", "(x)", ") S 1 (", "))", "", "tab\there"])
def test_stat_comm_may_hold_spaces_and_parentheses(comm):
    """The command name runs from the first '(' to the last ')', so a name with spaces,
    parentheses or a fake state inside does not shift the fields after it."""
    assert _procfs.parse_stat(STAT.replace("COMM", comm)) == Stat(comm, "S", 157, 42)


@PROPERTY
@given(comm=st.text(max_size=15), state=st.sampled_from("RSDZTtXI"),
       utime=st.integers(0, 2**63), stime=st.integers(0, 2**63))
def test_any_stat_line_parses_back(comm, state, utime, stime):
    """For any command name (up to the kernel's 15 characters, whatever they are), state
    letter and CPU tick counts, the stat line the kernel would write parses back to them."""
    fields = STAT.replace("COMM", comm).split(") ", 1)[1].split()
    fields[0], fields[11], fields[12] = state, str(utime), str(stime)
    text = f"4242 ({comm}) " + " ".join(fields) + "\n"
    assert _procfs.parse_stat(text) == Stat(comm, state, utime, stime)


@pytest.mark.parametrize("text", ["", "4242 python3 S 1", "4242 (python3) S 1 4242", "(x"])
def test_a_stat_line_cut_short_is_a_value_error(text):
    """Text without the parenthesised name or with too few fields after it raises
    ValueError quoting it, not an IndexError."""
    with pytest.raises(ValueError, match=r"not a /proc/PID/stat line"):
        _procfs.parse_stat(text)


def test_rss_is_read_from_vmrss_and_absent_for_a_zombie():
    """VmRSS is read in KiB wherever it is in /proc/PID/status (not VmHWM or RssAnon);
    a zombie's status has no VmRSS line and gives None."""
    status = "Name:\tpython3\nState:\tS (sleeping)\nVmHWM:\t  99 kB\nVmRSS:\t   21504 kB\n"
    assert _procfs.parse_rss_kib(status + "RssAnon:\t 7 kB\n") == 21504
    assert _procfs.parse_rss_kib("Name:\tpython3\nState:\tZ (zombie)\nThreads:\t1\n") is None


TCP4 = ("   3: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
        "        0 31337 1 0000000000000000 100 0 0 10 0\n")
TCP6 = ("   0: 00000000000000000000000001000000:D431 00000000000000000000000001000000:1F40 01 "
        "00000000:00000000 00:00000000 00000000     0        0 271828 1 0000000000000000 20 4 "
        "30 10 -1\n")


def test_tcp_rows_give_local_port_state_and_inode():
    """A row of /proc/net/tcp or tcp6 gives the local port (hex), the state code and the
    inode; the remote port (here 8000 in the IPv6 row) is not taken for the local one."""
    assert _procfs.parse_tcp_line(TCP4) == TcpSocket(8000, _procfs.TCP_LISTEN, 31337)
    assert _procfs.parse_tcp_line(TCP6) == TcpSocket(54321, _procfs.TCP_ESTABLISHED, 271828)


def test_the_tcp_heading_is_not_a_row():
    """The heading line of /proc/net/tcp raises ValueError quoting it."""
    heading = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt\n"
    with pytest.raises(ValueError, match="not a /proc/net/tcp row: '  sl  local_address"):
        _procfs.parse_tcp_line(heading)


@pytest.mark.parametrize(("path", "expected"), [
    ("", ""), (" /run/app.sock", "/run/app.sock"), (" /run/with two  spaces.sock",
                                                     "/run/with two  spaces.sock"),
    (" @/tmp/.X11-unix/X0", "@/tmp/.X11-unix/X0"),
], ids=["unnamed", "path", "spaces", "abstract"])
def test_unix_rows_give_inode_and_whole_path(path, expected):
    """A row of /proc/net/unix gives the inode and the path: empty when unnamed, kept
    whole when it holds spaces, with its '@' when abstract."""
    line = f"0000000000000000: 00000002 00000000 00010000 0001 01 23456{path}\n"
    assert _procfs.parse_unix_line(line) == (23456, expected)


# -- readers, on this process ----------------------------------------------------------------


def test_this_process_is_running_and_has_memory_cpu_and_a_command_line():
    """For this (running) process: state R, a VmRSS, CPU seconds, an fd count, and the
    command line it was started with."""
    me = os.getpid()
    assert _procfs.state(me) == "R"
    assert (_procfs.rss_kib(me) or 0) > 0
    assert (_procfs.cpu_seconds(me) or 0) > 0
    assert (_procfs.fd_count(me) or 0) >= 3
    assert _procfs.cmdline(me) == sys.orig_argv


def test_a_pid_that_cannot_exist_reads_as_gone():
    """A pid above the kernel's pid_max reads as gone: None for its state, memory, CPU
    and fd count, and empty children, fds, sockets and command line."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    assert [_procfs.state(pid), _procfs.rss_kib(pid), _procfs.cpu_seconds(pid),
            _procfs.fd_count(pid)] == [None] * 4
    assert (_procfs.children(pid), _procfs.live_children(pid), _procfs.zombies(pid)) == (
        [], [], set())
    assert (_procfs.open_fds(pid), _procfs.socket_inodes(pid), _procfs.cmdline(pid)) == (
        {}, set(), [])
    assert _procfs.listening_ports(pid) == []
    assert _procfs.held_connections(pid, 80) == 0


def test_open_fds_and_socket_inodes_see_new_pipes_and_sockets():
    """A pipe and a socketpair opened here show in open_fds (as pipe:[…] and socket:[…]),
    their inodes in socket_inodes and unix_sockets (unnamed), and not in inet_inodes;
    once closed they are gone from open_fds."""
    me = os.getpid()
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        fds = _procfs.open_fds(me)
        assert fds[r].startswith("pipe:[")
        assert fds[a.fileno()] == f"socket:[{os.fstat(a.fileno()).st_ino}]"
        inodes = {os.fstat(s.fileno()).st_ino for s in (a, b)}
        assert inodes <= _procfs.socket_inodes(me)
        unix = _procfs.unix_sockets()
        assert {unix[i] for i in inodes} == {""}
        assert not inodes & _procfs.inet_inodes()
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    assert r not in _procfs.open_fds(me)
    assert not inodes & _procfs.socket_inodes(me)


def test_listening_ports_and_held_connections_of_this_process():
    """A socket listening on 127.0.0.1 port 0 shows as its real port in
    listening_ports and tcp_sockets(port); a connection to it, accepted here, counts as
    held (both ends are this process's, but only the accepted one has that local port)."""
    me = os.getpid()
    server = socket.create_server(("127.0.0.1", 0))
    client = accepted = None
    try:
        port = server.getsockname()[1]
        assert port in _procfs.listening_ports(me)
        assert _procfs.held_connections(me, port) == 0
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        accepted, _ = server.accept()
        rows = _procfs.tcp_sockets(port)
        assert {s.port for s in rows} == {port}
        assert {s.state for s in rows} == {_procfs.TCP_LISTEN, _procfs.TCP_ESTABLISHED}
        assert _procfs.held_connections(me, port) == 1
    finally:
        for sock in (accepted, client, server):
            if sock is not None:
                sock.close()
