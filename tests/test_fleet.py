"""The fleet mode: several daemons (hosts) on one real redis-server, against the emulator."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

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
    run_cli,
    samples,
    state_of,
    token_of,
    wait_until,
)
from redis_server import RedisServer

MAIN = {"main": {"appid": APPID, "secret": SECRET}}
FOLLOW = {"main": {"appid": APPID}}  # no secret: this host follows the app


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


def calls_above(emulator: Emulator, n: int) -> Callable[[], bool]:
    """A condition: the emulator has answered more than ``n`` token calls (a refresh more)."""
    return lambda: emulator.calls(APPID, "token") > n


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
    start = emulator.calls()
    wait_until(lambda: emulator.calls() >= start + 3, timeout=20)  # three refreshes more
    current = read_json(state_of(candidates[0]) / "main.json")["access_token"]
    time.sleep(0.5)  # a refresh's file reaches the followers within this (pub/sub)
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
    # a follower started before the first record is ready without a file: it writes the token
    # when the candidate's announcement reaches it, after that candidate's daemon.ready
    wait_until(lambda: all(token_of(c) == old for c in configs), timeout=10)
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
    for d in procs:  # started (a SIGTERM while Python still imports kills it: -15)
        d.wait_for("daemon.ready", timeout=15)
    wait_until(lambda: any(e["event"] == "budget.exhausted" for d in procs for e in d.events()),
               timeout=15)
    time.sleep(2)  # four refresh periods in which a call past the budget would be made
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == 4
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    time.sleep(2)  # the same, after every host restarted
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == 4


def test_a_killed_leader_is_replaced_in_time_and_no_file_holds_a_refused_token(
        emulator: Emulator, hosts: Callable[..., Path], daemons: Callable[..., DaemonProcess]
        ) -> None:
    """The host whose refresh is in flight is SIGKILLed while it holds the lease: another
    candidate takes over once the lease runs out, well before the token's end, and no
    surviving host's file ever holds a token WeChat refuses."""
    s = emulator.state.settings
    s.token_ttl, s.overlap, s.latency, s.keep_alive = 16, 8, 1.0, False
    configs = [hosts(MAIN, refresh_interval=60, renew_before=8) for _ in range(3)]
    procs = [daemons(c) for c in configs]
    for d in procs:
        d.wait_for("daemon.ready", timeout=20)
    deadline = time.monotonic() + 30
    victim: list[int] = []
    while not victim:
        assert time.monotonic() < deadline, "no refresh came"
        victim = pids_talking_to(emulator_port(emulator), [d.proc.pid for d in procs])
        time.sleep(0.02)
    killed = next(d for d in procs if d.proc.pid == victim[0])
    killed.proc.kill()
    killed_at = time.time()
    survivors = [c for c, d in zip(configs, procs, strict=True) if d is not killed]
    failures: list[str] = []
    until = time.monotonic() + 20
    while time.monotonic() < until:
        for config in survivors:
            data = read_json(state_of(config) / "main.json")
            if (code := emulator.token_status(data["access_token"])) != 0:
                failures.append(f"{config.parent.name}: refused with {code}")
        time.sleep(0.05)
    for d in procs:
        if d is not killed:
            assert d.stop() == 0
    killed.stop()
    assert failures == []
    took_over = [e for d in procs if d is not killed for e in d.events()
                 if e["event"] == "token.refreshed" and iso(e["timestamp"]) > killed_at]
    assert took_over, "nobody took over"
    # the first take-over in time, whichever survivor made it
    first = min(iso(e["timestamp"]) for e in took_over)
    assert first - killed_at < 8  # the lease (4 s) and one call


