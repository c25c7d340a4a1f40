"""Worker entry point for ``Master(target="package.module:function")``.

Run as ``python -m pycluster._boot package.module:function [args...]``: imports the module,
calls the function, and exits with what it returns. Anything that goes wrong before the
function is called (the module does not import, raises or has a syntax error; the name is
missing or not callable) is a boot failure: the error is printed once and the worker exits
with :data:`pycluster.BOOT_FAILURE`, so the respawn plugin gives up instead of retrying.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from pycluster import BOOT_FAILURE  # connects this worker to its master before the target loads
from pycluster._child import load


def main(argv: list[str]) -> Any:
    spec, *args = argv
    sys.argv = [spec, *args]
    try:
        target = load(spec)
    except LookupError as exc:
        _fail(f"cannot load target {spec!r}: {exc}")
        return BOOT_FAILURE
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):  # the app's module itself is missing
            _fail(f"cannot load target {spec!r}: {exc}")
            return BOOT_FAILURE
        traceback.print_exc()  # a module the app imports is missing: show where
        _fail(f"cannot load target {spec!r} (the traceback above says why)")
        return BOOT_FAILURE
    except BaseException as exc:  # a syntax error or an exception while importing the app
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        traceback.print_exc()
        _fail(f"cannot load target {spec!r} (the traceback above says why)")
        return BOOT_FAILURE
    if not callable(target):
        _fail(f"target {spec!r} is a {type(target).__name__}, not a function to call")
        return BOOT_FAILURE
    return target()


def _fail(text: str) -> None:
    print(f"pycluster: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
