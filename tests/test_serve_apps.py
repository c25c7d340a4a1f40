"""Loading ``module:attr`` and telling ASGI, WSGI and main functions apart (no processes)."""

from __future__ import annotations

import sys

import pytest

from pycluster._apps import AppError, ServeOptions, detect, load


async def asgi3(scope, receive, send):
    pass


class ASGI2:
    def __init__(self, scope):
        self.scope = scope

    def __await__(self):
        yield


class AsyncCallable:
    async def __call__(self, scope, receive, send):
        pass


def wsgi(environ, start_response):
    return []


class WSGIObject:
    def __call__(self, environ, start_response):
        return []


def main():
    return 0


def needs_four(a, b, c, d):
    pass


@pytest.mark.parametrize(
    ("app", "kind"),
    [(asgi3, "asgi3"), (ASGI2, "asgi2"), (AsyncCallable(), "asgi3"), (wsgi, "wsgi"),
     (WSGIObject(), "wsgi"), (main, "main")],
)
def test_auto_detection(app, kind):
    """--interface auto: an async callable is ASGI 3, a class with __await__ ASGI 2 (as
    uvicorn decides), a sync (environ, start_response) callable WSGI, a no-argument
    function the main function each worker calls."""
    assert detect(app) == kind


@pytest.mark.parametrize(
    ("app", "interface", "message"),
    [
        (42, "auto", "APP is int 42: not an ASGI app, a WSGI app nor a function"),
        (sys, "auto", "APP is the module 'sys'"),
        (needs_four, "auto", "APP is the function needs_four(a, b, c, d): not an ASGI app"),
        (wsgi, "asgi", "--interface asgi: APP is a WSGI app"),
        (asgi3, "wsgi", "--interface wsgi: APP is an ASGI app"),
        (asgi3, "main", "--interface main: APP is the function asgi3"),
        (main, "http", "--interface 'http' must be one of auto, asgi, wsgi, main"),
    ],
)
def test_what_is_not_an_app_is_named(app, interface, message):
    """An object that fits no interface, or not the one asked for, is one line saying
    what it is instead."""
    with pytest.raises(AppError, match="^" + _escape(message)):
        detect(app, interface)


def test_explicit_interfaces_accept_what_fits():
    """--interface asgi/wsgi/main take the objects auto would give them."""
    assert detect(AsyncCallable(), "asgi") == "asgi3"
    assert detect(ASGI2, "asgi") == "asgi2"
    assert detect(WSGIObject(), "wsgi") == "wsgi"
    assert detect(main, "main") == "main"


def test_load_and_factory(tmp_path, monkeypatch):
    """load() imports module:attr (dotted attributes too); --factory calls it; a missing
    module or attribute is one line naming it."""
    (tmp_path / "loadme.py").write_text(
        "class ns:\n    app = 'the app'\ndef create():\n    return 'made'\n"
    )
    (tmp_path / "broken_import.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load("loadme:ns.app") == "the app"
    assert load("loadme:create", factory=True) == "made"
    with pytest.raises(AppError, match="'loadme' has no attribute 'nope'"):
        load("loadme:nope")
    with pytest.raises(AppError, match="no module named 'missing_mod_q'"):
        load("missing_mod_q:app")
    with pytest.raises(AppError, match="importing 'broken_import' .* failed"):
        load("broken_import:app")
    with pytest.raises(AppError, match="--factory: APP 'loadme:ns.app' is str"):
        load("loadme:ns.app", factory=True)
    with pytest.raises(AppError, match="must be 'module:attribute'"):
        load("loadme")


def test_options_round_trip_through_json():
    """The options a worker gets on its command line are the ones the CLI made."""
    options = ServeOptions(interface="wsgi", keep_alive=7, ssl_keyfile="/k", ssl_certfile="/c",
                           threads=2)
    assert ServeOptions.from_json(options.to_json()) == options


def _escape(text: str) -> str:
    import re

    return re.escape(text)
