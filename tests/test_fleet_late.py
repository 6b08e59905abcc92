"""Late fetches and partitions on the fleet, as an adversarial review of #16 items 1-3 broke
them: each test ends asserting that the fleet's record holds a token WeChat accepts once the
overlap is over (or that a cut-off host made no fetch of its own)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from test_fleet_order import MAIN, Cut, record_of
from wxtoken.emulator import Emulator

from helpers import APPID, DaemonProcess, run_cli, token_of, wait_until
from redis_server import RedisServer

pytestmark = pytest.mark.slow  # each waits past WeChat's (scaled) overlap


def partitioned(config: Path) -> bool:
    out = run_cli("status", "--json", "--config", str(config))
    return bool(json.loads(out.stdout)["apps"][0].get("partitioned"))


def test_a_partitioned_host_fetches_nothing_even_once_its_token_expired_and_it_restarted(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Host P is cut off from Redis, finds its token refused (partitioned), and its token then
    expires; restarted, still cut off, it fetches nothing (an expired token cannot be asked
    about; the fleet's is live elsewhere). Back on Redis, it takes the fleet's token and
    `status` no longer says partitioned, although P leads nothing."""
    s = emulator.state.settings
    s.token_ttl, s.overlap = 24, 2.0
    cut = Cut(redis_server.port)
    try:
        a = hosts(MAIN, refresh_interval=6, renew_before=8)
        p = hosts(MAIN, refresh_interval=3600, renew_before=8,
                  redis={"url": f"redis://127.0.0.1:{cut.port}/0"})
        host_a = daemons(a)
        host_a.wait_for("daemon.ready", timeout=15)
        host_p = daemons(p)
        host_p.wait_for("daemon.ready", timeout=15)
        cut.cut()
        host_p.wait_for("fleet.partitioned", timeout=40)
        expires = json.loads((p.parent / "state" / "main.json").read_text())["expires_at"]
        wait_until(lambda: time.time() > expires + 1, timeout=30)
        assert host_p.stop() == 0
        again = daemons(p)
        again.wait_for("daemon.ready", timeout=15)
        time.sleep(3)  # its first runs are over
        assert partitioned(p)
        for d in (host_p, again):
            events = [e["event"] for e in d.events()]
            assert "token.refreshed" not in events and "refresh.uncoordinated" not in events
        cut.mend()
        wait_until(lambda: token_of(p) == record_of(redis_server)["access_token"], timeout=15)
        wait_until(lambda: not partitioned(p), timeout=15)
        assert emulator.token_status(record_of(redis_server)["access_token"]) == 0
        assert host_a.stop() == 0 and again.stop() == 0
    finally:
        cut.close()


