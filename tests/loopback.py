"""Run an example so that its workers listen on 127.0.0.1 instead of every interface.

``python tests/loopback.py examples/hello.py``: in a worker, ``pycluster.worker.listen()``'s
default host becomes 127.0.0.1, then the example runs as ``__main__``, unchanged. The
master re-runs this same command line in its workers, so the wrapper is there too.
"""

import runpy
import sys

import pycluster

if pycluster.is_worker:
    _listen = pycluster.ThisWorker.listen

    def _loopback(self, port=None, host="0.0.0.0", **options):
        return _listen(self, port, "127.0.0.1" if host == "0.0.0.0" else host, **options)

    pycluster.ThisWorker.listen = _loopback

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
