"""Run a pycluster script whose workers ``listen(port)`` on 127.0.0.1 instead of 0.0.0.0.

Usage: ``python _loopback.py SCRIPT [ARGS...]``. The benchmarks only ever bind loopback,
but ``examples/hello.py`` listens on the default host (every interface). In a worker this
wraps :meth:`pycluster.ThisWorker.listen` (public API) so the default host is 127.0.0.1,
then runs SCRIPT as ``__main__``, unchanged. The master re-runs this same command line
in its workers, so the wrapper is in place there too. Nothing else differs.
"""

from __future__ import annotations

import sys
from typing import Any

import pycluster

if pycluster.is_worker:
    _listen = pycluster.ThisWorker.listen

    def _loopback_listen(self: Any, port: Any, host: str = "0.0.0.0", **kw: Any) -> Any:
        return _listen(self, port, "127.0.0.1" if host == "0.0.0.0" else host, **kw)

    pycluster.ThisWorker.listen = _loopback_listen

script = sys.argv[1]
sys.argv = sys.argv[1:]
with open(script, "rb") as f:
    code = compile(f.read(), script, "exec")
exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})
