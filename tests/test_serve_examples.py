"""The app examples run with one `pycluster run` line each, as their docstrings say."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from helpers import Proc, wait_until
from serve_helpers import get, port_of, stderr_of

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("app", "needs"),
    [("fastapi_app:app", "fastapi"), ("flask_app:app", "flask"),
     ("aiohttp_app:main", "aiohttp")],
)
def test_app_example_serves_reloads_and_stops(app, needs):
    """Each example answers from both workers, is replaced worker by worker on SIGHUP
    (new worker ids answer), and stops with exit code 0 on SIGTERM, no traceback."""
    pytest.importorskip(needs)
    argv = ["-m", "pycluster", "run", app, "--workers", "2", "--bind", "127.0.0.1:0"]
    with Proc(argv, cwd=EXAMPLES, read_stderr=True, start_new_session=True) as proc:
        port = port_of(proc, workers=2)
        first = {json.loads(get(port)[2])["worker"] for _ in range(20)}
        assert first <= {1, 2}
        assert json.loads(get(port)[2])["message"] == "hello"
        os.kill(proc.pid, signal.SIGHUP)
        proc.expect_err(lambda x: "rolling reload finished" in x, "the reload to finish")
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, "old workers gone")
        after = {json.loads(get(port)[2])["worker"] for _ in range(20)}
        assert after <= {3, 4}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        stderr = stderr_of(proc)
    assert "Traceback" not in stderr
