"""The fleet mode: several daemons (hosts) on one real redis-server, against the emulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from wxtoken.emulator import Emulator

from helpers import APPID, SECRET, DaemonProcess, read_json
from redis_server import RedisServer

MAIN = {"main": {"appid": APPID, "secret": SECRET}}
FOLLOW = {"main": {"appid": APPID}}  # no secret: this host follows the app


def state_of(config: Path) -> Path:
    return config.parent / "state"


def test_three_hosts_make_one_call_per_refresh_and_every_file_follows(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Three hosts refreshing every 2 s for 20 s: one upstream call per period for the fleet,
    and every host's file holds the new token within a second of each refresh."""
    configs = [hosts(MAIN, refresh_interval=2, renew_before=4) for _ in range(3)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    lag: list[float] = []
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tokens = [read_json(state_of(c) / "main.json")["access_token"] for c in configs]
        if len(set(tokens)) > 1:
            started = time.monotonic()
            while len({read_json(state_of(c) / "main.json")["access_token"]
                       for c in configs}) > 1:
                assert time.monotonic() - started < 1.0, "a host lagged more than 1 s"
                time.sleep(0.01)
            lag.append(time.monotonic() - started)
        seen.update(tokens)
        time.sleep(0.02)
    for d in procs:
        assert d.stop() == 0
    calls = emulator.calls()
    assert 9 <= calls <= 13, calls  # 20 s of 2 s periods (+ the first fetch); 3 hosts alone: 30
    refreshed = [e for d in procs for e in d.events() if e["event"] == "token.refreshed"]
    assert len(refreshed) == calls  # every call made by exactly one host
    assert len(seen) >= 9
    assert all(emulator.token_status(t) in (0, 42001) for t in seen)


def test_followers_without_a_secret_keep_current_files_and_call_nothing(
        emulator: Emulator, hosts: Callable[..., Path], daemons: Callable[..., DaemonProcess]
        ) -> None:
    """Two candidates and three followers: the followers' configs hold no secret, they never
    call WeChat, and their files follow every refresh."""
    candidates = [hosts(MAIN, refresh_interval=2, renew_before=4) for _ in range(2)]
    followers = [hosts(FOLLOW, refresh_interval=2, renew_before=4) for _ in range(3)]
    for config in followers:
        assert SECRET not in config.read_text() and "secret" not in config.read_text()
    procs = [daemons(c) for c in candidates + followers]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    time.sleep(8)
    current = read_json(state_of(candidates[0]) / "main.json")["access_token"]
    time.sleep(0.5)
    tokens = {read_json(state_of(c) / "main.json")["access_token"]
              for c in candidates + followers}
    assert len(tokens) == 1 and emulator.token_status(tokens.pop()) == 0
    for d in procs:
        assert d.stop() == 0
    for d in procs[2:]:
        events = [e["event"] for e in d.events()]
        assert "token.refreshed" not in events and "refresh.failed" not in events
    refreshed = [e for d in procs[:2] for e in d.events() if e["event"] == "token.refreshed"]
    assert len(refreshed) == emulator.calls() >= 4
    assert current  # the files were compared while refreshes went on


def test_reports_of_the_stale_token_on_three_hosts_make_one_call(
        emulator: Emulator, hosts: Callable[..., Path], daemons: Callable[..., DaemonProcess]
        ) -> None:
    """20 reports of the same refused token, spread over two candidates and a follower: one
    upstream call for the fleet, and every reporter gets the new token."""
    import threading

    from wxtoken import report_invalid
    from wxtoken.reader import drop_cache

    from helpers import socket_of
    configs = [hosts(MAIN), hosts(MAIN), hosts(FOLLOW)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    old = read_json(state_of(configs[0]) / "main.json")["access_token"]
    emulator.invalidate(old)
    calls = emulator.calls()
    got: list[str] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(20)

    def report(config: Path) -> None:
        barrier.wait()
        try:
            got.append(str(report_invalid("main", old, str(state_of(config)),
                                          socket_of(config))))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report, args=(configs[i % 3],)) for i in range(20)]
    drop_cache()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in procs:
        assert d.stop() == 0
    assert errors == []
    assert len(set(got)) == 1 and got[0] != old and emulator.token_status(got[0]) == 0
    assert emulator.calls() == calls + 1


def test_the_daily_budget_holds_for_the_fleet_across_hosts_and_restarts(
        emulator: Emulator, hosts: Callable[..., Path], daemons: Callable[..., DaemonProcess]
        ) -> None:
    """daily_budget = 4 on three hosts refreshing fast: four calls in all, also after every
    host restarted."""
    configs = [hosts(MAIN, refresh_interval=0.5, renew_before=4, daily_budget=4)
               for _ in range(3)]
    procs = [daemons(c) for c in configs]
    time.sleep(6)
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == 4
    assert any(e["event"] == "budget.exhausted" for d in procs for e in d.events())
    procs = [daemons(c) for c in configs]
    time.sleep(3)
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == 4
