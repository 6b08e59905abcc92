"""The fleet's token order (#16 items 1 and 2): which token is the newer is decided by the
fleet's generation, never by host clocks or expiries; a fetch WeChat answered after its host's
lease ran out is followed by one more fetch, so every host ends on a token WeChat accepts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
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
    run_cli,
    state_of,
    token_of,
    wait_until,
)
from redis_server import RedisServer

MAIN = {"main": {"appid": APPID, "secret": SECRET}}
FOLLOW = {"main": {"appid": APPID}}
RECORD = f"wxtoken:{{{APPID}:token}}:record"



def record_of(redis_server: RedisServer) -> dict[str, Any]:
    raw = redis_server.client().get(RECORD)
    assert raw is not None, "the fleet has no record"
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def serial(token: str) -> int:
    """The emulator numbers the tokens it issues from 00: "07_…" is the eighth."""
    return int(token.split("_", 1)[0])


def faketime(tmp_path: Path, offset: str) -> dict[str, str]:
    from test_daemon import FAKETIME
    if not FAKETIME:
        pytest.skip("libfaketime is not installed (./dev.sh test installs the faketime package)")
    path = tmp_path / f"faketime{offset}"
    path.write_text(f"{offset}\n")
    # the monotonic clock is shifted too: libfaketime 0.9.10 fails time.sleep() (EINVAL) when
    # it is left alone, and redis-py sleeps between retries; only its differences count
    return {"LD_PRELOAD": FAKETIME[0], "FAKETIME_TIMESTAMP_FILE": str(path)}


def test_a_follower_whose_clock_ran_ahead_never_puts_its_old_token_back(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        tmp_path: Path, daemons: Callable[..., DaemonProcess]) -> None:
    """A follower wrote its file while its clock ran 300 s ahead, was stopped; the fleet
    refreshed; back with a correct clock, its file (which looks 300 s fresher) follows the
    fleet's newer record instead of re-seeding Redis with the token WeChat retired."""
    candidate = hosts(MAIN, refresh_interval=3600)
    follower = hosts(FOLLOW, refresh_interval=3600)
    lead = daemons(candidate)
    lead.wait_for("daemon.ready", timeout=15)
    first = token_of(candidate)
    assert first is not None
    ahead = daemons(follower, env=faketime(tmp_path, "+300"))
    ahead.wait_for("daemon.ready", timeout=15)
    wait_until(lambda: token_of(follower) == first, timeout=5)
    memory = state_of(follower) / ".locks" / "main.gen"  # the generation of its file's token
    wait_until(memory.exists, timeout=5)
    assert memory.stat().st_mode & 0o777 == 0o600
    assert json.loads(memory.read_text())["gen"] == record_of(redis_server)["gen"]
    assert ahead.stop() == 0
    result = run_cli("refresh", "main", "--config", str(candidate))
    assert result.returncode == 0, result.stderr
    second = record_of(redis_server)["access_token"]
    assert second != first and serial(second) > serial(first)
    back = daemons(follower)
    back.wait_for("daemon.ready", timeout=15)
    wait_until(lambda: token_of(follower) == second, timeout=5)
    time.sleep(1.5)  # a re-seed came within 3 s in the review: give it the chance to happen
    assert record_of(redis_server)["access_token"] == second
    assert token_of(candidate) == token_of(follower) == second
    assert not [e for e in back.events() if e["event"] == "fleet.reseeded"]
    assert emulator.calls(APPID, "token") == 2
    assert back.stop() == 0 and lead.stop() == 0


def test_a_host_that_started_while_redis_was_away_never_overwrites_newer_tokens(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        tmp_path: Path, daemons: Callable[..., DaemonProcess]) -> None:
    """Host B, its clock 300 s ahead, starts while Redis is unreachable and fetches a token
    alone. When Redis answers again, B measures its clock before writing anything: no record is
    stamped in its fast time, the fleet's record only ever moves to newer tokens (by WeChat's
    issue order), and every file ends on the record's token, which WeChat accepts."""
    a = hosts(MAIN, refresh_interval=4, renew_before=12)
    b = hosts(MAIN, refresh_interval=4, renew_before=12)
    host_a = daemons(a)
    host_a.wait_for("daemon.ready", timeout=15)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        host_b = daemons(b, env=faketime(tmp_path, "+300"))
        host_b.wait_for("daemon.ready", timeout=20)
        assert any(e["event"] == "refresh.uncoordinated" for e in host_b.events())
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    client = redis_server.client()
    seen: list[str] = []
    stamps: list[float] = []
    deadline = time.monotonic() + 16
    while time.monotonic() < deadline:
        raw = client.get(RECORD)
        now = float(client.time()[0])
        if raw is not None:
            doc = json.loads(raw)
            if not seen or seen[-1] != doc["access_token"]:
                seen.append(doc["access_token"])
                stamps.append(doc["expires_at"] - now)
        time.sleep(0.05)
    assert len(seen) >= 3, seen  # refreshes went on (every 4 s)
    serials = [serial(t) for t in seen]
    assert serials == sorted(serials), f"the record went back to an older token: {serials}"
    assert max(stamps) <= 7200 + 5, f"a record stamped in a fast clock: {stamps}"
    final = record_of(redis_server)["access_token"]
    wait_until(lambda: token_of(a) == token_of(b) == record_of(redis_server)["access_token"],
               timeout=5)
    assert emulator.token_status(record_of(redis_server)["access_token"]) == 0
    assert final
    assert host_a.stop() == 0 and host_b.stop() == 0