def test_a_paused_holder_past_its_lease_is_fenced_and_every_file_ends_on_the_newest_token(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Host A is SIGSTOPped in the middle of a refresh (its new token fetched, its ticket call
    hanging) for longer than its lease; host B takes over and writes a newer token; when A
    goes on, its write is refused (fencing), and both files end on B's token."""
    app = {"main": {"appid": APPID, "secret": SECRET, "tickets": ["jsapi"]}}
    a = hosts(app, refresh_interval=6, renew_before=12)  # call deadline 3 s, lease 6 s
    b = hosts(app, refresh_interval=6, renew_before=12)
    host_a = daemons(a)
    host_a.wait_for("daemon.ready", timeout=15)
    s = emulator.state.settings
    s.hang_seconds, s.keep_alive = 30, False
    emulator.add_fault("hang", api="ticket_jsapi", count=2)
    deadline = time.monotonic() + 20
    while not (emulator.calls(APPID, "token") == 2 and pids_talking_to(
            emulator_port(emulator), [host_a.proc.pid])):
        assert time.monotonic() < deadline, "A's refresh did not come"
        time.sleep(0.01)
    os.kill(host_a.proc.pid, signal.SIGSTOP)
    try:
        host_b = daemons(b)
        taken = host_b.wait_for("token.refreshed", timeout=30)
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    fenced = host_a.wait_for("fleet.fenced", timeout=15)
    assert fenced["level"] == "warning"
    record = json.loads(redis_server.client().get(f"wxtoken:{{{APPID}:token}}:record") or b"")
    assert record["access_token"].startswith(taken["token"].rstrip("…"))
    # A's file takes B's token after the fencing line: from its sync thread (B's announcement,
    # queued while A was stopped) or its run a second after the fencing
    wait_until(lambda: all(token_of(c) == record["access_token"] for c in (a, b)), timeout=5)
    for config in (a, b):
        assert read_json(state_of(config) / "main.json")["access_token"] == \
            record["access_token"]
    assert emulator.token_status(record["access_token"]) == 0
    assert emulator.calls(APPID, "token") == 3
    assert host_a.stop() == 0 and host_b.stop() == 0


def test_sdks_read_the_fleets_token_from_their_own_redis_keys(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """mirror = ["wechatpy", "wxjava", "silenceper"]: wechatpy 1.8's own RedisStorage, in a
    process with no wxtoken host, makes no token call across several refreshes; the WxJava
    and silenceper keys hold the token (and the jsapi ticket) with the token's remaining life
    as TTL."""
    import redis
    from wechatpy import WeChatClient
    from wechatpy.session.redisstorage import RedisStorage

    emulator.state.settings.token_ttl = 20
    app = {"main": {"appid": APPID, "secret": SECRET, "tickets": ["jsapi"]}}
    config = hosts(app, refresh_interval=3, renew_before=8,
                   redis={"mirror": ["wechatpy", "wxjava", "silenceper"]})
    d = daemons(config)
    d.wait_for("daemon.ready", timeout=15)
    r = redis.Redis(port=redis_server.port)
    client = WeChatClient(APPID, "not-the-secret-0000", session=RedisStorage(r))
    client.API_BASE_URL = f"{emulator.url}/cgi-bin/"
    token_calls = emulator.calls(APPID, "token")
    for _ in range(4):  # across several refreshes
        assert client.misc.get_wechat_ips() == ["127.0.0.1"]
        wait_until(calls_above(emulator, emulator.calls(APPID, "token")), timeout=15)
    assert client.misc.get_wechat_ips() == ["127.0.0.1"]
    # stopped before counting and comparing: a refresh in flight is counted by the emulator
    # before its token.refreshed line, and writes the file before the SDK keys
    assert d.stop() == 0
    refreshes = emulator.calls(APPID, "token") - token_calls
    assert refreshes >= 3
    refreshed = [e for e in d.events() if e["event"] == "token.refreshed"]
    assert len(refreshed) == emulator.calls(APPID, "token")  # every token call was wxtoken's
    current = read_json(state_of(config) / "main.json")
    now = time.time()
    token, ticket = current["access_token"], current["jsapi_ticket"]
    expected = {
        f"wechatpy:{APPID}_access_token": json.dumps(token),
        f"wechatpy:{APPID}_access_token_expires_at": json.dumps(current["expires_at"]),
        f"wechatpy:{APPID}_jsapi_ticket": json.dumps(ticket),
        f"wx:access_token:{APPID}": token,
        f"wx:ticket:key:{APPID}:jsapi": ticket,
        f"gowechat_officialaccount__access_token_{APPID}": token,
        f"gowechat_officialaccount__jsapi_ticket_{APPID}": ticket,
    }
    for key, value in expected.items():
        assert r.get(key) == value.encode(), key
        ttl = r.ttl(key)
        # the key lives as long as the token (the file's times are this host's, whole seconds)
        assert current["expires_at"] - now - 3 <= ttl <= current["expires_at"] - now + 2, key
    assert r.get(f"wechatpy:{APPID}_jsapi_ticket_expires_at") == str(
        current["jsapi_ticket_expires_at"]).encode()
    assert client.jsapi.get_jsapi_ticket() == ticket  # from the mirror, not a getticket call
    assert not [k for k in r.scan_iter() if SECRET.encode() in k]  # no secret in a key name


def test_redis_with_a_password_and_no_auth_warning(
        emulator: Emulator, hosts: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A Redis with requirepass, the password from password_env: the fleet works and the
    daemon does not warn; the same Redis reached without a password is a one-line exit 78."""
    server = RedisServer(tmp_path / "secured", password="s3cr3t-redis-pw")
    try:
        config = hosts(MAIN, redis={"url": server.url, "password_env": "WXT_REDIS_PW"})
        d = daemons(config, env={"WXT_REDIS_PW": "s3cr3t-redis-pw"})
        d.wait_for("daemon.ready", timeout=15)
        assert d.stop() == 0
        events = [e["event"] for e in d.events()]
        assert "redis.no_auth" not in events and "token.refreshed" in events
        bare = hosts(MAIN, redis={"url": server.url})
        result = run_cli("run", "--config", str(bare))
        assert result.returncode == 78, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"wxtoken: {bare}: redis: Redis refused the login (the default "
                               "user, without a password): ")
        assert "Traceback" not in result.stderr and "s3cr3t" not in result.stderr
    finally:
        server.stop()


def test_rediss_is_verified_against_ca_bundle(
        emulator: Emulator, hosts: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """rediss://: with the private CA in ca_bundle the fleet works over TLS; without it the
    certificate does not verify, the daemon says so at error level and keeps serving."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = tuple(tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    server = RedisServer(tmp_path / "tls", tls=(paths[0], paths[1], paths[2]))
    try:
        url = f"rediss://localhost:{server.port}/0"
        good = hosts(MAIN, ca_bundle=str(paths[2]), redis={"url": url})
        d = daemons(good)
        d.wait_for("daemon.ready", timeout=15)
        assert d.stop() == 0
        assert server.client().get(f"wxtoken:{{{APPID}:token}}:record") is not None
        unverified = hosts(MAIN, redis={"url": url})
        d = daemons(unverified)
        failed = d.wait_for("redis.tls_failed", timeout=15)
        assert failed["level"] == "error"
        d.wait_for("daemon.ready", timeout=15)
        assert d.stop() == 0
    finally:
        server.stop()


def test_status_metrics_and_journal_show_roles_redis_and_clock_skew(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        tmp_path: Path, daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken status` shows each app's role, Redis and the last sync; the metrics file has
    wxtoken_redis_up, wxtoken_leader and wxtoken_clock_skew_seconds; a host whose clock is 5 s
    ahead (libfaketime) warns, exports the skew, and writes its file in its own time."""
    from test_daemon import FAKETIME
    if not FAKETIME:
        pytest.skip("libfaketime is not installed (./dev.sh test installs the faketime package)")
    prom = tmp_path / "wxtoken.prom"
    leader = hosts(MAIN, metrics_file=str(prom))
    ahead = hosts(FOLLOW)
    first = daemons(leader)
    first.wait_for("daemon.ready", timeout=15)
    offset = tmp_path / "faketime"
    offset.write_text("+5\n")
    second = daemons(ahead, env={"LD_PRELOAD": FAKETIME[0], "FAKETIME_TIMESTAMP_FILE": str(offset),
                                 "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    second.wait_for("daemon.ready", timeout=15)
    skew = second.wait_for("clock.skew")
    assert skew["level"] == "warning" and -6 < skew["skew"] < -4
    status = json.loads(run_cli("status", "--json", "--config", str(leader)).stdout)
    assert status["apps"][0]["role"] == "leader" and status["fleet"]["redis_up"] is True
    assert status["healthy"] is True
    follower = json.loads(run_cli("status", "--json", "--config", str(ahead)).stdout)
    assert follower["apps"][0]["role"] == "follower"
    assert follower["fleet"]["problems"] == ["this host's clock is -5.0 s off Redis TIME"]
    table = run_cli("status", "--config", str(ahead)).stdout
    assert table.startswith("fleet: redis up, last sync ") and " follower " in table
    record = json.loads(redis_server.client().get(f"wxtoken:{{{APPID}:token}}:record") or b"")
    mine = read_json(state_of(ahead) / "main.json")
    assert mine["access_token"] == record["access_token"]
    assert 4 <= mine["expires_at"] - record["expires_at"] <= 6  # in the host's own (fast) time
    # the metrics file is written by its own thread, a moment after the refresh it shows
    leading = ("wxtoken_leader", (("app", "main"),))
    wait_until(lambda: prom.exists() and samples(prom).get(leading) == 1, timeout=10)
    exported = samples(prom)
    assert exported[("wxtoken_redis_up", ())] == 1
    assert exported[leading] == 1
    assert ("wxtoken_clock_skew_seconds", ()) in exported
    assert first.stop() == 0 and second.stop() == 0
    leadership = [e for e in first.events() if e["event"] == "fleet.leadership"]
    assert leadership and leadership[0]["leader"] is True


def test_a_followers_report_with_no_candidate_for_the_app_is_answered_at_once(
        emulator: Emulator, hosts: Callable[..., Path], daemons: Callable[..., DaemonProcess]
        ) -> None:
    """A follower's passive refresh when the only candidate host listening has other apps:
    an immediate answer that no host with this app's secret is listening."""
    from wxtoken import ControlError, report_invalid

    from helpers import APPID2, SECRET2, socket_of
    other = hosts({"mini": {"appid": APPID2, "secret": SECRET2}})
    follower = hosts(FOLLOW)
    procs = [daemons(other), daemons(follower)]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    started = time.monotonic()
    with pytest.raises(ControlError) as err:
        report_invalid("main", "a-token-0123456789", str(state_of(follower)),
                       socket_of(follower))
    assert time.monotonic() - started < 2
    assert "no host with its secret is listening" in str(err.value)
    for d in procs:
        assert d.stop() == 0


def test_quota_resets_are_counted_for_the_fleet_and_a_follower_has_none_to_make(
        emulator: Emulator, hosts: Callable[..., Path], redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """clear-quota on one candidate counts in Redis: the other candidate sees the month's
    resets and, at ten, refuses locally; a follower (no secret) answers that it has none to
    make; every host can look at the quota (with its copy of the token)."""
    a, b = hosts(MAIN), hosts(MAIN)
    follower = hosts(FOLLOW)
    procs = [daemons(c) for c in (a, b, follower)]
    for d in procs:
        d.wait_for("daemon.ready", timeout=15)
    for _ in range(9):
        assert run_cli("clear-quota", "main", "--yes", "--config", str(a)).returncode == 0
    seen = run_cli("quota", "main", "--json", "--config", str(b))
    assert seen.returncode == 0, seen.stderr
    assert json.loads(seen.stdout)["resets"]["used"] == 9
    tenth = run_cli("clear-quota", "main", "--yes", "--config", str(b))
    assert tenth.returncode == 0 and "10 of 10 resets used" in tenth.stdout, tenth.stderr
    refused = run_cli("clear-quota", "main", "--yes", "--config", str(a))
    assert refused.returncode == 1 and "10 of WeChat's 10 quota resets" in refused.stderr
    none = run_cli("clear-quota", "main", "--yes", "--config", str(follower))
    assert none.returncode == 1 and "this host has no secret for main" in none.stderr
    looked = run_cli("quota", "main", "--config", str(follower))
    assert looked.returncode == 0, looked.stderr
    assert emulator.stats()["ops"]["/cgi-bin/clear_quota/v2"] == 10
    keys = [k.decode() if isinstance(k, bytes) else k
            for k in redis_server.client().keys("*resets*")]
    assert len(keys) == 1 and keys[0].startswith(f"wxtoken:resets:{{{APPID}}}:")
    for d in procs:
        assert d.stop() == 0
