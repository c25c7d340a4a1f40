"""Helpers for tests that run real clusters: worker scripts, deadlines, event records."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycluster

#: Seconds any single wait in a test may take before it fails (generous: CI is loaded).
DEADLINE = 30.0


def script(tmp_path: Path, body: str, name: str = "worker.py") -> str:
    """Write a Python script (dedented *body*) into *tmp_path* and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def run(master: pycluster.Master, timeout: float = DEADLINE) -> int:
    """Run *master* until it returns, failing the test if it takes over *timeout* s."""

    async def main() -> int:
        try:
            return await asyncio.wait_for(master.serve(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"master did not finish within {timeout} s") from None

    return asyncio.run(main())


class Events:
    """Records every lifecycle event of a master (and its workers) in order."""

    NAMES = ("fork", "online", "listening", "message", "disconnect", "exit", "setup", "error")

    def __init__(self, master: pycluster.Master) -> None:
        self.log: list[tuple[Any, ...]] = []
        for name in self.NAMES:
            master.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.log.append((name, *args))

        return record

    def names(self, worker: pycluster.Worker | None = None) -> list[str]:
        """Event names, optionally only those about *worker*."""
        return [e[0] for e in self.log
                if worker is None or (len(e) > 1 and e[1] is worker)]

    def of(self, name: str) -> list[tuple[Any, ...]]:
        """The argument tuples of every *name* event."""
        return [e[1:] for e in self.log if e[0] == name]


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll *predicate* (synchronously) until it is truthy; fail naming *what*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def http_get(port: int, host: str = "127.0.0.1", path: str = "/", timeout: float = 10) -> bytes:
    """One HTTP/1.0 GET; returns the whole response (read to its Content-Length, or EOF)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and len(rest) >= int(value):
                        return data
    return data


class Proc:
    """A process started by a test, its stdout read line by line on a thread."""

    def __init__(self, argv: list[str], cwd: str | Path, env: dict[str, str] | None = None,
                 read_stderr: bool = False, **kwargs: Any) -> None:
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, *argv], cwd=cwd, env=full_env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
        )
        self.pid = self.popen.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err_lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.seen_err: list[str] = []
        self.stderr = ""
        self._read_stderr = read_stderr
        self._pumps = [threading.Thread(target=self._pump, args=(self.popen.stdout, self.lines),
                                        daemon=True)]
        if read_stderr:
            self._pumps.append(threading.Thread(
                target=self._pump, args=(self.popen.stderr, self.err_lines), daemon=True))
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def expect(self, predicate: Callable[[str], bool], what: str,
               timeout: float = DEADLINE) -> str:
        """Return the next stdout line satisfying *predicate*; fail naming *what*."""
        return self._expect(self.lines, self.seen, predicate, what, timeout)

    def expect_err(self, predicate: Callable[[str], bool], what: str,
                   timeout: float = DEADLINE) -> str:
        """Return the next stderr line satisfying *predicate* (needs ``read_stderr=True``)."""
        assert self._read_stderr, "start the Proc with read_stderr=True"
        return self._expect(self.err_lines, self.seen_err, predicate, what, timeout)

    def _expect(self, lines: queue.Queue[str | None], seen: list[str],
                predicate: Callable[[str], bool], what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {what}; saw {seen[-20:]!r}"
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                lines.put(None)
                raise AssertionError(f"output ended before {what}; saw {seen[-20:]!r}; "
                                     f"stderr: {self.finish()!r}")
            seen.append(line)
            if predicate(line):
                return line

    def json(self, predicate: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = DEADLINE) -> dict[str, Any]:
        """Return the next JSON stdout line satisfying *predicate*."""

        def match(line: str) -> bool:
            return line.startswith("{") and predicate(json.loads(line))

        return json.loads(self.expect(match, what, timeout))

    def wait(self, timeout: float = DEADLINE) -> int:
        """Wait for the process to exit; fail if it takes longer than *timeout*."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process {self.pid} did not exit within {timeout} s") from None

    def finish(self) -> str:
        """Kill (if needed) and reap the process, close its pipes; return its stderr."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        if not self._read_stderr and self.popen.stderr is not None and not self.popen.stderr.closed:
            self.stderr = self.popen.stderr.read()
        for pump in self._pumps:  # they end when every writer (workers too) has closed
            pump.join(DEADLINE)
        if self._read_stderr:
            self.stderr = "\n".join(self.seen_err)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None and not stream.closed:
                stream.close()
        return self.stderr

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
