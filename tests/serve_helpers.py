"""Helpers for the ``pycluster run module:app`` tests: start a cluster, talk HTTP/1.1."""

from __future__ import annotations

import os
import re
import signal
import socket
import textwrap
import threading
from pathlib import Path
from typing import Any

from helpers import DEADLINE, Proc


def start(tmp_path: Path, source: str, *options: str, app: str = "main:app",
          workers: int = 1, env: dict[str, str] | None = None) -> Proc:
    """Write *source* to tmp_path/main.py and run ``pycluster run APP`` on 127.0.0.1:0."""
    (tmp_path / "main.py").write_text(textwrap.dedent(source))
    argv = ["-m", "pycluster", "run", app, "--workers", str(workers),
            "--bind", "127.0.0.1:0", "--graceful-timeout", "20", *options]
    return Proc(argv, cwd=tmp_path, env=env, read_stderr=True, start_new_session=True)


def port_of(proc: Proc, workers: int = 1) -> int:
    """Wait until *workers* workers listen; return the port (the same for all)."""
    ports = set()
    for _ in range(workers):
        line = proc.expect_err(lambda x: "listening on 127.0.0.1:" in x, "a worker listening")
        ports.add(int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1)))
    assert len(ports) == 1, ports
    return ports.pop()


def stop(proc: Proc, sig: int = signal.SIGTERM) -> int:
    """Signal the master and return its exit code."""
    os.kill(proc.pid, sig)
    return proc.wait()


def stderr_of(proc: Proc) -> str:
    """Reap *proc* and return all its stderr (the lines seen so far and the rest)."""
    proc.finish()
    lines = list(proc.seen_err)
    while (line := proc.err_lines.get(timeout=DEADLINE)) is not None:
        lines.append(line)
    proc.err_lines.put(None)
    return "\n".join(lines)


class Connection:
    """One HTTP/1.1 keep-alive connection, requests sent one at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.file = self.sock.makefile("rb")

    def get(self, path: str = "/", **headers: str) -> tuple[int, dict[str, str], bytes]:
        """Send GET *path*; return (status, lower-cased headers, body)."""
        extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), f"no response: {status_line!r}"
        fields: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        body = self.file.read(int(fields.get("content-length", "0")))
        return int(status_line.split()[1]), fields, body

    def at_eof(self) -> bool:
        """Whether the server closed the connection (reads until EOF or the deadline)."""
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get(port: int, path: str = "/", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection."""
    with Connection(port) as conn:
        return conn.get(path, **headers)


class Background:
    """A request running on a thread (an in-flight request); ``result()`` waits for it."""

    def __init__(self, port: int, path: str) -> None:
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run, args=(port, path), daemon=True)
        self.thread.start()

    def _run(self, port: int, path: str) -> None:
        try:
            self.outcome.append(get(port, path))
        except Exception as exc:  # reported by result()
            self.outcome.append(exc)

    def result(self) -> tuple[int, dict[str, str], bytes]:
        self.thread.join(DEADLINE)
        assert self.outcome, "the background request did not finish in time"
        value = self.outcome[0]
        if isinstance(value, Exception):
            raise value
        return value  # type: ignore[no-any-return]


def drain_keep_alive(proc: Proc, port: int) -> list[tuple[int, dict[str, str], bytes]]:
    """On one keep-alive connection: a request, SIGTERM to the master, then requests
    until one is answered with ``Connection: close``; return every response."""
    responses = []
    with Connection(port) as conn:
        responses.append(conn.get("/"))
        os.kill(proc.pid, signal.SIGTERM)
        proc.expect_err(lambda x: "disconnected" in x or "stopping" in x, "the stop to begin")
        while responses[-1][1].get("connection", "").lower() != "close":
            assert len(responses) < 10_000, "never answered Connection: close"
            responses.append(conn.get("/"))
        assert conn.at_eof(), "the server did not close the connection after Connection: close"
    return responses
