"""Worker entry point for ``Master(target="package.module:function")``.

Run as ``python -m pycluster._boot package.module:function [args...]``: imports the module,
calls the function, and exits with what it returns. A target that cannot be imported or
found exits with code 3 (a boot failure, as in gunicorn and uvicorn) after one clear line.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pycluster  # noqa: F401 - connects this worker to its master before the target loads

BOOT_FAILURE = 3


def main(argv: list[str]) -> Any:
    spec, *args = argv
    module_name, _, qualname = spec.partition(":")
    sys.argv = [spec, *args]
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        print(f"pycluster: cannot load target {spec!r}: {exc}", file=sys.stderr)
        return BOOT_FAILURE
    return target()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