def test_a_request_landing_after_the_fleet_fetched_once_more_is_caught_after_the_overlap(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A's call is held on the way for 16 s while A is stopped; B takes over (token 0); A
    resumes, its call times out, it marks the record, and the fleet fetches once more
    (token 1); A's held request then reaches WeChat (token 2, retiring 1). A asks WeChat about
    the fleet's token past the overlap, finds it refused and has it replaced: the record ends
    on a token WeChat accepts."""
    s = emulator.state.settings
    s.overlap = 3.0
    redis = {"overlap": 3}
    a = hosts(MAIN, redis=redis, refresh_interval=3600, renew_before=12)  # lease 6, deadline 3
    b = hosts(MAIN, redis=redis, refresh_interval=3600, renew_before=12)
    s.latency = 16.0
    host_a = daemons(a)
    wait_until(lambda: emulator.state.inflight == 1, timeout=10)
    s.latency = 0.0
    os.kill(host_a.proc.pid, signal.SIGSTOP)
    try:
        host_b = daemons(b)
        host_b.wait_for("token.refreshed", timeout=20)
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    host_a.wait_for("fleet.fetch_fenced", timeout=10)
    wait_until(lambda: emulator.calls(APPID, "token") >= 3, timeout=25)  # the held request
    retired = host_a.wait_for("fleet.token_retired", timeout=30)
    assert retired["level"] == "warning"
    wait_until(lambda: emulator.calls(APPID, "token") >= 4, timeout=10)
    time.sleep(s.overlap + 1)  # past WeChat's overlap: a retired token is refused now
    final = record_of(redis_server)["access_token"]
    assert emulator.token_status(final) == 0
    wait_until(lambda: token_of(a) == token_of(b) == final, timeout=5)
    assert emulator.calls(APPID, "token") == 4
    assert host_a.stop() == 0 and host_b.stop() == 0


def test_a_mark_is_not_cleared_by_a_write_from_a_fetch_made_before_it(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """No record yet. A's call is held while A is stopped; B takes over, its token is issued
    first, but its write is late (its ticket call is slow); A's held call is answered after
    B's (retiring it), A marks the fleet before B writes. B's write comes from a lease taken
    before the mark, so it does not clear it: the next lease holder fetches once more."""
    s = emulator.state.settings
    s.overlap = 10.0
    app = {"main": {**MAIN["main"], "tickets": ["jsapi"]}}
    a = hosts(app, refresh_interval=3600, renew_before=24)  # lease 12 s, deadline 6 s
    b = hosts(app, refresh_interval=3600, renew_before=24)
    s.latency = 18.0
    host_a = daemons(a)
    wait_until(lambda: emulator.state.inflight == 1, timeout=10)
    os.kill(host_a.proc.pid, signal.SIGSTOP)
    s.latency = 5.0
    try:
        host_b = daemons(b)
        wait_until(lambda: emulator.calls(APPID, "token") == 1, timeout=25)  # B's token
        wait_until(lambda: emulator.calls(APPID, "token") == 2, timeout=25)  # A's held one
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    host_b.wait_for("token.refreshed", timeout=20)
    s.latency = 0.0
    wait_until(lambda: emulator.calls(APPID, "token") >= 3, timeout=20)  # once more
    time.sleep(s.overlap + 1)  # past WeChat's overlap: a retired token is refused now
    final = record_of(redis_server)["access_token"]
    assert emulator.token_status(final) == 0, "the fleet's record is a token WeChat refuses"
    wait_until(lambda: token_of(a) == token_of(b) == final, timeout=5)
    assert host_a.stop() == 0 and host_b.stop() == 0


def test_a_write_refused_by_a_reseeded_record_marks_it(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Host H fetched alone while cut off; Redis restarts empty; B (which saw fewer
    generations) takes a lease and fetches; H's token is re-seeded meanwhile at a higher
    generation, so B's write is refused although B held its lease: B's fetch retired the
    re-seeded token, so B marks it and the fleet fetches once more."""
    s = emulator.state.settings
    s.token_ttl, s.overlap = 60, 5.0
    cut = Cut(redis_server.port)
    try:
        ch = hosts(MAIN, refresh_interval=3600, renew_before=40,
                   redis={"url": f"redis://127.0.0.1:{cut.port}/0"})
        cb = hosts(MAIN, refresh_interval=3600, renew_before=40)
        h = daemons(ch)
        h.wait_for("daemon.ready", timeout=15)
        b = daemons(cb)
        b.wait_for("daemon.ready", timeout=15)
        for _ in range(3):  # reports of a token already replaced: leases taken, no write
            r = run_cli("refresh", "main", "--invalid", "00_bogus", "--config", str(ch))
            assert r.returncode == 0, r.stdout + r.stderr
        assert b.stop() == 0
        cut.cut()
        h.wait_for("refresh.uncoordinated", timeout=60)
        wait_until(lambda: token_of(ch) != record_of(redis_server)["access_token"], timeout=10)
        redis_server.restart()
        s.latency = 8.0
        b = daemons(cb)
        wait_until(lambda: emulator.state.inflight == 1, timeout=20)
        s.latency = 0.0  # B's call is held 8 s; the rest are answered at once
        cut.mend()
        h.wait_for("fleet.reseeded", timeout=15)
        b.wait_for("fleet.fenced", timeout=15)
        b.wait_for("fleet.fetch_fenced", timeout=10)
        wait_until(lambda: emulator.token_status(record_of(redis_server)["access_token"]) == 0
                   and token_of(ch) == token_of(cb) == record_of(redis_server)["access_token"],
                   timeout=15)
        time.sleep(s.overlap + 1)  # past WeChat's overlap: a retired token is refused now
        final = record_of(redis_server)["access_token"]
        seen = [(e["event"], e.get("generation"), e.get("theirs"), e.get("token"))
                for d in (h, b) for e in d.events()
                if e["event"].startswith(("fleet.", "lease", "token.r", "refresh"))]
        assert emulator.token_status(final) == 0, ("record refused by WeChat", final[:4], seen)
        assert h.stop() == 0 and b.stop() == 0
    finally:
        cut.close()


def test_a_mark_left_by_a_host_that_died_is_acted_on_by_the_others(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A marks the fleet after its late fetch and is killed at once: the other candidates hear
    of the mark and one fetches once more, within WeChat's overlap."""
    s = emulator.state.settings
    s.overlap = 10.0
    a = hosts(MAIN, refresh_interval=3600, renew_before=12)
    b = hosts(MAIN, refresh_interval=3600, renew_before=12)
    s.latency = 12.0
    host_a = daemons(a)
    wait_until(lambda: emulator.state.inflight == 1, timeout=10)
    s.latency = 0.0
    os.kill(host_a.proc.pid, signal.SIGSTOP)
    try:
        host_b = daemons(b)
        host_b.wait_for("token.refreshed", timeout=20)
        wait_until(lambda: emulator.calls(APPID, "token") == 2, timeout=15)
        # A resumes only to mark: its refresher is kept from running again
        fenced = f"wxtoken:{{{APPID}:token}}:fenced"
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    wait_until(lambda: redis_server.client().get(fenced) is not None, timeout=10, interval=0.001)
    os.kill(host_a.proc.pid, signal.SIGKILL)
    wait_until(lambda: emulator.calls(APPID, "token") >= 3, timeout=s.overlap)
    time.sleep(s.overlap + 1)  # past WeChat's overlap: a retired token is refused now
    final = record_of(redis_server)["access_token"]
    assert emulator.token_status(final) == 0
    assert token_of(b) == final
    assert host_b.stop() == 0
