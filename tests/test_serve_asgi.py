"""``pycluster run main:app`` with an ASGI app: uvicorn in each worker, pycluster's drain."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess

import pytest
from helpers import wait_until
from serve_helpers import Background, drain_keep_alive, get, port_of, start, stderr_of, stop

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow

APP = """
    import asyncio, os, pathlib
    HERE = pathlib.Path(__file__).parent

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if os.environ.get("FAIL_STARTUP"):
                        await send({"type": "lifespan.startup.failed",
                                    "message": "no database"})
                        return
                    scope["state"]["greeting"] = "hello"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    (HERE / "shutdown-ran").write_text("yes")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/slow":
            (HERE / "slow-started").write_text("")
            while not (HERE / "release").exists():
                await asyncio.sleep(0.01)
        body = (f"{scope['state'].get('greeting')} {scope['path']} root={scope['root_path']} "
                f"client={scope['client'][0]} scheme={scope['scheme']}").encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    def create_app():
        return app
"""


def test_serves_with_lifespan_state_and_stops_cleanly(tmp_path):
    """Two workers serve the app; lifespan startup's state reaches each request's scope;
    SIGTERM runs lifespan shutdown and the master exits 0, without a traceback."""
    with start(tmp_path, APP, workers=2) as proc:
        port = port_of(proc, workers=2)
        status, _, body = get(port, "/x")
        assert (status, body) == (200, b"hello /x root= client=127.0.0.1 scheme=http")
        assert stop(proc) == 0
        stderr = stderr_of(proc)
    assert (tmp_path / "shutdown-ran").read_text() == "yes"
    assert "Traceback" not in stderr


def test_keep_alive_connection_gets_connection_close_then_is_closed(tmp_path):
    """On stop, a keep-alive connection is not cut: its next request is answered (200)
    with `Connection: close`, then the server closes it, and the master exits 0."""
    with start(tmp_path, APP, "--keep-alive", "30") as proc:
        port = port_of(proc)
        responses = drain_keep_alive(proc, port)
        assert all(status == 200 for status, _, _ in responses)
        assert proc.wait() == 0


def test_request_in_flight_at_sigterm_completes(tmp_path):
    """A request in flight when the master gets SIGTERM completes with 200 after the
    drain began, and the master exits 0."""
    with start(tmp_path, APP) as proc:
        port = port_of(proc)
        slow = Background(port, "/slow")
        wait_until(lambda: (tmp_path / "slow-started").exists(), "the slow request to start")
        proc.popen.send_signal(signal.SIGTERM)
        proc.expect_err(lambda x: "stopping" in x, "the stop to begin")
        (tmp_path / "release").write_text("")
        status, _, body = slow.result()
        assert (status, body) == (200, b"hello /slow root= client=127.0.0.1 scheme=http")
        assert proc.wait() == 0


def test_failing_lifespan_startup_is_a_boot_failure(tmp_path):
    """A lifespan startup that fails is one line, the worker never listens, respawn does
    not retry it, and the master exits 1."""
    with start(tmp_path, APP, env={"FAIL_STARTUP": "1"}) as proc:
        assert proc.wait() == 1
        stderr = stderr_of(proc)
    assert "pycluster: error: ASGI lifespan startup failed: no database" in stderr
    assert "listening on" not in stderr
    assert "failed to boot" in stderr
    assert "Traceback" not in stderr


def test_factory_root_path_proxy_headers_and_access_log(tmp_path):
    """--factory calls APP for the app; --root-path reaches the scope; --proxy-headers
    with --forwarded-allow-ips trusts X-Forwarded-For/-Proto; --access-log logs requests."""
    options = ("--factory", "--root-path", "/api", "--proxy-headers",
               "--forwarded-allow-ips", "*", "--access-log")
    with start(tmp_path, APP, *options, app="main:create_app") as proc:
        port = port_of(proc)
        status, _, body = get(port, "/y", x_forwarded_for="10.1.2.3", x_forwarded_proto="https")
        assert status == 200
        # as in uvicorn: the proxy strips /api, the scope's path has it again (ASGI spec)
        assert body == b"hello /api/y root=/api client=10.1.2.3 scheme=https"
        proc.expect(lambda x: '/y HTTP/1.1" 200' in x, "an access log line (stdout)")
        assert stop(proc) == 0


def test_without_proxy_headers_forwarded_headers_are_ignored(tmp_path):
    """Without --proxy-headers, X-Forwarded-For from a client changes nothing."""
    with start(tmp_path, APP) as proc:
        port = port_of(proc)
        _, _, body = get(port, "/", x_forwarded_for="10.1.2.3", x_forwarded_proto="https")
        assert body == b"hello / root= client=127.0.0.1 scheme=http"
        assert stop(proc) == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path):
    """--ssl-keyfile/--ssl-certfile serve HTTPS (a self-signed certificate made here)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True,
                   timeout=60)
    with start(tmp_path, APP, "--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem") as proc:
        port = port_of(proc)
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /tls HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert data.endswith(b"hello /tls root= client=127.0.0.1 scheme=https")
        assert stop(proc) == 0
