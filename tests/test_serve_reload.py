"""``pycluster run --reload``: an edit reloads the workers without a refused connection; a
broken edit keeps the old workers serving and shows the error once."""

from __future__ import annotations

import textwrap
import threading

import pytest
from helpers import wait_until
from serve_helpers import get, port_of, start, stderr_of, stop

from pycluster import cli

pytest.importorskip("watchfiles")
pytest.importorskip("waitress")

APP = """
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"{version}"]
"""


class Hammer:
    """Requests on new connections, one after another, on a thread; counts failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                status = get(self.port)[0]
            except OSError as exc:
                self.failures.append(repr(exc))
            else:
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)


@pytest.mark.slow
def test_edits_reload_without_a_failed_request_and_a_broken_edit_keeps_serving(tmp_path):
    """Each edit of main.py is served after a rolling reload, with no refused or failed
    request meanwhile; an edit with a syntax error fails the reload once (one
    SyntaxError shown), the old worker keeps serving, and the next good edit is served."""
    with start(tmp_path, APP.format(version="v1"), "--reload") as proc:
        port = port_of(proc)
        hammer = Hammer(port)
        try:
            main = tmp_path / "main.py"
            main.write_text(textwrap.dedent(APP.format(version="v2")))
            wait_until(lambda: get(port)[2] == b"v2", "v2 to be served")
            main.write_text("def app(:\n")
            proc.expect_err(lambda x: "rolling reload failed" in x, "the broken reload to fail")
            assert get(port)[2] == b"v2"
            main.write_text(textwrap.dedent(APP.format(version="v3")))
            wait_until(lambda: get(port)[2] == b"v3", "v3 to be served")
        finally:
            hammer.stop()
        assert hammer.failures == []
        assert hammer.ok > 0
        assert stop(proc) == 0
        stderr = stderr_of(proc)
    assert stderr.count("SyntaxError: invalid syntax") == 1


def test_reload_of_an_installed_package_is_refused(tmp_path, monkeypatch, capsys):
    """--reload on an app installed in site-packages (no source tree to edit) is one
    line and exit 2."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "waitress:serve", "--reload"]) == 2
    err = capsys.readouterr().err
    assert "--reload: APP 'waitress:serve' is an installed package" in err
