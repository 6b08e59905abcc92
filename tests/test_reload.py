"""Reload without restart: SIGHUP or `wxtoken reload` re-reads the config; unchanged apps make no
call, a refused config leaves the running one."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from wxtoken.config import parse_config
from wxtoken.emulator import Emulator
from wxtoken.reload import plan

from helpers import (
    APPID,
    APPID2,
    NOBODY,
    SECRET,
    SECRET2,
    DaemonProcess,
    curl,
    read_json,
    run_cli,
    socket_of,
    wait_until,
)

MAIN: dict[str, dict[str, object]] = {"main": {"appid": APPID, "secret": SECRET}}
MINI: dict[str, dict[str, object]] = {
    "mini": {"appid": APPID2, "secret": SECRET2, "api": "stable_token"}}



def test_the_plan_says_what_a_reload_changes() -> None:
    """Added, removed and changed apps; an app-wide key changes every app; restart-only keys
    are named."""
    apps = {"a": {"appid": "wx000000000000000a", "secret": "s-a"},
            "b": {"appid": "wx000000000000000b", "secret": "s-b"}}
    old = parse_config({"apps": apps}, "c.toml")
    new = parse_config({"apps": {"a": apps["a"], "b": {**apps["b"], "tickets": ["jsapi"]},
                                 "c": {"appid": "wx000000000000000c", "secret": "s-c"}}}, "c.toml")
    p = plan(old, new)
    assert (p.added, p.removed, p.changed, p.unchanged) == (("c",), (), ("b",), ("a",))
    assert p.summary() == "added c; changed b" and not p.needs_restart
    wide = plan(old, parse_config({"apps": apps, "renew_before": 120}, "c.toml"))
    assert wide.changed == ("a", "b") and wide.new_client
    moved = plan(old, parse_config({"apps": apps, "state_dir": "/srv/x"}, "c.toml"))
    assert moved.needs_restart == ("state_dir",)
    assert moved.problems("c.toml") == [
        "c.toml: state_dir: changed, which takes a restart (systemctl restart wxtoken); the "
        "running config stays"]


def rewrite(config: Path, apps: dict[str, dict[str, object]], **top: object) -> None:
    import tomllib

    from helpers import write_config
    current = tomllib.loads(config.read_text())
    current.pop("apps")
    current.update(top)
    write_config(config, current, apps)


def test_apps_added_removed_and_changed_under_a_running_daemon(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken reload`: an added app starts, a changed one takes its settings (a ticket, no
    token call), a removed one stops (its file stays), an unchanged one makes no call."""
    config = make_config(MAIN, refresh_interval=3600)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    main_token = read_json(state / "main.json")["access_token"]
    rewrite(config, {**MAIN, **MINI})
    added = run_cli("reload", "--config", str(config))
    assert added.returncode == 0 and added.stdout.strip() == "reloaded: added mini"
    d.wait_for("token.refreshed", count=2)
    assert emulator.calls(APPID) == 1 and emulator.calls(APPID2) == 1
    rewrite(config, {"main": {**MAIN["main"], "tickets": ["jsapi"]}})
    changed = run_cli("reload", "--config", str(config))
    assert changed.stdout.strip() == "reloaded: removed mini; changed main"
    d.wait_for("ticket.refreshed")  # logged when fetched: the file is written right after
    wait_until(lambda: "jsapi_ticket" in read_json(state / "main.json"), timeout=5)
    data = read_json(state / "main.json")
    assert data["access_token"] == main_token and "jsapi_ticket" in data
    assert emulator.calls(APPID, "token") == 1  # the ticket came with the token it had
    assert (state / "mini.json").exists()  # a removed app's file stays until it expires
    time.sleep(1)  # a call for a removed or unchanged app, were one coming, comes within this
    assert d.stop() == 0
    assert emulator.calls(APPID2) == 1
    reloaded = [e for e in d.events() if e["event"] == "config.reloaded"]
    assert [e["changes"] for e in reloaded] == ["added mini", "removed mini; changed main"]


def test_an_invalid_config_is_refused_and_the_old_one_keeps_running(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A broken config on reload: exit 78 with the same one-line problems as check-config, an
    error line in the log, and the daemon refreshes on with the old config. A change only a
    restart can make is refused the same way. SIGHUP reloads too."""
    emulator.state.settings.token_ttl = 6
    config = make_config(MAIN, renew_before=2)
    d = daemons(config)
    d.wait_for("daemon.ready")
    good = config.read_text()
    config.write_text(good + 'refresh_interval = "soon"\n')
    refused = run_cli("reload", "--config", str(config))
    check = run_cli("check-config", "--config", str(config))
    assert refused.returncode == 78 and check.returncode == 78
    lines = refused.stderr.strip().splitlines()
    assert lines == [check.stderr.strip(),
                     "wxtoken: reload refused; the running config stays"]
    failed = d.wait_for("config.reload_refused")
    assert failed["level"] == "error" and "refresh_interval" in failed["problems"][0]
    d.wait_for("token.refreshed", count=2, timeout=10)  # still refreshing, on the old config
    config.write_text(good.replace(str(config.parent / "state"), str(config.parent / "else")))
    moved = run_cli("reload", "--config", str(config))
    assert moved.returncode == 78 and "state_dir: changed, which takes a restart" in moved.stderr
    config.write_text(good)
    rewrite(config, {**MAIN, **MINI})
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_for("config.reloaded")
    d.wait_for("token.refreshed", count=1, timeout=10)
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_only_the_operator_may_reload_and_systemd_hears_reloading(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A token reader is refused (403); a reload sends RELOADING=1 with MONOTONIC_USEC, then
    READY=1."""
    config = make_config(MAIN)
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(sock_path)
        server.settimeout(10)
        d = daemons(config, env={"NOTIFY_SOCKET": sock_path})
        while server.recv(200) != b"READY=1":
            pass
        if os.geteuid() == 0:
            sock = socket_of(config)
            reader = curl(sock, "-w", "\n%{http_code}", "-X", "POST", "-d", "{}",
                          "http://localhost/v1/reload", user=NOBODY,
                          groups=[os.stat(sock).st_gid])
            body, code = reader.stdout.rsplit("\n", 1)
            assert code == "403" and json.loads(body)["error_class"] == "forbidden"
        assert run_cli("reload", "--config", str(config)).returncode == 0
        messages = []
        while "READY=1" not in messages:
            messages.append(server.recv(200).decode())
    reloading = [m for m in messages if m.startswith("RELOADING=1")]
    assert reloading and "\nMONOTONIC_USEC=" in reloading[0]
    assert messages.index(reloading[0]) < messages.index("READY=1")
    assert d.stop() == 0
