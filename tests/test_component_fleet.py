"""The Open Platform on a fleet: the ticket, the component token, the authorizers' tokens and
their refresh tokens in Redis, leases per token, followers mirroring every file; through real
daemons, a real redis-server of the test's own and the emulator pushing to one host's callback.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from test_component import AES_KEY, COMP, MSG_TOKEN, SECRET, auth, free_port
from wxtoken import read_token
from wxtoken.emulator import Emulator

from helpers import DaemonProcess, read_json, run_cli, wait_until
from redis_server import RedisServer


class Host:
    """One host of the fleet: its config, state and (maybe) callback URL."""

    def __init__(self, base: Path, emulator: Emulator, redis_url: str, secret: bool,
                 callback: bool, **top: object) -> None:
        base.mkdir(parents=True)
        self.state = base / "state"
        self.dir = self.state / "components" / "plat"
        self.config = base / "config.toml"
        self.sock = Path(tempfile.mkdtemp(prefix="wxcf-", dir="/tmp"))
        self.port = free_port()
        settings: dict[str, object] = {
            "state_dir": str(self.state), "api_base": emulator.url, "log_format": "json",
            "control_socket": str(self.sock / "c.sock"), **top}
        if callback:
            settings["callback_listen"] = f"127.0.0.1:{self.port}"
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += ["[redis]", f"url = {json.dumps(redis_url)}",
                  "[components.plat]", f'component_appid = "{COMP}"',
                  f'msg_token = "{MSG_TOKEN}"', f'encoding_aes_key = "{AES_KEY}"',
                  'tickets = ["jsapi"]']
        if secret:
            lines.append(f'secret = "{SECRET}"')
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o600)
        self.url = f"http://127.0.0.1:{self.port}/components/plat/callback"

    def token(self, appid: str) -> str:
        return str(read_token(appid, str(self.state), component="plat"))

    def has(self, appid: str) -> bool:
        return (self.dir / f"{appid}.json").exists()


@pytest.fixture
def fleet(tmp_path: Path, emulator: Emulator, redis_server: RedisServer,
          daemons: Callable[..., DaemonProcess]) -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(secret: bool = True, callback: bool = False, **top: object) -> Host:
        host = Host(tmp_path / f"host{len(made)}", emulator, redis_server.url, secret,
                    callback, **top)
        made.append(host)
        return host

    yield make
    for host in made:
        shutil.rmtree(host.sock, ignore_errors=True)


def s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def same_token(hosts: tuple[Host, ...], appid: str) -> bool:
    return len({h.token(appid) for h in hosts}) == 1


def accepted(emulator: Emulator, host: Host, appid: str) -> bool:
    return emulator.token_status(host.token(appid)) == 0


def events(d: DaemonProcess, name: str) -> list[dict[str, object]]:
    return [e for e in d.events() if e.get("event") == name]


def removed(d: DaemonProcess, appid: str) -> bool:
    """Whether the host removed the authorizer's files (the line follows the last one)."""
    return any(e["app"] == appid for e in events(d, "authorizer.removed"))


