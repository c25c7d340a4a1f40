"""IPC messages both ways between a real master and real workers: order, volume, threads,
internal-looking messages, bad values, size limits, closed channels, pickle, hostile
workers and failing handlers.

Each test runs a real master in this process and real worker processes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from helpers import Events, http_get, run, script

import pycluster

#: A worker that echoes every message (with the thread that handled it and its own state)
#: until the master disconnects it. It has no ``disconnect`` handler, so a ``disconnect``
#: that was acted on would end it at once.
ECHO = """
    import threading, pycluster
    w = pycluster.worker
    def on_message(m):
        w.send({"echo": m, "thread": threading.current_thread().name,
                "state": w.state.value, "connected": w.is_connected()})
    w.on("message", on_message)
    w.send("ready")
    threading.Event().wait(120)
"""


def make(tmp_path: Path, body: str = ECHO, **settings: Any) -> pycluster.Master:
    settings.setdefault("kill_timeout", 10)
    return pycluster.Master(exec=script(tmp_path, body), **settings)


def value(i: int) -> dict[str, Any]:
    """The i-th message of a stream: varied JSON types, unicode, growing sizes."""
    return {"n": i, "s": "é✓\n\"" * (i % 7), "l": [None, True, False, i / 4, -i], "d": {"k": [i]}}


VALUE_SRC = '''
def value(i):
    return {"n": i, "s": "é✓\\n\\"" * (i % 7), "l": [None, True, False, i / 4, -i], "d": {"k": [i]}}
'''


# -- volume and order ----------------------------------------------------------------------


def test_thousand_messages_each_way_arrive_complete_and_in_order(tmp_path):
    """1000 messages worker→master and 1000 master→worker all arrive, equal, in order,
    on the worker handle and on the master (the same worker object)."""
    body = VALUE_SRC + """
import threading, pycluster
w = pycluster.worker
got = []
done = threading.Event()
def on_message(m):
    got.append(m)
    if len(got) == 1000:
        done.set()
w.on("message", on_message)
w.send("ready")
for i in range(1000):
    w.send(value(i))
