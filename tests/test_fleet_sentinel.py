"""The fleet on Redis Sentinel when an old master comes back (#16 item 5): a master stopped long
enough for the sentinels to promote its replica still calls itself the master when it resumes,
until Sentinel demotes it (8 s or more later); a connection redis-py pooled before the failover
must not be reused on it. Real redis-server and sentinel processes, SIGSTOP and SIGCONT."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from wxtoken.emulator import Emulator
from wxtoken.fleet.connect import REDIS_ERRORS, connect
from wxtoken.fleet.keys import Keys, version_key
from wxtoken.redis_config import RedisConfig

from helpers import APPID, SECRET, DaemonProcess, read_json, run_cli, socket_of, wait_until
from redis_server import REDIS_SERVER, UNDEMOTABLE, Sentinels

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

MAIN = {"main": {"appid": APPID, "secret": SECRET}}


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    """A master Sentinel cannot demote once it is old (see UNDEMOTABLE), a replica, three
    sentinels."""
    s = Sentinels(tmp_path / "sentinel", master_args=UNDEMOTABLE)
    yield s
    s.stop()


def config_of(s: Sentinels) -> RedisConfig:
    return RedisConfig(url="redis:///0", sentinels=tuple(("127.0.0.1", p) for p in s.ports),
                       service_name=s.name)


def write_until_it_lands(client: redis.Redis, key: str, timeout: float = 10.0) -> int:
    """SET ``key`` through ``client`` until a write succeeds (refused while no master can be
    named); the port of the Redis that took it (SET and INFO in one MULTI: one server ran
    both)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pipe = client.pipeline(transaction=True)
            pipe.set(key, "1")
            pipe.info("server")
            _, info = pipe.execute()
            return int(info["tcp_port"])
        except REDIS_ERRORS:
            assert time.monotonic() < deadline, "no write went through"
            time.sleep(0.1)


def test_a_pooled_connection_is_not_reused_on_an_old_master_that_came_back(
        sentinels: Sentinels) -> None:
    """A client's pooled connection to the master, idle while the master is stopped and the
    replica promoted: once the old master resumes (it still answers as a master), the next
    write goes to the new master, never to the old one."""
    client = connect(config_of(sentinels))
    old, new = sentinels.master, sentinels.replica
    assert write_until_it_lands(client, "before") == old.port
    with sentinels.paused(old):
        sentinels.wait_promoted()
    assert old.client().role()[0] == b"master"  # it says so: no help
    assert write_until_it_lands(client, "after") == new.port
    assert old.client().get("after") is None and new.client().get("after") == b"1"
    client.close()


