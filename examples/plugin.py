"""A custom plugin: count unexpected exits and tell the surviving workers about each exit.

    python examples/plugin.py

Three workers start; worker 1 crashes after a moment; the others print the notice they
receive and are then stopped. The master prints the count and exits.
"""

import os
import sys
import threading

import pycluster


class ExitNotifier:
    """Counts unexpected exits and tells every surviving worker about each exit."""
    name = "exit-notifier"

    def __init__(self):
        self.crashes = 0

    def install(self, master):
        self.master = master
        master.on("exit", self.on_exit)

    def on_exit(self, worker, code, signal):
        self.crashes += not worker.exited_after_disconnect
        for other in self.master.workers.values():
            if other.is_connected() and not other.exited_after_disconnect:  # not if leaving
                other.send({"exited": worker.id, "code": code, "signal": signal})


if pycluster.is_primary:
    master = pycluster.Master()
    notifier = ExitNotifier()
    master.use(notifier)
    for _ in range(3):
        master.fork()
    notices = []

    def on_message(worker, message):
        if message == "up" and worker.id == 1:
            worker.send("crash")
        elif isinstance(message, dict):  # a survivor echoes the notice it got
            notices.append(message)
            if len(notices) == 2:
                master.stop()

    master.on("message", on_message)
    code = master.run()
    print(f"unexpected exits: {notifier.crashes}")
    sys.exit(code)
else:
    worker = pycluster.worker
    stop = threading.Event()
    worker.on("disconnect", stop.set)

    def on_message(message):
        if message == "crash":
            os._exit(1)
        print(f"worker {worker.id} heard: {message}", flush=True)
        worker.send(message)

    worker.on("message", on_message)
    worker.send("up")
    stop.wait(30)