done.wait(60)
w.send({"got": got})
"""
    master = make(tmp_path, body)
    worker = master.fork()
    on_handle: list[Any] = []
    on_master: list[Any] = []
    worker.on("message", on_handle.append)

    def on_message(w, m):
        on_master.append((w, m))
        if m == "ready":
            for i in range(1000):
                assert w.send(value(i)) is True

    master.on("message", on_message)
    assert run(master) == 0
    assert all(w is worker for w, _ in on_master)
    messages = [m for _, m in on_master]
    assert messages == on_handle
    assert messages[0] == "ready"
    assert messages[1:1001] == [value(i) for i in range(1000)]
    assert messages[1001:] == [{"got": [value(i) for i in range(1000)]}]
    assert (worker.exit_code, worker.signal_code) == (0, None)


def test_messages_sent_right_after_fork_reach_a_slow_starting_worker(tmp_path):
    """Messages the master sends at once after fork() — before the worker's startup code
    added its ``message`` handler — are not lost: they arrive, in order, once it does
    (Node delivers them after the worker's synchronous startup)."""
    body = """
        import fcntl, linecache, re, struct, sys, termios, threading, time, pycluster
        w = pycluster.worker

        def reader_idle():
            # The IPC thread has taken every byte off the socket and waits for more
            # (in poll() or a blocking recvmsg()): what the master sent before this
            # worker started has been handled.
            unread = fcntl.ioctl(w._sock.fileno(), termios.FIONREAD, b"\\0" * 4)
            frame = sys._current_frames().get(w._reader.ident)
            while frame is not None and frame.f_code.co_name != "_read_frames":
                frame = frame.f_back
            return (struct.unpack("i", unread)[0] == 0 and frame is not None
                    and re.search(r"\\b(poll|recvmsg)\\(",
                                  linecache.getline(frame.f_code.co_filename, frame.f_lineno)))

        # startup work (imports, config) that outlasts the arrival of the first messages
        deadline = time.monotonic() + 20
        while not reader_idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        got = []
        done = threading.Event()
        w.on("message", lambda m: (got.append(m), len(got) == 50 and done.set()))
        done.wait(20)
        w.send(got)
    """
    master = make(tmp_path, body)
    worker = master.fork()
    for i in range(50):
        worker.send(i)
    events = Events(master)
    assert run(master) == 0
    assert events.of("message") == [(worker, list(range(50)))]


# -- threads: synchronous and asyncio workers -------------------------------------------------

SERVE_FOREVER = """
    import http.server, threading, pycluster
    w = pycluster.worker
    sock = w.listen(0, "127.0.0.1")

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello from %d" % w.id
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(sock.getsockname(), Hello, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    w.on("message", lambda m: w.send({"echo": m, "thread": threading.current_thread().name,
                                      "main_busy": threading.main_thread().is_alive()}))
    w.on("disconnect", lambda: threading.Thread(target=server.shutdown).start())
    w.send("ready")
    server.serve_forever()  # the main thread is blocked here for the worker's whole life
"""

SLEEP_LOOP = """
    import threading, time, pycluster
    w = pycluster.worker
    w.on("message", lambda m: w.send({"echo": m, "thread": threading.current_thread().name,
                                      "main_busy": threading.main_thread().is_alive()}))
    w.send("ready")
    while True:  # plain synchronous code that never yields to pycluster
        time.sleep(0.05)
"""


@pytest.mark.parametrize("body", [SERVE_FOREVER, SLEEP_LOOP], ids=["serve_forever", "sleep_loop"])
def test_sync_worker_receives_messages_while_its_main_thread_is_blocked(tmp_path, body):
    """A worker whose main thread is blocked in plain synchronous code (http.server's
    serve_forever, a sleep loop) still gets every message, on the pycluster-ipc thread, and
    (serve_forever) keeps serving HTTP at the same time; disconnect then ends it with 0."""
    master = make(tmp_path, body)
    worker = master.fork()
    echoes: list[Any] = []
    served: list[bytes] = []
    ports: list[int] = []
    master.on("listening", lambda w, address: ports.append(address.port))

    def on_message(w, m):
        if m == "ready":
            for i in range(20):
                w.send(value(i))
            return
        echoes.append(m)
        if len(echoes) == 20:
            if ports:
                served.append(http_get(ports[0]))
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    assert [e["echo"] for e in echoes] == [value(i) for i in range(20)]
    assert {e["thread"] for e in echoes} == {"pycluster-ipc"}
    assert all(e["main_busy"] for e in echoes)
    if body is SERVE_FOREVER:
        assert len(served) == 1
        assert served[0].startswith(b"HTTP/1.0 200")
        assert served[0].endswith(b"hello from 1")
    assert (worker.exit_code, worker.signal_code, worker.exited_after_disconnect) == (0, None, True)


def test_asyncio_worker_handlers_run_on_the_attached_loop(tmp_path):
    """In an asyncio worker that called attach_loop(), message and disconnect handlers run on
    the loop's thread (asyncio calls work inside them) while it serves with start_server."""
    body = """
        import asyncio, threading, pycluster

        async def handle(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.0 200 OK\\r\\n\\r\\nasync hello")
            await writer.drain()
            writer.close()

        async def main():
            w = pycluster.worker
            w.attach_loop()
            loop_thread = threading.get_ident()
            done = asyncio.Event()

            def on_message(m):
                try:
                    asyncio.get_running_loop()
                    running = True
                except RuntimeError:
                    running = False
                w.send({"echo": m, "on_loop": threading.get_ident() == loop_thread,
                        "running_loop": running, "thread": threading.current_thread().name})

            def on_disconnect():
                asyncio.get_running_loop()  # raises (an error event) off the loop
                done.set()

            w.on("message", on_message)
            w.on("disconnect", on_disconnect)
            server = await asyncio.start_server(handle, sock=w.listen(0, "127.0.0.1"))
            w.send("ready")
            async with server:
                await asyncio.wait_for(done.wait(), 60)
            w.send("loop saw disconnect")  # raises: the worker is disconnecting

        try:
            asyncio.run(main())
        except pycluster.ChannelClosedError:
            pass
    """
    master = make(tmp_path, body)
    worker = master.fork()
    echoes: list[Any] = []
    served: list[bytes] = []
    ports: list[int] = []
    master.on("listening", lambda w, address: ports.append(address.port))

    def on_message(w, m):
        if m == "ready":
            for i in range(10):
                w.send(value(i))
            return
        echoes.append(m)
        if len(echoes) == 10:
            served.append(http_get(ports[0]))
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    assert [e["echo"] for e in echoes] == [value(i) for i in range(10)]
    assert all(e["on_loop"] and e["running_loop"] for e in echoes)
    assert {e["thread"] for e in echoes} == {"MainThread"}
    assert served == [b"HTTP/1.0 200 OK\r\n\r\nasync hello"]
    assert (worker.exit_code, worker.signal_code, worker.exited_after_disconnect) == (0, None, True)


# -- user messages that look internal ---------------------------------------------------------

SHAPES: list[Any] = [
    {"act": "disconnect"},
    {"act": "disconnecting"},
    {"act": "online"},
    {"act": "listen", "seq": 1, "host": "127.0.0.1", "port": 0, "backlog": 5},
    {"act": "listening", "of": 1},
    {"act": "reply", "seq": 1, "ok": True, "host": "127.0.0.1", "port": 1},
    {"cmd": "NODE_CLUSTER", "act": "online"},
    {"cmd": "NODE_CLUSTER", "act": "disconnect", "ack": -1},
    {"cmd": "NODE_CLUSTER", "act": "queryServer", "seq": 0},
    "disconnect",
]


def test_internal_looking_messages_from_master_are_plain_messages(tmp_path):
    """Messages shaped like cluster control messages ({"act": "disconnect"}, a listen
    reply, Node's {"cmd": "NODE_CLUSTER", ...}) sent by the master reach the worker's
    ``message`` handler unchanged and are not acted on: the worker (which has no
    disconnect handler, so a real disconnect would end it) stays online and connected."""
    master = make(tmp_path)
    worker = master.fork()
    events = Events(master)
    echoes: list[Any] = []

    def on_message(w, m):
        if m == "ready":
            for shape in SHAPES:
                w.send(shape)
            return
        echoes.append(m)
        if len(echoes) == len(SHAPES):
            echoes.append(("master view", w.state, w.exited_after_disconnect, w.is_connected()))
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    assert [e["echo"] for e in echoes[:-1]] == SHAPES
    assert {(e["state"], e["connected"]) for e in echoes[:-1]} == {("online", True)}
    assert echoes[-1] == ("master view", pycluster.WorkerState.ONLINE, None, True)
    assert events.names(worker) == ["fork", "online", "message"] + ["message"] * len(SHAPES) + [
        "disconnect", "exit"]
    assert (worker.exit_code, worker.signal_code, worker.exited_after_disconnect) == (0, None, True)


def test_internal_looking_messages_from_worker_are_plain_messages(tmp_path):
    """The same shapes sent by a worker are ``message`` events in the master, never acted
    on: no listening event, no port bound, the worker is not marked as disconnecting, no
    kill timer, no error; its state stays online until the master disconnects it."""
    body = f"""
        import threading, pycluster
        w = pycluster.worker
        for shape in {SHAPES!r}:
            w.send(shape)
        w.send("done")
        threading.Event().wait(120)
    """
    master = make(tmp_path, body, kill_timeout=0.5)
    worker = master.fork()
    events = Events(master)
    seen: list[Any] = []

    def on_message(w, m):
        if m == "done":
            seen.append((w.state, w.exited_after_disconnect, w.is_connected()))
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    assert [m for _, m in events.of("message")] == [*SHAPES, "done"]
    assert seen == [(pycluster.WorkerState.ONLINE, None, True)]
    assert events.of("listening") == []
    assert events.of("error") == []
    assert events.names(worker) == ["fork", "online"] + ["message"] * (len(SHAPES) + 1) + [
        "disconnect", "exit"]
    # it had no disconnect handler: a real disconnect ends it with 0, not with the SIGKILL
    # a worker that was merely marked as disconnecting would get after kill_timeout
    assert (worker.exit_code, worker.signal_code, worker.exited_after_disconnect) == (0, None, True)


# -- values that cannot be sent -----------------------------------------------------------------

UNSENDABLE = [
    pytest.param({1, 2}, r"cannot send \{1, 2\}", id="set"),
    pytest.param(object(), r"cannot send <object object at 0x", id="object"),
    pytest.param(float("nan"), r"cannot send nan", id="nan"),
    pytest.param({"ok": [1, float("inf")]}, r"cannot send \{'ok': \[1, inf\]\}", id="nested-inf"),
    pytest.param(b"raw", r"cannot send b'raw'", id="bytes"),
]


@pytest.mark.parametrize(("bad", "shown"), UNSENDABLE)
def test_master_send_of_unserializable_value_raises_and_channel_survives(tmp_path, bad, shown):
    """worker.send() of a value JSON cannot carry raises MessageError naming the value, sends
    nothing, and the next message still arrives intact."""
    master = make(tmp_path)
    worker = master.fork()
    raised: list[BaseException] = []
    echoes: list[Any] = []

    def on_message(w, m):
        if m == "ready":
            try:
                w.send(bad)
            except pycluster.MessageError as exc:
                raised.append(exc)
            w.send({"after": "the bad one"})
            return
        echoes.append(m["echo"])
        w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    assert len(raised) == 1
    with pytest.raises(pycluster.MessageError, match=shown):
        raise raised[0]
    assert isinstance(raised[0], ValueError)  # MessageError is also a ValueError
    assert echoes == [{"after": "the bad one"}]
    assert (worker.exit_code, worker.signal_code) == (0, None)


def test_worker_send_of_unserializable_value_raises_and_channel_survives(tmp_path):
    """pycluster.worker.send() of a set, an object, NaN or bytes raises MessageError in the
    worker naming the value; nothing reaches the master, and later messages still do."""
    body = """
        import pycluster
        w = pycluster.worker
        for bad in ({1, 2}, object(), float("nan"), b"raw"):
            try:
                w.send(bad)
            except pycluster.MessageError as exc:
                w.send({"error": str(exc), "type": type(exc).__name__})
            else:
                w.send({"error": None})
        w.send("after")
    """
    master = make(tmp_path, body)
    events = Events(master)
    master.fork()
    assert run(master) == 0
    messages = [m for _, m in events.of("message")]
    assert messages[-1] == "after"
    assert len(messages) == 5
    assert {m["type"] for m in messages[:-1]} == {"MessageError"}
    for message, shown in zip(messages[:-1], ["cannot send {1, 2}", "cannot send <object object at",
                                             "cannot send nan", "cannot send b'raw'"],
                               strict=True):
        assert message["error"].startswith(shown), message
    assert events.of("error") == []


def test_oversized_messages_raise_in_either_sender_and_channel_survives(tmp_path):
    """With max_message_size=1024 a larger message raises MessageError (naming its size and
    the limit) in the master's and in the worker's send(); one of exactly 1024 bytes still
    goes through both ways, and the channel keeps working."""
    body = """
        import threading, pycluster
        w = pycluster.worker
        w.on("message", lambda m: w.send({"len": len(m)}))
        try:
            w.send("y" * 1100)
        except pycluster.MessageError as exc:
            w.send({"error": str(exc)})
        w.send("z" * 1022)  # 1024 bytes of JSON: exactly the limit
        threading.Event().wait(120)
    """
    master = make(tmp_path, body, max_message_size=1024)
    worker = master.fork()
    events = Events(master)
    raised: list[BaseException] = []

    def on_message(w, m):
        if m == "z" * 1022:
            try:
                w.send("x" * 1100)
            except pycluster.MessageError as exc:
                raised.append(exc)
            w.send("x" * 1022)
        elif isinstance(m, dict) and "len" in m:
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    messages = [m for _, m in events.of("message")]
    assert messages[0] == {"error": "cannot send a message of 1102 bytes: the limit is 1024 bytes "
                                    "(raise Master(max_message_size=...) or send less)"}
    assert messages[1:] == ["z" * 1022, {"len": 1022}]
    assert len(raised) == 1
    with pytest.raises(pycluster.MessageError, match=r"1102 bytes: the limit is 1024 bytes"):
        raise raised[0]
    assert events.of("error") == []
    assert (worker.exit_code, worker.signal_code) == (0, None)


# -- closed channels ---------------------------------------------------------------------------


def test_send_to_a_dead_worker_raises_channel_closed(tmp_path):
    """send() to a worker that has exited raises ChannelClosedError at once, in its exit
    handler and after run() returned."""
    master = make(tmp_path, "import pycluster\n")
    worker = master.fork()
    raised: list[BaseException] = []

    def on_exit(w, code, sig):
        try:
            w.send("too late")
        except pycluster.ChannelClosedError as exc:
            raised.append(exc)

    master.on("exit", on_exit)
    assert run(master) == 0
    assert [str(e) for e in raised] == ["cannot send to worker 1: it is dead"]
    with pytest.raises(pycluster.ChannelClosedError, match="worker 1: it is dead"):
        worker.send("later still")
    assert isinstance(raised[0], BrokenPipeError)


@pytest.mark.parametrize("how", ["primary-disconnect", "worker-exits"])
def test_send_to_a_disconnected_worker_raises_channel_closed(tmp_path, how):
    """Once a worker's channel is closed (its ``disconnect`` event), send() raises
    ChannelClosedError at once instead of queueing or hanging — whether the master
    disconnected it or it went away by itself."""
    body = ECHO if how == "primary-disconnect" else """
        import pycluster
        pycluster.worker.send("ready")
    """
    master = make(tmp_path, body)
    worker = master.fork()
    raised: list[BaseException] = []

    def on_disconnect():
        try:
            worker.send("too late")
        except pycluster.ChannelClosedError as exc:
            raised.append(exc)
        raised.append(worker.is_connected())

    worker.on("disconnect", on_disconnect)
    if how == "primary-disconnect":
        master.on("message", lambda w, m: w.disconnect())
    assert run(master) == 0
    assert len(raised) == 2
    assert raised[1] is False
    with pytest.raises(pycluster.ChannelClosedError, match=r"cannot send to worker 1: it is "):
        raise raised[0]  # type: ignore[misc]


def test_worker_send_after_its_own_disconnect_raises_channel_closed(tmp_path):
    """In a worker, send() after disconnect() raises ChannelClosedError at once (nothing is
    queued and nothing hangs); the worker then exits 0 after its disconnect handler."""
    body = """
        import sys, threading, pycluster
        w = pycluster.worker
        done = threading.Event()
        w.on("disconnect", done.set)
        w.send("before")
        w.disconnect()
        try:
            w.send("after")
        except pycluster.ChannelClosedError as exc:
            print("raised:", type(exc).__name__, exc, flush=True)
        done.wait(60)
        sys.exit(0)
    """
    master = make(tmp_path, body, silent=True)
    worker = master.fork()
    events = Events(master)
    lines: list[tuple[str, str]] = []
    master.on("output", lambda w, stream, line: lines.append((stream, line)))
    assert run(master) == 0
    assert [m for _, m in events.of("message")] == ["before"]
    assert lines == [
        ("stdout", "raised: ChannelClosedError cannot send: worker 1 is disconnecting")]
    assert (worker.exit_code, worker.signal_code, worker.exited_after_disconnect) == (0, None, True)


# -- pickle ------------------------------------------------------------------------------------


def test_pickle_serialization_round_trips_values_json_cannot_carry(tmp_path):
    """With serialization="pickle", sets, tuples, bytes, frozensets and complex numbers go
    master→worker and worker→master with their types intact."""
    body = """
        import threading, pycluster
        w = pycluster.worker
        w.on("message", lambda m: w.send(("echo", m, [type(v).__name__ for v in m])))
        w.send({"from": "worker", "set": {1, 2, 3}, "tuple": (1, "a"), "bytes": b"\\x00\\xff"})
        threading.Event().wait(120)
    """
    sent = [{1, 2}, (1, "a", None), b"\x00raw\xff", frozenset({"x"}), 1 + 2j, {(1, 2): "k"}]
    master = make(tmp_path, body, serialization="pickle")
    worker = master.fork()
    events = Events(master)

    def on_message(w, m):
        if isinstance(m, dict):
            w.send(sent)
        else:
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    (_, first), (_, echo) = events.of("message")
    assert first == {"from": "worker", "set": {1, 2, 3}, "tuple": (1, "a"), "bytes": b"\x00\xff"}
    assert isinstance(first["tuple"], tuple)
    assert echo == ("echo", sent, ["set", "tuple", "bytes", "frozenset", "complex", "dict"])
    assert events.of("error") == []
    assert (worker.exit_code, worker.signal_code) == (0, None)


# -- hostile workers ---------------------------------------------------------------------------

HOSTILE = """
    import json, os, pickle, socket, struct, time, pycluster
    w = pycluster.worker
    HEADER = struct.Struct(">IB")

    def frame(kind, payload):
        return HEADER.pack(len(payload), kind) + payload

    def control(**fields):
        return frame(0, json.dumps(fields).encode())

    class Canary:  # unpickling it in the master would create the canary directory
        def __reduce__(self):
            return (os.mkdir, (os.environ["CANARY"],))

    BAD = {
        "garbage": b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
        "truncated": HEADER.pack(100, 1) + b'"only part of it',
        "huge-header": HEADER.pack(100 * 1024 * 1024, 1),
        "invalid-utf8-json": frame(1, b'"\\xff\\xfe"'),
        "invalid-utf8-control": frame(0, b'{"act": "\\xff"}'),
        "control-not-object": frame(0, b"[1, 2]"),
        "second-online": control(act="online"),
        "listening-without-listen": control(act="listening", of=7),
        "malformed-listen": control(act="listen", seq="x", port=-5, backlog=0),
        "pickle-on-json": frame(2, pickle.dumps(Canary())),
        "deep-json": frame(1, b"[" * 100000 + b"]" * 100000),
        "listen-huge-backlog": control(act="listen", seq=1, host="127.0.0.1", port=0,
                                       backlog=10**30),
        "listen-nul-in-path": control(act="listen", seq=1, backlog=5,
                                      path=os.environ["CANARY"] + "\\0.sock"),
    }
    mode = os.environ["MODE"]
    w.send("ready")
    w._sock.sendall(BAD[mode])
    if mode == "truncated":
        w._sock.shutdown(socket.SHUT_WR)  # the rest of the frame will never come
    while True:  # it does not leave by itself: the master must end it
        time.sleep(1)
"""


#: Runs good.py or hostile.py (next to it) as the worker's main program.
BY_ROLE = """
    import os, runpy
    here = os.path.dirname(os.path.abspath(__file__))
    runpy.run_path(os.path.join(here, os.environ["ROLE"] + ".py"), run_name="__main__")
"""


@pytest.mark.parametrize("mode", [
    "garbage", "truncated", "huge-header", "invalid-utf8-json", "invalid-utf8-control",
    "control-not-object", "second-online", "listening-without-listen",
    "malformed-listen", "pickle-on-json", "deep-json", "listen-huge-backlog",
    "listen-nul-in-path",
])
def test_hostile_worker_is_an_error_and_is_killed_while_others_carry_on(tmp_path, mode):
    """A worker that writes garbage, a truncated frame, a 100 MiB header, invalid UTF-8, an
    out-of-order or malformed control message (a listen request with a backlog
    no socket takes, or a NUL in its path), a raw pickle frame on a JSON channel (never
    unpickled) or absurdly nested JSON to its IPC socket gets a ProtocolError (with its
    worker_id) on its handle and then on the master, is SIGKILLed, and a second worker in
    the same cluster keeps serving and messaging; run() then completes."""
    script(tmp_path, HOSTILE, "hostile.py")
    script(tmp_path, SERVE_FOREVER, "good.py")
    canary = tmp_path / "canary"
    master = pycluster.Master(exec=script(tmp_path, BY_ROLE), kill_timeout=10,
                              env={"CANARY": str(canary), "MODE": mode})
    good = master.fork(env={"ROLE": "good"})
    hostile = master.fork(env={"ROLE": "hostile"})
    events = Events(master)
    handle_errors: list[BaseException] = []
    order: list[str] = []
    hostile.on("error", lambda exc: (handle_errors.append(exc), order.append("worker")))
    master.on("error", lambda exc: order.append("master"))
    ports: list[int] = []
    checks: dict[str, Any] = {}
    master.on("listening", lambda w, address: ports.append(address.port))

    def check_good() -> None:
        if "ready" in checks and hostile.is_dead() and "pinged" not in checks:
            checks["pinged"] = True
            good.send({"ping": mode})

    def on_message(w, m):
        if w is good and m == "ready":
            checks["ready"] = True
            check_good()
        elif w is good:
            checks["pong"] = m
            checks["http"] = http_get(ports[0])
            good.disconnect()

    master.on("message", on_message)
    hostile.on("exit", lambda code, sig: check_good())
    assert run(master) == 1  # a worker died without being asked to: the documented code 1
    errors = [e for (e,) in events.of("error")]
    assert len(errors) == 1, errors
    assert handle_errors == errors
    assert isinstance(errors[0], pycluster.ProtocolError)
    assert errors[0].worker_id == hostile.id
    assert order == ["worker", "master"]
    assert (hostile.exit_code, hostile.signal_code) == (None, "SIGKILL")
    assert hostile.exited_after_disconnect is False
    assert checks["pong"]["echo"] == {"ping": mode}
    assert checks["http"].endswith(b"hello from %d" % good.id)
    assert (good.exit_code, good.signal_code, good.exited_after_disconnect) == (0, None, True)
    assert not canary.exists(), "the master unpickled a worker's frame"


# -- failing handlers --------------------------------------------------------------------------


def test_failing_message_handlers_in_the_master_become_error_events(tmp_path):
    """A master ``message`` handler (on the master or on a worker handle) that raises
    becomes an ``error`` event on that emitter; the other handlers still run and later
    messages are still delivered."""
    body = """
        import pycluster
        for i in range(3):
            pycluster.worker.send(i)
    """
    master = make(tmp_path, body)
    worker = master.fork()
    delivered: list[Any] = []
    master_errors: list[BaseException] = []
    handle_errors: list[BaseException] = []

    def bad_master(w, m):
        msg = f"master handler bug {m}"
        raise ValueError(msg)

    def bad_handle(m):
        msg = f"handle handler bug {m}"
        raise KeyError(msg)

    worker.on("message", bad_handle)
    worker.on("error", handle_errors.append)
    master.on("message", bad_master)
    master.on("message", lambda w, m: delivered.append(m))
    master.on("error", master_errors.append)
    assert run(master) == 0
    assert delivered == [0, 1, 2]
    assert [str(e) for e in master_errors] == [f"master handler bug {i}" for i in range(3)]
    assert [e.args[0] for e in handle_errors] == [f"handle handler bug {i}" for i in range(3)]


def test_failing_message_handler_in_the_worker_becomes_a_worker_error_event(tmp_path):
    """A worker-side ``message`` handler that raises becomes a worker-side ``error`` event
    (not a crash), and the worker keeps receiving the messages that follow."""
    body = """
        import threading, pycluster
        w = pycluster.worker

        def on_message(m):
            if m == "boom":
                raise RuntimeError("worker handler bug")
            w.send({"echo": m})

        w.on("message", on_message)
        w.on("error", lambda exc: w.send({"error": repr(exc),
                                         "thread": threading.current_thread().name}))
        w.send("ready")
        threading.Event().wait(120)
    """
    master = make(tmp_path, body)
    worker = master.fork()
    events = Events(master)

    def on_message(w, m):
        if m == "ready":
            for message in ("boom", "after", "boom", "last"):
                w.send(message)
        elif m == {"echo": "last"}:
            w.disconnect()

    master.on("message", on_message)
    assert run(master) == 0
    error = {"error": "RuntimeError('worker handler bug')", "thread": "pycluster-ipc"}
    assert [m for _, m in events.of("message")] == [
        "ready", error, {"echo": "after"}, error, {"echo": "last"}]
    assert events.of("error") == []
    assert (worker.exit_code, worker.signal_code, worker.exited_after_disconnect) == (0, None, True)


def test_math_nan_is_refused_not_sent_as_invalid_json(tmp_path):
    """JSON has no NaN or Infinity: the master refuses to send them (the worker would get a
    frame other JSON peers cannot parse), and the same values nested deep are found too."""
    master = make(tmp_path, "import pycluster\n")
    worker = master.fork()
    for bad in (math.nan, [[{"x": -math.inf}]], {"deep": [[[[math.inf]]]]}):
        with pytest.raises(pycluster.MessageError, match="does not serialize as json"):
            worker.send(bad)
    assert run(master) == 0
