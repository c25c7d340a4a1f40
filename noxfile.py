"""The test suite on every supported Python.

    python3 -m nox                                         # every version found here
    python3 -m nox -s tests-3.13 -- -m "not reliability"   # the quick tier on one

Arguments after ``--`` go to pytest. A version that is not installed is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.download_python = "never"  # test the interpreters that are here, never fetch one


def _pyenv(*args: str) -> str:
    return subprocess.run(["pyenv", *args], capture_output=True, text=True, check=False).stdout


def _let_pyenv_shims_run_every_version() -> None:
    """Make pyenv's ``pythonX.Y`` shims run each installed version, not only the active one.

    A shim refuses a version its active list lacks; PYENV_VERSION with several versions
    (what ``pyenv shell A B`` sets) fixes that. The active ones stay first: ``python3`` is
    unchanged.
    """
    if shutil.which("pyenv") is None:
        return
    active = _pyenv("version-name").strip().split(":")
    installed = [v for v in _pyenv("versions", "--bare").split() if v not in active]
    os.environ["PYENV_VERSION"] = ":".join(active + installed)
    os.environ.setdefault("PYENV_ROOT", _pyenv("root").strip())


_let_pyenv_shims_run_every_version()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Install the package with its test extra and run pytest with the arguments given."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)
