"""``pycluster.serve(app)``: one call runs the cluster in the master and serves in workers."""

from __future__ import annotations

import textwrap

import pytest
from helpers import Proc
from serve_helpers import get, port_of, stderr_of, stop

import pycluster

ASGI_SCRIPT = """
    import pycluster

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b"served by worker %d" % pycluster.worker.id
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    if __name__ == "__main__":
        raise SystemExit(pycluster.serve(app, workers=2, bind="127.0.0.1:0",
                                         graceful_timeout=10, keep_alive=2))
"""

WSGI_MODULE = """
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "4")])
        return [b"wsgi"]
"""


@pytest.mark.slow
def test_serve_an_app_object_from_a_script(tmp_path):
    """A script that hands its ASGI app to pycluster.serve() runs a 2-worker cluster
    (each worker re-runs the script and serves the object); SIGTERM stops it, exit 0."""
    (tmp_path / "server.py").write_text(textwrap.dedent(ASGI_SCRIPT))
    proc = Proc([str(tmp_path / "server.py")], cwd=tmp_path, read_stderr=True,
                start_new_session=True)
    with proc:
        port = port_of(proc, workers=2)
        bodies = {get(port)[2] for _ in range(20)}
        assert bodies <= {b"served by worker 1", b"served by worker 2"}
        assert stop(proc) == 0
        assert "Traceback" not in stderr_of(proc)


@pytest.mark.slow
def test_serve_a_module_app_by_name(tmp_path):
    """pycluster.serve("module:app") has workers import the app instead of re-running
    the caller (here a WSGI app, served by waitress)."""
    pytest.importorskip("waitress")
    (tmp_path / "wsgi_mod.py").write_text(textwrap.dedent(WSGI_MODULE))
    code = ("import pycluster; raise SystemExit(pycluster.serve('wsgi_mod:app', workers=1, "
            "bind='127.0.0.1:0'))")
    with Proc(["-c", code], cwd=tmp_path, read_stderr=True, start_new_session=True) as proc:
        port = port_of(proc)
        assert get(port)[2] == b"wsgi"
        assert stop(proc) == 0


async def _asgi(scope, receive, send):
    pass


@pytest.mark.parametrize(
    ("app", "options", "message"),
    [
        (42, {}, "app is int 42: not an ASGI app"),
        (_asgi, {"interface": "wsgi"}, "--interface wsgi: app is an ASGI app"),
        (_asgi, {"nope": 1}, "unknown option(s) nope; known: access_log"),
        (_asgi, {"keep_alive": -1}, "keep_alive=-1 must be an int >= 0"),
        (_asgi, {"http": "h3"}, "http='h3' must be one of auto, h11, httptools"),
        (_asgi, {"ssl_certfile": "c.pem"}, "ssl_keyfile and ssl_certfile go together"),
        (_asgi, {"workers": 0}, "workers=0 must be an int >= 1"),
    ],
)
def test_bad_arguments_raise_settings_error_in_the_master(app, options, message):
    """In the master, an object that is not an app, an unknown option or a bad value
    raises SettingsError naming it, before any worker is forked."""
    with pytest.raises(pycluster.SettingsError) as caught:
        pycluster.serve(app, **options)
    assert message in str(caught.value)