def test_a_fetch_answered_after_the_lease_ran_out_is_followed_by_one_more(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Leader A's call is held on the way for 12 s while A is stopped; B takes the lease over
    and writes token 1; A's call then reaches WeChat and is issued token 2, which retires 1. A is
    fenced out (or its call timed out), so it marks the record; the next lease holder fetches
    once more, and before WeChat's overlap ends every host serves a token WeChat accepts. One
    extra call, no more."""
    s = emulator.state.settings
    s.overlap = 3.0
    a = hosts(MAIN, refresh_interval=3600, renew_before=12)  # lease 6 s
    b = hosts(MAIN, refresh_interval=3600, renew_before=12)
    s.latency = 12.0  # A's first call: held on the way
    host_a = daemons(a)
    wait_until(lambda: emulator.state.inflight == 1, timeout=10)
    s.latency = 0.0
    assert host_a.proc.pid
    os.kill(host_a.proc.pid, signal.SIGSTOP)
    try:
        host_b = daemons(b)
        taken = host_b.wait_for("token.refreshed", timeout=20)
        # A's held call reaches WeChat now: WeChat issues the second token, retiring B's
        wait_until(lambda: emulator.calls(APPID, "token") == 2, timeout=15)
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    assert serial(taken["token"]) == 0
    wait_until(lambda: emulator.calls(APPID, "token") == 3, timeout=10)
    assert host_a.wait_for("fleet.fetch_fenced")["level"] == "warning"
    final = record_of(redis_server)["access_token"]
    assert serial(final) == 2
    wait_until(lambda: token_of(a) == token_of(b) == final, timeout=5)
    time.sleep(s.overlap + 0.5)  # past WeChat's overlap: only the newest token is accepted
    assert emulator.token_status(final) == 0
    assert token_of(a) == token_of(b) == record_of(redis_server)["access_token"] == final
    assert emulator.calls(APPID, "token") == 3
    assert host_a.stop() == 0 and host_b.stop() == 0


def test_a_redis_whose_generation_went_back_is_reseeded_from_the_newer_file(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Redis comes back with an older record of a lower generation (a snapshot restored, a
    lagging replica promoted): the host that saw the higher generation re-seeds its newer token
    with no upstream call; a host's file never follows the older record."""
    candidate = hosts(MAIN, refresh_interval=3600)
    lead = daemons(candidate)
    lead.wait_for("daemon.ready", timeout=15)
    client = redis_server.client()
    old = client.get(RECORD)
    old_gen = client.get(f"wxtoken:{{{APPID}:token}}:gen")
    assert old is not None and old_gen is not None
    result = run_cli("refresh", "main", "--config", str(candidate))
    assert result.returncode == 0, result.stderr
    newer = record_of(redis_server)
    assert newer["gen"] > json.loads(old)["gen"]
    calls = emulator.calls()
    # the snapshot: Redis restarts with the older record and counter (no version: resync)
    redis_server.restart()
    client = redis_server.client()
    client.set(RECORD, old)
    client.set(f"wxtoken:{{{APPID}:token}}:gen", old_gen)
    wait_until(lambda: record_of(redis_server)["access_token"] == newer["access_token"],
               timeout=10)
    assert record_of(redis_server)["gen"] >= newer["gen"]
    assert token_of(candidate) == newer["access_token"]
    assert emulator.calls() == calls
    assert lead.stop() == 0


class Cut:
    """A TCP forwarder on loopback in front of Redis, for one host: ``cut()`` drops its
    connections and refuses new ones (that host alone loses Redis), ``mend()`` lets them in."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.conns: list[Any] = []
        self.stopped = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.open = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()

    def mend(self) -> None:
        self.open = True

    def close(self) -> None:
        self.stopped = True
        self.cut()
        self.listener.close()


def test_a_candidate_cut_off_from_redis_never_retires_the_fleets_token(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Host P loses Redis while host A keeps it and refreshes. At P's own renew_before window
    P asks WeChat about its token first (getcallbackip, none of the token quota): refused, so
    another host holds a newer one: P fetches nothing (it would retire the fleet's token),
    logs fleet.partitioned and `wxtoken status` says so. When Redis is back, P's file follows
    the fleet's record and the problem clears."""
    s = emulator.state.settings
    s.token_ttl, s.overlap = 30, 3.0
    cut = Cut(redis_server.port)
    try:
        a = hosts(MAIN, refresh_interval=8, renew_before=12)
        p = hosts(MAIN, refresh_interval=8, renew_before=12,
                  redis={"url": f"redis://127.0.0.1:{cut.port}/0"})
        host_a = daemons(a)
        host_a.wait_for("daemon.ready", timeout=15)
        host_p = daemons(p)
        host_p.wait_for("daemon.ready", timeout=15)
        assert token_of(p) == token_of(a)
        cut.cut()
        host_p.wait_for("redis.down", timeout=15)
        partitioned = host_p.wait_for("fleet.partitioned", timeout=40)
        assert partitioned["level"] == "error"
        events = [e["event"] for e in host_p.events()]
        assert "token.refreshed" not in events and "refresh.uncoordinated" not in events
        # the fleet's token was never retired by P: the record's token is accepted
        assert emulator.token_status(record_of(redis_server)["access_token"]) == 0
        status = run_cli("status", "--json", "--config", str(p))
        app = json.loads(status.stdout)["apps"][0]
        assert app["partitioned"] is True and status.returncode != 0
        assert any(problem.startswith("partitioned: ") for problem in app["problems"])
        refused = run_cli("refresh", "main", "--config", str(p))
        assert refused.returncode != 0 and "Redis is unreachable" in refused.stderr, \
            refused.stderr
        cut.mend()
        wait_until(lambda: token_of(p) == record_of(redis_server)["access_token"], timeout=15)
        wait_until(lambda: not json.loads(run_cli("status", "--json", "--config", str(p))
                                          .stdout)["apps"][0].get("partitioned"), timeout=15)
        assert host_a.stop() == 0 and host_p.stop() == 0
    finally:
        cut.close()


def test_a_look_without_the_lock_changes_nothing_and_the_locked_read_reseeds(
        hosts: Callable[..., Path], redis_server: RedisServer) -> None:
    """The refresher's look without the lock (``look()``) is side-effect free: with Redis
    emptied under a host whose file holds a newer token, it re-seeds nothing, writes no file
    and announces nothing; the read under the lock (and the lease) re-seeds Redis from the
    file. A record this host's file does not hold sends the run to the lock too, where the
    file follows it. A look does tell the fleet of this host's own write when Redis failed to
    take the announce."""
    from wxtoken.config import load_config
    from wxtoken.fleet.shared import Fleet
    from wxtoken.fleet.store import FleetStore
    from wxtoken.record import TokenRecord
    path = hosts(MAIN)
    config = load_config(str(path))
    assert config.redis is not None
    fleet = Fleet(config, config.redis)
    store = FleetStore(fleet, config.apps[0])
    client = redis_server.client()
    now = int(time.time())
    with store.locked(10):
        store.write(TokenRecord("main", APPID, "T1", now + 7200, now))
    assert record_of(redis_server)["access_token"] == "T1"
    state = Path(config.state_dir)
    client.delete(RECORD)  # Redis lost it (flushed, restarted empty)
    before = (state / "main.json").stat().st_mtime_ns
    version = client.get("wxtoken:version")
    assert store.look() is None
    assert client.get(RECORD) is None and client.get("wxtoken:version") == version
    assert (state / "main.json").stat().st_mtime_ns == before
    with store.locked(10):
        record = store.read()
    assert record is not None and record.access_token == "T1"
    assert record_of(redis_server)["access_token"] == "T1"
    assert client.get("wxtoken:version") != version  # the re-seed was announced
    # another host's newer record: a look writes nothing, and says the run must take the lock
    # (this host's file is not in step: a start with no file, a refresh not followed yet)
    client.set(RECORD, json.dumps({**record_of(redis_server), "access_token": "T2",
                                   "gen": record_of(redis_server)["gen"] + 1}))
    assert store.look() is None and token_of(path) == "T1"
    with store.locked(10):
        looked = store.read()
    assert looked is not None and looked.access_token == "T2" and token_of(path) == "T2"
    assert store.look() == looked
    # the one thing a look does: tell the fleet of this host's own write that Redis failed
    # to announce (the other hosts follow on the version)
    version = client.get("wxtoken:version")
    store.delivery.unannounced = looked
    store.look()
    assert store.delivery.unannounced is None and client.get("wxtoken:version") != version
    fleet.client.close()