@pytest.mark.slow
def test_a_host_that_idled_through_a_failover_makes_no_extra_refresh(
        emulator: Emulator, hosts: Callable[..., Path], sentinels: Sentinels,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The issue's case: host B idles through the failover with its connection pooled on the
    master; host A, started after it, refreshes on the new master; then B gets a report of the
    token A replaced. B must answer with A's token from the new master, not read the old
    master's record (the token reported) and refresh once more."""
    from wxtoken import report_invalid
    fleet = {"url": "redis:///0", "sentinels": sentinels.addresses,
             "service_name": sentinels.name}
    b_config = hosts(MAIN, redis=fleet)
    b = daemons(b_config)
    b.wait_for("daemon.ready", timeout=20)
    old_token = read_json(b_config.parent / "state" / "main.json")["access_token"]
    # B's version poll, then a pause that ends before its next one (they are 10 s apart)
    watcher = redis.Redis(host="127.0.0.1", port=sentinels.master.port, socket_timeout=15)
    poll = f"GET {version_key('wxtoken')}"
    with watcher.monitor() as monitor:  # type: ignore[no-untyped-call, unused-ignore]
        deadline = time.monotonic() + 15
        while monitor.next_command()["command"] != poll:
            assert time.monotonic() < deadline, "no version poll from host B"
    watcher.close()
    with sentinels.paused(sentinels.master):
        sentinels.wait_promoted()
    a_config = hosts(MAIN, redis=fleet)
    a = daemons(a_config)
    a.wait_for("daemon.ready", timeout=20)
    calls = emulator.calls()
    result = run_cli("refresh", "main", "--config", str(a_config))
    assert result.returncode == 0, result.stderr
    new_token = read_json(a_config.parent / "state" / "main.json")["access_token"]
    assert new_token != old_token
    got = report_invalid("main", old_token, str(b_config.parent / "state"),
                         socket_of(b_config))
    for d in (a, b):
        assert d.stop() == 0
    assert str(got) == new_token
    assert emulator.calls() == calls + 1, "host B refreshed again"
    record = Keys("wxtoken", f"{APPID}:token").record
    assert json.loads(sentinels.replica.client().get(record) or "")["access_token"] == new_token
    assert json.loads(sentinels.master.client().get(record) or "")["access_token"] == old_token


def test_a_pooled_connection_follows_a_failover_that_ends_after_the_old_master_resumed(
        sentinels: Sentinels) -> None:
    """The master resumes while the sentinels are failing it over (one has started): a pooled
    connection reused then may still write to it (its replica has not left it yet), but once
    every sentinel names the new master, no write goes to the old one."""
    old, new = sentinels.master, sentinels.replica
    pooled = connect(config_of(sentinels))
    assert write_until_it_lands(pooled, "before") == old.port

    with sentinels.paused(old):
        Sentinels._wait(lambda: any("failover_in_progress" in s["flags"]
                                    for s in sentinels.states()))
    after: list[int] = []  # where the writes made once every sentinel named the new master went
    deadline = time.monotonic() + 15
    while len(after) < 20:
        named = all(s["port"] == new.port and "failover" not in s["flags"]
                    for s in sentinels.states())
        with contextlib.suppress(AssertionError):  # refused: no master named
            port = write_until_it_lands(pooled, "during", timeout=0)
            if named:
                after.append(port)
        assert time.monotonic() < deadline, "the sentinels never all named the new master"
        time.sleep(0.02)
    assert set(after) == {new.port}, after
    pooled.close()


GUARD = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "2")


@pytest.mark.slow
def test_a_master_that_refuses_writes_for_want_of_a_replica_is_redis_down(
        emulator: Emulator, hosts: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """min-replicas-to-write 1 (the guard an old master needs): while the only replica is
    stopped the master refuses every write (NOREPLICAS); a host takes that as Redis down (its
    file keeps serving, a forced refresh is refused: the day's counts are out of reach) and
    coordinates again once the replica is back."""
    sentinels = Sentinels(tmp_path / "guarded", master_args=GUARD, replica_args=GUARD)
    try:
        fleet = {"url": "redis:///0", "sentinels": sentinels.addresses,
                 "service_name": sentinels.name}
        raw = sentinels.master.client()

        def refused() -> bool:
            try:
                raw.set("probe", "1")
            except redis.ResponseError as exc:
                return str(exc).startswith("NOREPLICAS")
            return False

        Sentinels._wait(lambda: not refused())  # the replica's first sync is over
        config = hosts(MAIN, redis=fleet)
        d = daemons(config)
        d.wait_for("daemon.ready", timeout=20)
        token = read_json(config.parent / "state" / "main.json")["access_token"]
        calls = emulator.calls()
        with sentinels.paused(sentinels.replica):
            Sentinels._wait(refused)
            result = run_cli("refresh", "main", "--config", str(config))
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            d.wait_for("redis.down")
            assert read_json(config.parent / "state" / "main.json")["access_token"] == token
        Sentinels._wait(lambda: not refused())
        wait_until(lambda: run_cli("refresh", "main", "--config", str(config)).returncode == 0,
                   timeout=15, interval=0.2)
        assert d.stop() == 0
        events = [e["event"] for e in d.events()]
        assert "redis.back" in events
        assert "unparsed" not in events and not any("crash" in e for e in events), events
        assert emulator.calls() == calls + 1
    finally:
        sentinels.stop()
