"""The fleet when Redis is in trouble: restarted empty, down for lifetimes, stalled, flushed or
failed over. Several daemons (hosts) on one real redis-server, against the emulator."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wxtoken.emulator import Emulator

from helpers import (
    APPID,
    SECRET,
    DaemonProcess,
    emulator_port,
    iso,
    pids_talking_to,
    read_json,
    state_of,
    wait_until,
)
from redis_server import RedisServer, Sentinels

MAIN = {"main": {"appid": APPID, "secret": SECRET}}
FOLLOW = {"main": {"appid": APPID}}  # no secret: this host follows the app


def test_redis_restarted_empty_is_reseeded_from_the_files_with_no_call(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Redis restarts without persistence: within 10 s of its return the fleet writes the
    record back from a host's valid file, with no upstream call."""
    configs = [hosts(MAIN), hosts(MAIN), hosts(FOLLOW)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    token = read_json(state_of(configs[0]) / "main.json")["access_token"]
    calls = emulator.calls()
    redis_server.restart()
    assert redis_server.client().get(f"wxtoken:{{{APPID}:token}}:record") is None
    back = time.monotonic()
    key = f"wxtoken:{{{APPID}:token}}:record"
    while (raw := redis_server.client().get(key)) is None:
        assert time.monotonic() - back < 10, "not re-seeded within 10 s"
        time.sleep(0.1)
    assert json.loads(raw)["access_token"] == token
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == calls
    assert any(e["event"] == "fleet.reseeded" for d in procs for e in d.events())


def test_redis_down_for_two_lifetimes_stable_token_hosts_stay_valid_and_coordinate_again(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """stable_token, Redis stopped for two token lifetimes: each candidate refreshes on its
    own (normal mode hands all the same token), no candidate's file ever holds an expired or
    refused token; when Redis is back the record is there again and one host refreshes."""
    s = emulator.state.settings
    # the window is wider than the lead (4 s, fetched 2.4-3.2 s before the file's expiry): a
    # token handed on in normal mode carries two whole-second truncations (int(now) + WeChat's
    # int(expires_in)), so its file expires up to 2 s before WeChat's; a 4 s window made the
    # early fetch a "token.unchanged" call now and then (in production: 2 s of a 300 s window)
    s.token_ttl, s.stable_window, s.overlap = 10, 6, 4
    app = {"mini": {"appid": APPID, "secret": SECRET, "api": "stable_token"}}
    candidates = [hosts(app, refresh_interval=60, renew_before=4) for _ in range(2)]
    follower = hosts({"mini": {"appid": APPID, "api": "stable_token"}},
                     refresh_interval=60, renew_before=4)
    procs = [daemons(c) for c in [*candidates, follower]]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    redis_server.stop()
    failures: list[str] = []
    until = time.monotonic() + 22
    while time.monotonic() < until:
        for config in candidates:
            data = read_json(state_of(config) / "mini.json")
            if data["expires_at"] <= time.time():
                failures.append(f"{config.parent.name}: expired token in the file")
            elif (code := emulator.token_status(data["access_token"])) != 0:
                failures.append(f"{config.parent.name}: refused with {code}")
        time.sleep(0.05)
    assert failures == []
    assert any(e["event"] == "refresh.uncoordinated" for d in procs for e in d.events())
    redis_server.start()
    key = f"wxtoken:{{{APPID}:stable_token}}:record"
    back = time.monotonic()
    while redis_server.client().get(key) is None:
        assert time.monotonic() - back < 10, "not re-seeded within 10 s"
        time.sleep(0.1)
    back_at = time.time()
    calls = emulator.calls()
    time.sleep(20)  # two lifetimes with Redis back
    for d in procs:
        assert d.stop() == 0
    # alone, both candidates fetched each new token; coordinated, one host does
    after = [e["token"] for d in procs for e in d.events()
             if e["event"] == "token.refreshed" and iso(e["timestamp"]) > back_at + 1]
    assert after and len(after) == len(set(after)), after
    unchanged = [(d.log_path.parent.name, e["event"], e.get("timestamp")) for d in procs
                 for e in d.events() if e["event"] in ("token.unchanged", "fleet.fetch_fenced",
                                                       "fleet.reseeded", "refresh.failed")
                 and iso(e["timestamp"]) > back_at - 1]
    assert emulator.calls() - calls <= len(after) + 1, (after, unchanged)
    tokens = {read_json(state_of(c) / "mini.json")["access_token"]
              for c in [*candidates, follower]}
    assert len(tokens) == 1


def test_token_candidates_wait_for_renew_before_while_redis_is_down(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """api = "token" with Redis down: no candidate refreshes on its refresh_interval (they would
    retire each other's tokens); each waits for the token's last renew_before, then makes one
    attempt, with a warning."""
    emulator.state.settings.token_ttl = 14
    configs = [hosts(MAIN, refresh_interval=2, renew_before=6) for _ in range(2)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    redis_server.stop()
    calls = emulator.calls()
    time.sleep(14)  # a lifetime: on their interval, two hosts would make ~14 calls
    for d in procs:
        assert d.stop() == 0
    made = emulator.calls() - calls
    assert 1 <= made <= 4, made  # one attempt per host in the token's last renew_before
    warned = [e for d in procs for e in d.events() if e["event"] == "refresh.uncoordinated"]
    assert len(warned) == made and all(e["level"] == "warning" for e in warned)


@pytest.mark.slow
def test_a_sentinel_failover_during_refreshes_leaves_no_dead_token_anywhere(
        emulator: Emulator, hosts: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A master, a replica and three sentinels; the master is killed while the fleet refreshes
    every 2 s: the sentinels promote the replica, the hosts follow, no file ever holds a token
    WeChat refuses, and the fleet makes hardly more calls than its refreshes."""
    s = emulator.state.settings
    s.token_ttl, s.overlap = 20, 3
    sentinels = Sentinels(tmp_path / "sentinel")
    try:
        fleet = {"url": "redis:///0", "sentinels": sentinels.addresses,
                 "service_name": sentinels.name}
        configs = [hosts(MAIN, refresh_interval=2, renew_before=4, redis=fleet),
                   hosts(MAIN, refresh_interval=2, renew_before=4, redis=fleet),
                   hosts(FOLLOW, refresh_interval=2, renew_before=4, redis=fleet)]
        procs = [daemons(c) for c in configs]
        for d in procs:
            d.wait_for("daemon.ready", timeout=20)
        failures: list[str] = []

        def watch(seconds: float) -> None:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                for config in configs:
                    data = read_json(state_of(config) / "main.json")
                    if (code := emulator.token_status(data["access_token"])) != 0:
                        failures.append(f"{config.parent.name}: refused with {code}")
                time.sleep(0.05)

        watch(5)
        calls = emulator.calls()
        started = time.monotonic()
        sentinels.fail_over()
        watch(15)
        period = time.monotonic() - started
        for d in procs:
            assert d.stop() == 0
        assert failures == []
        assert emulator.calls() - calls <= period / 2 + 4
        tokens = {read_json(state_of(c) / "main.json")["access_token"] for c in configs}
        assert len(tokens) == 1
    finally:
        sentinels.stop()


def test_a_short_redis_stall_is_recovered_from(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Redis frozen for 7 s (SIGSTOP: commands time out, the subscription stays up), then
    thawed: the candidate coordinates again (its refreshes reach Redis and the follower), and
    says Redis is up."""
    configs = [hosts(MAIN, refresh_interval=2, renew_before=4), hosts(FOLLOW)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    time.sleep(7)  # the stall: longer than the commands' timeouts (redis.down)
    os.kill(redis_server.proc.pid, signal.SIGCONT)
    thawed = int(time.time())

    def record() -> dict[str, Any]:
        raw = redis_server.client().get(f"wxtoken:{{{APPID}:token}}:record")
        return json.loads(raw) if raw else {}

    # refreshes go through Redis again: two more after the thaw (2 s periods)
    wait_until(lambda: record().get("refreshed_at", 0) >= thawed + 2, timeout=15)
    fleet = json.loads((state_of(configs[0]) / ".fleet.json").read_text())
    assert fleet["redis_up"] is True
    time.sleep(0.5)  # a refresh's file reaches the follower within this (pub/sub)
    for config in configs:  # both follow the record, and it is the newest token
        data = read_json(state_of(config) / "main.json")
        assert emulator.token_status(data["access_token"]) == 0
    for d in procs:
        assert d.stop() == 0


def test_a_token_fetched_alone_during_a_stall_goes_to_redis_not_away(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Redis frozen with its data for longer than a token's renew_before (api = "token"): the
    candidate refreshes alone; when Redis thaws, that newer token goes into Redis and to the
    follower, and no file ever goes back to the older record's token."""
    emulator.state.settings.token_ttl, emulator.state.settings.overlap = 12, 3
    configs = [hosts(MAIN, refresh_interval=60, renew_before=6), hosts(FOLLOW)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    before = read_json(state_of(configs[0]) / "main.json")["access_token"]
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        procs[0].wait_for("refresh.uncoordinated", timeout=20)
        # the line is logged when the token is fetched; the file is written right after
        wait_until(lambda: read_json(state_of(configs[0]) / "main.json")["access_token"]
                   != before, timeout=10)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    failures: list[str] = []
    until = time.monotonic() + 12
    while time.monotonic() < until:
        data = read_json(state_of(configs[0]) / "main.json")
        if data["access_token"] == before:
            failures.append("the candidate's file went back to the old token")
        time.sleep(0.05)
    key = f"wxtoken:{{{APPID}:token}}:record"
    assert json.loads(redis_server.client().get(key) or b"")["access_token"] != before
    final = {read_json(state_of(c) / "main.json")["access_token"] for c in configs}
    assert len(final) == 1 and emulator.token_status(final.pop()) == 0
    assert failures == []
    for d in procs:
        assert d.stop() == 0


def test_a_flush_during_a_refresh_costs_no_fencing_storm_and_is_reseeded_in_10_s(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """FLUSHALL while a refresh is in flight (the generation counter restarts): the refresh
    is written, later refreshes are not refused, and a FLUSHALL of an idle fleet is re-seeded
    (record and SDK keys) within 10 s, with no upstream call."""
    s = emulator.state.settings
    s.latency, s.keep_alive = 0.8, False
    configs = [hosts(MAIN, refresh_interval=3, renew_before=8, redis={"mirror": ["wxjava"]}),
               hosts(FOLLOW, refresh_interval=3, renew_before=8)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    time.sleep(4)  # a few generations
    deadline = time.monotonic() + 10
    while not pids_talking_to(emulator_port(emulator), [procs[0].proc.pid]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    redis_server.client().flushall()
    time.sleep(8)  # more refreshes after the flush
    events = [e["event"] for d in procs for e in d.events()]
    assert "fleet.fenced" not in events
    s.latency = 0.0
    for d in procs:
        assert d.stop() == 0
    idle = [hosts(MAIN, redis={"mirror": ["wxjava"]}), hosts(FOLLOW, redis={"mirror": ["wxjava"]})]
    procs = [daemons(c) for c in idle]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    calls = emulator.calls()
    r = redis_server.client()
    r.flushall()
    flushed = time.monotonic()
    while r.get(f"wx:access_token:{APPID}") is None:
        assert time.monotonic() - flushed < 12, "not re-seeded within 10 s"
        time.sleep(0.1)
    assert r.get(f"wxtoken:{{{APPID}:token}}:record") is not None
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == calls
