"""The plugin API: install, remove, blame, order, and discovery through entry points."""

from __future__ import annotations

import textwrap

import pytest
from helpers import Events, run, script

import pycluster


def make(tmp_path, body="import pycluster\n", **settings):
    return pycluster.Master(exec=script(tmp_path, body), kill_timeout=10, **settings)


class Recorder:
    """A plugin that records the events it sees under its name."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def install(self, master):
        master.on("fork", lambda w: self.log.append((self.name, "fork", w.id)))
        master.on("exit", lambda w, c, s: self.log.append((self.name, "exit", w.id)))


def test_plugins_run_in_installation_order(tmp_path):
    """Several plugins listen to the same event; they run in the order they were installed,
    and use() chains."""
    log = []
    master = make(tmp_path)
    first, second = Recorder("a", log), Recorder("b", log)
    assert master.use(first).use(second) is master
    assert master.plugins == (first, second)
    master.fork()
    run(master)
    assert log == [("a", "fork", 1), ("b", "fork", 1), ("a", "exit", 1), ("b", "exit", 1)]


def test_unuse_leaves_no_listener_behind(tmp_path):
    """unuse() removes every listener the plugin added, calls its uninstall(), and the
    master's listeners are as before."""
    log, calls = [], []
    master = make(tmp_path)
    before = {e: list(master.listeners(e)) for e in ("fork", "exit")}
    plugin = Recorder("a", log)
    plugin.uninstall = lambda m: calls.append(m)
    master.use(plugin)
    assert all(len(master.listeners(e)) == len(before[e]) + 1 for e in before)
    master.unuse(plugin)
    assert {e: master.listeners(e) for e in before} == before
    assert calls == [master] and master.plugins == ()
    master.fork()
    run(master)
    assert log == []
    with pytest.raises(pycluster.StateError, match="not installed"):
        master.unuse(plugin)


def test_failing_plugin_handler_is_an_error_naming_the_plugin(tmp_path):
    """A plugin handler that raises becomes an error event carrying a PluginError that names
    the plugin and the event; other plugins still see the event and the master carries on."""
    log, errors = [], []

    class Broken:
        name = "broken"

        def install(self, master):
            master.on("fork", self.explode)

        def explode(self, worker):
            raise KeyError("oops")

    master = make(tmp_path)
    master.on("error", errors.append)
    master.use(Broken()).use(Recorder("ok", log))
    master.fork()
    assert run(master) == 0
    assert log == [("ok", "fork", 1), ("ok", "exit", 1)]
    (error,) = errors
    assert isinstance(error, pycluster.PluginError)
    assert error.plugin == "broken" and error.event == "fork"
    assert "broken" in str(error) and isinstance(error.__cause__, KeyError)


def test_plugin_may_be_a_function(tmp_path):
    """A plain function(master) is a plugin too, removable with unuse()."""
    seen = []

    def count_forks(master):
        master.on("fork", lambda w: seen.append(w.id))

    master = make(tmp_path)
    master.use(count_forks)
    master.fork()
    run(master)
    assert seen == [1]


def test_bad_plugins_are_clear_errors(tmp_path):
    """An unknown name lists the installed plugins; a non-plugin, options with an object,
    and installing the same object twice are each a clear error."""
    master = make(tmp_path)
    with pytest.raises(pycluster.SettingsError, match=r"no plugin named 'nope'.*respawn"):
        master.use("nope")
    with pytest.raises(pycluster.SettingsError, match="is not a plugin"):
        master.use(42)
    plugin = Recorder("a", [])
    with pytest.raises(pycluster.SettingsError, match="go with a plugin name"):
        master.use(plugin, option=1)
    with pytest.raises(pycluster.SettingsError, match="does not accept the options"):
        master.use("respawn", no_such_option=1)
    master.use(plugin)
    with pytest.raises(pycluster.StateError, match="already installed"):
        master.use(plugin)


def test_failing_install_leaves_nothing_behind(tmp_path):
    """A plugin whose install() raises is not installed and its listeners are removed."""

    def half(master):
        master.on("exit", lambda *a: None)
        raise RuntimeError("install failed")

    master = make(tmp_path)
    with pytest.raises(RuntimeError, match="install failed"):
        master.use(half)
    assert master.listeners("exit") == [] and master.plugins == ()


def test_builtins_are_registered_entry_points():
    """The built-in plugins are found by name through the pycluster.plugins group."""
    from pycluster.plugins.logging import Logging
    from pycluster.plugins.reload import Reload
    from pycluster.plugins.respawn import Respawn

    master = pycluster.Master(exec=__file__)
    master.use("respawn", max_restarts=3).use("reload", surge=2).use("logging")
    kinds = [type(p) for p in master.plugins]
    assert kinds == [Respawn, Reload, Logging]
    assert master.plugins[0].max_restarts == 3 and master.plugins[1].surge == 2
    master.unuse(master.plugins[2])


def test_third_party_plugin_found_through_entry_point(tmp_path, monkeypatch):
    """A distribution that registers a plugin in the pycluster.plugins entry-point group
    is found by name, made with the given options, and works."""
    site = tmp_path / "site"
    package = site / "restart_counter.py"
    site.mkdir()
    package.write_text(textwrap.dedent("""
        class RestartCounter:
            name = "restart-counter"

            def __init__(self, label="exits"):
                self.label, self.count = label, 0

            def install(self, master):
                master.on("exit", self.on_exit)

            def on_exit(self, worker, code, signal):
                self.count += 1
    """))
    info = site / "restart_counter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: restart-counter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[pycluster.plugins]\nrestart-counter = restart_counter:RestartCounter\n"
    )
    monkeypatch.syspath_prepend(str(site))
    master = make(tmp_path)
    master.use("restart-counter", label="x")
    (plugin,) = master.plugins
    assert type(plugin).__name__ == "RestartCounter" and plugin.label == "x"
    for _ in range(2):
        master.fork()
    run(master)
    assert plugin.count == 2


def test_call_later_keeps_the_master_running(tmp_path):
    """call_later() from a handler keeps run() going until the call has run (it can fork),
    and a cancelled timer lets the master end."""
    master = make(tmp_path)
    events = Events(master)
    fired = []

    def on_exit(worker, code, signal):
        if worker.id == 1:
            master.call_later(0.2, lambda: fired.append(master.fork().id))
            master.call_later(3600, fired.append, "never").cancel()

    master.on("exit", on_exit)
    master.fork()
    assert run(master) == 0
    assert fired == [2]
    assert [w.id for (w, *_) in events.of("exit")] == [1, 2]
    with pytest.raises(pycluster.StateError, match="running master"):
        master.call_later(1, print)