def test_a_platform_on_a_fleet_one_call_per_token_and_every_host_has_every_file(
        fleet: Callable[..., Host], emulator: Emulator, redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """WeChat pushes to one host only (behind the load balancer it is any one): two candidates
    and a follower end with the same component and authorizer tokens, fetched once each for the
    whole fleet; the refresh tokens are in Redis and on the candidates, never on the follower;
    an authorization or a cancellation reaching the follower is handled; Redis without
    persistence is warned about."""
    emulator.state.settings.token_ttl = 60
    top = {"refresh_interval": 600, "renew_before": 10}
    a = fleet(callback=True, **top)
    b = fleet(**top)
    c = fleet(secret=False, callback=True, **top)
    shown = run_cli("check-config", "--config", str(c.config)).stdout
    assert f"[components.plat]\ncomponent_appid = \"{COMP}\"" in shown
    assert "this host follows the platform" in shown and MSG_TOKEN not in shown
    shown = run_cli("check-config", "--config", str(a.config)).stdout
    assert 'secret = "***"  # from inline' in shown and SECRET not in shown
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, a.url, 2)
    da, db, dc = daemons(a.config), daemons(b.config), daemons(c.config)
    for d in (da, db, dc):
        d.wait_for("daemon.ready", timeout=20)
        assert events(d, "redis.no_persistence")[0]["level"] == "warning"
    wait_until(lambda: all(h.has(COMP) for h in (a, b, c)), timeout=20)
    for i in range(3):
        emulator.platforms.authorize(COMP, auth(i))
    wait_until(lambda: all(h.has(auth(i)) for h in (a, b, c) for i in range(3)), timeout=20)
    for i in range(3):
        wait_until(functools.partial(same_token, (a, b, c), auth(i)), timeout=10)
        assert emulator.token_status(a.token(auth(i))) == 0
    assert len({h.token(COMP) for h in (a, b, c)}) == 1
    assert emulator.calls(api="component_token") == 1
    assert emulator.calls(api="query_auth") == 3
    assert emulator.calls(api="authorizer_token") == 0  # the codes' tokens are still fresh
    r = redis_server.client()
    base = f"wxtoken:{{{COMP}:component}}"
    assert {s(m) for m in r.smembers(f"{base}:authorizers")} == {auth(i) for i in range(3)}
    stored = {s(k): json.loads(v) for k, v in r.hgetall(f"{base}:refresh").items()}
    with emulator.state.lock:
        latest = {a_.appid: a_.latest for a_ in comp.authorizers.values()}
    assert {k: v["refresh_token"] for k, v in stored.items()} == latest
    assert r.exists(f"wxtoken:{{{auth(0)}:authorizer:{COMP}}}:record")
    assert all(SECRET not in s(k) and "refreshtoken" not in s(k) for k in r.keys("*"))
    for h in (a, b):
        assert {p.stem for p in (h.dir / ".private" / "refresh").iterdir()} == \
            {auth(i) for i in range(3)}
    assert not any((c.dir / ".private" / "refresh").iterdir())
    # the ticket reached the other hosts through Redis
    assert read_json(b.dir / ".private" / "ticket.json")["latest"]["ticket"]
    # the follower serves reads, and says who can refresh
    assert run_cli("token", "--component", "plat", auth(0), "--config",
                   str(c.config)).stdout.strip() == a.token(auth(0))
    refused = run_cli("refresh", "--component", "plat", auth(0), "--config", str(c.config))
    assert refused.returncode != 0 and "only follows component plat" in refused.stderr
    status = json.loads(run_cli("status", "--json", "--config", str(c.config)).stdout)
    assert len(status["components"][0]["authorizers"]) == 3
    # WeChat's pushes move to the follower (the load balancer): an authorization is handed to
    # a candidate, a cancellation removes the files everywhere
    emulator.platforms.components[COMP].callback = c.url
    emulator.platforms.authorize(COMP, auth(3))
    wait_until(lambda: all(h.has(auth(3)) for h in (a, b, c)), timeout=20)
    assert emulator.calls(api="query_auth") == 4
    # the candidate logs authorizer.authorized after writing the token (to Redis, then its
    # file): the other hosts' files can be there before the line
    wait_until(lambda: any(e["app"] == auth(3) for d in (da, db)
                           for e in events(d, "authorizer.authorized")), timeout=10)
    assert not events(dc, "authorizer.authorized")  # the follower called nothing
    assert not any((c.dir / ".private" / "refresh").iterdir())
    emulator.platforms.unauthorize(COMP, auth(1))
    wait_until(lambda: not any(h.has(auth(1)) for h in (a, b, c)), timeout=20)
    # an authorizer's token file goes first, its refresh token last, then authorizer.removed
    for d in (da, db):
        wait_until(functools.partial(removed, d, auth(1)), timeout=10)
    assert not (a.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    assert not (b.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    assert not r.hexists(f"{base}:refresh", auth(1))
    for d in (da, db, dc):
        assert "Traceback" not in d.log_path.read_text()
        for i in range(4):
            rt = latest.get(auth(i))
            assert rt is None or rt not in d.log_path.read_text()
        assert d.stop() == 0


def test_the_leader_killed_the_other_candidate_goes_on_with_the_fleets_refresh_tokens(
        fleet: Callable[..., Host], emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Every api_authorizer_token call rotates the refresh token. Two candidates refresh in
    turns; one is SIGKILLed, WeChat's pushes stop with it: the other goes on refreshing every
    authorizer with the refresh tokens the fleet holds (never a 61023 repair, never a human)
    and the component token with the last ticket it got through Redis."""
    emulator.state.settings.token_ttl = 8
    top = {"refresh_interval": 600, "renew_before": 3}
    a = fleet(callback=True, **top)
    b = fleet(**top)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, a.url, 1)
    da, db = daemons(a.config), daemons(b.config)
    n = 4
    wait_until(lambda: a.has(COMP) and b.has(COMP), timeout=20)
    for i in range(n):
        emulator.platforms.authorize(COMP, auth(i))
    wait_until(lambda: all(b.has(auth(i)) for i in range(n)), timeout=20)
    rotated = emulator.calls(api="authorizer_token")
    time.sleep(12)  # a few rotations, by whichever host takes each lease
    assert emulator.calls(api="authorizer_token") >= rotated + n
    da.stop(signal.SIGKILL)
    emulator.platforms.components[COMP].pushing = False
    before = emulator.calls(api="authorizer_token")
    components = emulator.calls(api="component_token")
    time.sleep(12)  # a few rotations more, by B alone
    assert emulator.calls(api="authorizer_token") >= before + n
    assert emulator.calls(api="component_token") > components
    for i in range(n):
        wait_until(functools.partial(accepted, emulator, b, auth(i)), timeout=10)
    assert emulator.token_status(b.token(COMP)) == 0
    names = [e.get("event") for e in db.events()]
    # B always had the newest refresh token: not the one before it, not the list's
    assert "authorizer.previous_refresh_token" not in names
    assert "authorizer.repaired" not in names and "authorizer.needs_reauthorization" not in names
    assert db.stop() == 0


def test_redis_restarted_empty_gets_the_refresh_tokens_back_from_the_candidates(
        fleet: Callable[..., Host], emulator: Emulator, redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Without persistence a Redis restart loses everything (the warning said so): the
    candidates put the authorizers and their refresh tokens back from their own files with no
    call, the follower keeps its files, and an authorization after it reaches every host."""
    emulator.state.settings.token_ttl = 60
    top = {"refresh_interval": 600, "renew_before": 10}
    a = fleet(callback=True, **top)
    c = fleet(secret=False, **top)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, a.url, 2)
    da, dc = daemons(a.config), daemons(c.config)
    for i in range(3):
        emulator.platforms.authorize(COMP, auth(i))
    wait_until(lambda: all(h.has(auth(i)) and "jsapi_ticket" in read_json(
        h.dir / f"{auth(i)}.json") for h in (a, c) for i in range(3)), timeout=20)
    calls = emulator.calls()
    redis_server.restart()
    r = redis_server.client()
    base = f"wxtoken:{{{COMP}:component}}"
    wait_until(lambda: r.hlen(f"{base}:refresh") == 3, timeout=30)
    assert r.scard(f"{base}:authorizers") == 3
    # logged once every refresh token is pushed: after the last one is in Redis
    wait_until(lambda: events(da, "fleet.refresh_tokens_reseeded"), timeout=10)
    assert emulator.calls() == calls  # no upstream call at all
    assert all(c.has(auth(i)) for i in range(3))
    emulator.platforms.authorize(COMP, auth(5))
    wait_until(lambda: c.has(auth(5)), timeout=20)
    assert c.token(auth(5)) == a.token(auth(5))
    assert da.stop() == 0 and dc.stop() == 0


def test_a_cancellation_while_redis_hangs_reaches_every_host_when_it_is_back(
        fleet: Callable[..., Host], emulator: Emulator, redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """An `unauthorized` reaches one host while Redis hangs (SIGSTOP: it keeps its data): that
    host removes its files at once, answers WeChat in time, and tells the fleet when Redis is
    back; the other candidate then removes its files too and does not put the authorizer back
    into Redis."""
    emulator.state.settings.token_ttl = 60
    top = {"refresh_interval": 600, "renew_before": 10}
    a = fleet(callback=True, **top)
    b = fleet(**top)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, a.url, 2)
    da, db = daemons(a.config), daemons(b.config)
    for i in range(2):
        emulator.platforms.authorize(COMP, auth(i))
    wait_until(lambda: all(h.has(auth(i)) for h in (a, b) for i in range(2)), timeout=20)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        emulator.platforms.unauthorize(COMP, auth(1))  # pushed to A's callback
        assert time.monotonic() - started < 3  # answered while Redis hangs
        wait_until(lambda: not a.has(auth(1)), timeout=15)
        assert b.has(auth(1))  # B cannot know yet
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: not b.has(auth(1)), timeout=30)
    wait_until(functools.partial(removed, db, auth(1)), timeout=10)  # its refresh token too
    assert not (b.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    r = redis_server.client()
    base = f"wxtoken:{{{COMP}:component}}"
    assert not r.sismember(f"{base}:authorizers", auth(1))
    assert not r.hexists(f"{base}:refresh", auth(1))
    assert r.exists(f"{base}:gone:{auth(1)}")
    assert a.has(auth(0)) and b.has(auth(0))
    # A forgets the tombstone once Redis took the removal, which B may act on first
    wait_until(lambda: "removed" not in read_json(a.dir / ".platform.json"), timeout=10)
    for d in (da, db):
        assert "Traceback" not in d.log_path.read_text()
        assert d.stop() == 0


def test_refresh_tokens_in_redis_follow_the_rotation_chain(
        tmp_path: Path, emulator: Emulator, redis_server: RedisServer) -> None:
    """The fleet's refresh-token entries against a real Redis: a token replaces the fleet's
    only when it follows from it (a holder paused past its lease, whose predecessor is no
    longer the fleet's, is refused, whatever the clocks say); an authorization starts a new
    chain; a host takes the fleet's unless its own follows from it, keeping its own as a
    spare; a removal keeps a late refresh from bringing the authorizer back, but not a later
    authorization, and a removal told late does not undo an authorization made since."""
    from wxtoken.component.fleet import PlatformFleet, Pushed
    from wxtoken.component.store import ComponentFiles
    from wxtoken.config import load_config
    from wxtoken.fleet.shared import Fleet
    host = Host(tmp_path / "h", emulator, redis_server.url, True, False)
    config = load_config(str(host.config))
    assert config.redis is not None
    fleet = Fleet(config, config.redis)
    pf = PlatformFleet(fleet, config.components[0])
    r = redis_server.client()
    aid = auth(7)

    def fleets() -> str:
        raw = r.hget(pf.refresh_key, aid)
        assert raw is not None
        return str(json.loads(raw)["refresh_token"])

    def push(rt: str, *after: str, authorized_at: float | None = None,
             authorized: bool = False) -> int:
        doc: dict[str, object] = {"refresh_token": rt, "updated_at": 1.0}
        if after:
            doc["previous"] = after[0]  # the one used; the others were refused
        if authorized_at is not None:
            doc["authorized_at"] = authorized_at
        return pf.push_refresh(aid, doc, authorized, after)

    assert push("R0", authorized_at=100.0, authorized=True) == Pushed.STORED
    assert push("R1", "R0") == Pushed.STORED  # B rotated R0 -> R1
    assert push("R1b", "R0") == Pushed.OLDER  # A, paused past its lease, also rotated R0
    assert fleets() == "R1"
    assert push("R2", "R1", "R1x") == Pushed.STORED  # R1 used, R1x refused on the way
    files = ComponentFiles(str(host.state), "plat", COMP)
    files.ensure()
    files.store_refresh(aid, "R1b", 5.0, previous="R0")
    pf.pull_refresh(aid, files)  # another chain: the fleet's is taken, this one kept as spare
    mine = files.refresh(aid) or {}
    assert (mine["refresh_token"], mine["previous"], mine["spare"]) == ("R2", "R1", "R1b")
    assert [rt for _, rt in files.refresh_candidates(aid)] == ["R2", "R1", "R1b"]
    files.store_refresh(aid, "R3", 6.0, previous="R2")  # rotated here, Redis not told yet
    pf.pull_refresh(aid, files)  # this host's follows from the fleet's: kept
    assert (files.refresh(aid) or {})["refresh_token"] == "R3"
    assert pf.push_refresh(aid, files.refresh(aid) or {}, after=("R2",)) == Pushed.STORED
    assert fleets() == "R3"
    assert pf.remove(aid, 1000.0) is True
    assert not r.hexists(pf.refresh_key, aid) and not r.sismember(pf.members_key, aid)
    assert push("R4", "R3", authorized_at=100.0) == Pushed.GONE  # a late refresh
    assert push("N0", authorized_at=900.0) == Pushed.GONE  # an authorization before the removal
    assert push("N1", authorized_at=1100.0) == Pushed.STORED  # one after it (told late)
    assert r.sismember(pf.members_key, aid) and not r.exists(f"{pf.base}:gone:{aid}")
    assert pf.remove(aid, 1050.0) is False  # a removal told late: the authorization stays
    assert fleets() == "N1"
    # an import: stored whatever the fleet has
    assert push("N2", authorized_at=1200.0, authorized=True) == Pushed.STORED
    assert push("N3", "N2", authorized_at=5.0) == Pushed.STORED  # authorized_at never goes back
    assert json.loads(r.hget(pf.refresh_key, aid) or b"{}")["authorized_at"] == 1200.0
    # rotated twice here while Redis was away: the fleet's is what this host last knew there
    files.store_refresh(aid, "N3", 7.0, previous="N2")
    files.in_step(aid, "N3")
    files.store_refresh(aid, "N4", 8.0, previous="N3")
    files.store_refresh(aid, "N5", 9.0, previous="N4")
    pf.pull_refresh(aid, files)
    assert (files.refresh(aid) or {})["refresh_token"] == "N5"  # not taken back to N3
    assert pf.push_refresh(aid, files.refresh(aid) or {}, after=("N4",)) == Pushed.STORED
    assert fleets() == "N5"
    # authorized here (Redis away) after the fleet's chain began: this host's stays
    files.store_refresh(aid, "A0", 10.0, authorized_at=5000.0)
    pf.pull_refresh(aid, files)
    assert (files.refresh(aid) or {})["refresh_token"] == "A0"
    # Redis restarted empty: the entries put back give way to a later-updated one
    r.hdel(pf.refresh_key, aid)
    assert pf.push_refresh(aid, {"refresh_token": "S1", "updated_at": 10.0},
                           seeded=True) == Pushed.STORED
    assert pf.push_refresh(aid, {"refresh_token": "S2", "updated_at": 20.0},
                           seeded=True) == Pushed.STORED
    assert pf.push_refresh(aid, {"refresh_token": "S0", "updated_at": 15.0},
                           seeded=True) == Pushed.OLDER
    assert fleets() == "S2"
    fleet.client.close()


def test_a_removed_authorizers_token_is_never_put_back_into_redis(
        tmp_path: Path, emulator: Emulator, redis_server: RedisServer) -> None:
    """A host whose authorizer was removed by another (an unauthorized event) still has its
    valid file, and maybe a refresh in flight: neither a look at the record (which re-seeds an
    empty Redis from a newer file) nor the refresh's write puts the token back into Redis or
    rewrites the file, and the refresh makes no call; an authorization after the removal writes
    again. (Found in a fleet test: a host back from a Redis hang re-seeded the record another
    host had just removed, and kept the file.)"""
    from wxtoken.component.fleet import PlatformFleet, Pushed
    from wxtoken.config import Api, AppConfig, load_config
    from wxtoken.errors import Superseded
    from wxtoken.fleet.shared import Fleet
    from wxtoken.fleet.store import FleetStore
    from wxtoken.record import TokenRecord
    from wxtoken.store import FileStore
    host = Host(tmp_path / "h", emulator, redis_server.url, True, False)
    config = load_config(str(host.config))
    assert config.redis is not None
    fleet = Fleet(config, config.redis)
    comp = config.components[0]
    pf = PlatformFleet(fleet, comp)
    r = redis_server.client()
    aid = auth(8)
    host.dir.mkdir(parents=True)
    app = AppConfig(name=aid, api=Api.TOKEN, appid=aid, secret="",  # as component/parts.py
                    secret_source="component plat")
    store = FleetStore(fleet, app, identity=pf.identity(aid),
                       local=FileStore(str(host.dir), aid, 0o640, None), key=f"plat/{aid}",
                       still_removed=lambda: pf.still_removed(aid))  # as authorizers.py
    record_key = f"wxtoken:{{{pf.identity(aid)}}}:record"

    def file_token() -> str:
        return str(read_json(host.dir / f"{aid}.json")["access_token"])

    def token(name: str) -> TokenRecord:
        now = int(time.time())
        return TokenRecord(app=aid, appid=aid, access_token=name, expires_at=now + 7200,
                           refreshed_at=now)

    assert pf.push_refresh(aid, {"refresh_token": "R0", "authorized_at": 100.0},
                           authorized=True) == Pushed.STORED
    with store.locked(10):
        assert store.holding()
        store.write(token("T0"))
    assert r.exists(record_key) and file_token() == "T0"
    with store.locked(10):  # a refresh in flight on this host when another removes it
        assert pf.remove(aid, 1000.0) is True
        assert not r.exists(record_key)
        assert store.read() is None  # no re-seed from this host's (newer) file
        assert not r.exists(record_key)
        assert not store.holding()  # no call for a removed authorizer
        status = store.read_status()
        held = store.checks.before_fetch(app, None, None, status, time.time())
        assert held is not None and held.next_at > time.time() + 60  # nothing counted: waits
        with pytest.raises(Superseded):
            store.write(token("T1"))
    assert not r.exists(record_key) and file_token() == "T0"
    assert store.read() is None and not r.exists(record_key)  # the next look (no lock) either
    # authorized again after the removal: its tokens are the fleet's again
    assert pf.push_refresh(aid, {"refresh_token": "N0", "authorized_at": 2000.0},
                           authorized=True) == Pushed.STORED
    with store.locked(10):
        assert store.holding()
        store.write(token("T2"))
    assert json.loads(r.get(record_key) or b"{}")["access_token"] == "T2"
    assert file_token() == "T2"
    # the mark's deletion lost (a failure after the authorization's push): the authorizer is
    # in the set, so the mark is stale, and the next write deletes it and goes through
    gone_key = f"wxtoken:{{{pf.identity(aid)}}}:gone"
    r.set(gone_key, "1")
    with store.locked(10):
        store.write(token("T3"))
    assert json.loads(r.get(record_key) or b"{}")["access_token"] == "T3"
    assert not r.exists(gone_key) and file_token() == "T3"
    fleet.client.close()
