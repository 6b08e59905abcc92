"""Issue 16 items 6 and 7: late events and lost answers on an Open Platform.

- An ``unauthorized`` push is ordered against the authorization held by WeChat's time alone
  (CreateTime): one sent before it (WeChat's retry of an earlier failed push, a replay) never
  removes it, on one host or a fleet, also after a restart; a tie, or no WeChat time on either
  side, is decided by WeChat's authorizer list, read after the event.
- An ``api_query_auth`` whose answer is lost after WeChat used the code (the emulator's ``lost``
  fault) is taken from the authorizer list within a minute.

Through real daemons, the real callback, the emulator and (for the fleet) a real redis-server.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from test_component import AES_KEY, COMP, MSG_TOKEN, SECRET, Platform, auth, wait_component
from test_component_fleet import Host, events
from wxtoken.emulator import Emulator

from helpers import DaemonProcess, read_json, wait_until
from redis_server import RedisServer


@pytest.fixture
def platform(tmp_path: Path, emulator: Emulator, sock_dir: Path) -> Iterator[Platform]:
    emulator.state.settings.token_ttl = 60
    yield Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                   renew_before=10)


@pytest.fixture
def fleet(tmp_path: Path, emulator: Emulator,
          redis_server: RedisServer) -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(secret: bool = True, callback: bool = False) -> Host:
        host = Host(tmp_path / f"host{len(made)}", emulator, redis_server.url, secret,
                    callback, refresh_interval=600, renew_before=10)
        made.append(host)
        return host

    yield make
    for host in made:
        shutil.rmtree(host.sock, ignore_errors=True)


def authorize_at(emulator: Emulator, url: str, appid: str, created: int) -> None:
    """A merchant authorizes the platform; WeChat's push says it happened at ``created``."""
    code = emulator.platforms.authorize(COMP, appid, push=False)
    comp = emulator.platforms.components[COMP]
    comp_url, comp.callback = comp.callback, url
    try:
        assert emulator.platforms.push(comp, {
            "InfoType": "authorized", "AuthorizerAppid": appid, "AuthorizationCode": code,
            "AuthorizationCodeExpiredTime": str(created + 3600)}, created=created)
    finally:
        comp.callback = comp_url


def unauthorized(emulator: Emulator, created: int | str) -> tuple[dict[str, str], bytes]:
    """A correctly signed ``unauthorized`` push for auth(1) stamped ``created`` (CreateTime),
    as (query, body): what WeChat's retry of an earlier push looks like."""
    plat = emulator.platforms
    comp = plat.components[COMP]
    return plat.sealed(comp, plat.message(
        comp, {"InfoType": "unauthorized", "AuthorizerAppid": auth(1)}, created))


def post(url: str, sealed: tuple[dict[str, str], bytes]) -> None:
    answer = requests.post(url, params=sealed[0], data=sealed[1], timeout=5)
    assert (answer.status_code, answer.text) == (200, "success")


def listed(emulator: Emulator, appid: str) -> bool:
    with emulator.state.lock:
        return appid in emulator.platforms.components[COMP].authorizers


def kept(directory: Path, appid: str) -> bool:
    return (directory / f"{appid}.json").exists() \
        and (directory / ".private" / "refresh" / f"{appid}.json").exists()


def named(d: DaemonProcess, name: str, appid: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name and e.get("app") == appid]


def pending(directory: Path, table: str) -> dict[str, Any]:
    doc = read_json(directory / ".platform.json")
    found = doc.get(table) or {}
    assert isinstance(found, dict)
    return found


# -- item 6: one host ----------------------------------------------------------------------------
def test_a_late_unauthorized_never_removes_a_later_authorization_even_after_a_restart(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Authorize, then a correctly signed `unauthorized` stamped 120 s before the
    authorization (WeChat retrying an earlier push): ignored with a warning and answered
    success; the token file and refresh token stay, WeChat still lists the authorizer. The
    same push replayed after a restart (the duplicate set of the callback is gone) is ignored
    too: the authorization's WeChat time is kept with its refresh token."""
    d = daemons(platform.config)
    wait_component(d, platform)
    created = int(time.time())
    authorize_at(emulator, platform.url, auth(1), created)
    wait_until(lambda: kept(platform.dir, auth(1)), timeout=15)
    d.wait_for("authorizers.reconciled")  # the reconcile at start would put it back
    late = unauthorized(emulator, created - 120)
    post(platform.url, late)
    time.sleep(2)  # the files were deleted within 2 s
    assert kept(platform.dir, auth(1)) and listed(emulator, auth(1))
    ignored = d.wait_for("authorizer.unauthorized_ignored")
    assert ignored["app"] == auth(1) and ignored["level"] == "warning"
    assert ignored["sent_at"] == created - 120 and ignored["authorized_at"] == created
    assert emulator.token_status(platform.token(auth(1))) == 0
    assert not pending(platform.dir, "cancelling")
    assert d.stop() == 0
    d = daemons(platform.config)
    d.wait_for("daemon.ready", timeout=15)
    post(platform.url, late)  # the very same message again, within its 10 minutes
    d.wait_for("authorizer.unauthorized_ignored")
    time.sleep(1)  # a removal, were it coming, would be done by now
    assert kept(platform.dir, auth(1))
    assert emulator.token_status(platform.token(auth(1))) == 0
    assert not named(d, "authorizer.removed", auth(1))
    assert d.stop() == 0


def test_an_unauthorized_stamped_the_same_second_is_decided_by_the_authorizer_list(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """CreateTime has whole seconds: an `unauthorized` stamped the second of the authorization
    cannot be ordered against it. WeChat's authorizer list, read after the event, still lists
    the authorizer: it is kept (one list read)."""
    d = daemons(platform.config)
    wait_component(d, platform)
    created = int(time.time())
    authorize_at(emulator, platform.url, auth(1), created)
    wait_until(lambda: kept(platform.dir, auth(1)), timeout=15)
    d.wait_for("authorizers.reconciled")
    lists = platform.calls("authorizer_list")
    post(platform.url, unauthorized(emulator, created))
    ignored = d.wait_for("authorizer.unauthorized_ignored")
    assert ignored["app"] == auth(1) and "still lists" in ignored["reason"]
    assert kept(platform.dir, auth(1))
    assert not named(d, "authorizer.removed", auth(1))
    assert d.stop() == 0
    assert platform.calls("authorizer_list") == lists + 1


def test_an_unauthorized_without_a_wechat_time_keeps_a_listed_authorizer(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """An `unauthorized` whose CreateTime is not a time (bad input) cannot be ordered: the
    authorizer WeChat still lists keeps its files; the token file is never damaged."""
    d = daemons(platform.config)
    wait_component(d, platform)
    authorize_at(emulator, platform.url, auth(1), int(time.time()))
    wait_until(lambda: kept(platform.dir, auth(1)), timeout=15)
    before = (platform.dir / f"{auth(1)}.json").read_bytes()
    post(platform.url, unauthorized(emulator, "\uff11700000000"))  # not ASCII digits
    ignored = d.wait_for("authorizer.unauthorized_ignored")
    assert "still lists" in ignored["reason"]
    assert (platform.dir / f"{auth(1)}.json").read_bytes() == before
    assert kept(platform.dir, auth(1))
    assert d.stop() == 0


def test_a_cancellation_of_an_authorizer_from_the_list_is_confirmed_even_across_a_restart(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """An authorizer found in the authorizer list has no WeChat time to order a cancellation
    against: WeChat is asked. While the list cannot be read the files stay and the
    cancellation is kept (.platform.json); after a restart it is decided: WeChat no longer
    lists the authorizer, its files go."""
    emulator.platforms.authorize(COMP, auth(1), push=False)  # found by the reconcile at start
    d = daemons(platform.config)
    wait_component(d, platform)
    wait_until(lambda: kept(platform.dir, auth(1)), timeout=15)
    d.wait_for("authorizers.reconciled")
    emulator.add_fault("5xx", api="authorizer_list")
    emulator.platforms.unauthorize(COMP, auth(1))  # the merchant cancels: pushed now
    unconfirmed = d.wait_for("authorizer.unauthorized_unconfirmed")
    assert unconfirmed["app"] == auth(1) and unconfirmed["level"] == "warning"
    assert kept(platform.dir, auth(1))
    assert auth(1) in pending(platform.dir, "cancelling")
    assert d.stop() == 0
    emulator.clear_faults()
    d = daemons(platform.config)
    wait_until(lambda: not (platform.dir / f"{auth(1)}.json").exists(), timeout=20)
    wait_until(lambda: named(d, "authorizer.removed", auth(1)), timeout=10)
    assert not (platform.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    assert not pending(platform.dir, "cancelling")
    assert d.stop() == 0


# -- item 6: a fleet -----------------------------------------------------------------------------
def test_a_late_unauthorized_on_a_fleet_removes_nothing_on_any_host(
        fleet: Callable[..., Host], emulator: Emulator, redis_server: RedisServer,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A late `unauthorized` reaching a follower, then a candidate: Redis refuses the removal
    (sent before the fleet's authorization, by CreateTime) and no host deletes its files."""
    emulator.state.settings.token_ttl = 60
    a = fleet(callback=True)
    b = fleet()
    c = fleet(secret=False, callback=True)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, a.url, 2)
    da, db, dc = daemons(a.config), daemons(b.config), daemons(c.config)
    wait_until(lambda: all(h.has(COMP) for h in (a, b, c)), timeout=20)
    created = int(time.time())
    authorize_at(emulator, a.url, auth(1), created)
    wait_until(lambda: all(h.has(auth(1)) for h in (a, b, c)), timeout=20)
    late = created - 120
    post(c.url, unauthorized(emulator, late))  # the follower
    post(a.url, unauthorized(emulator, late))  # a candidate
    time.sleep(2)  # the files were deleted within 2 s
    assert all(h.has(auth(1)) for h in (a, b, c))
    assert all(kept(h.dir, auth(1)) for h in (a, b))
    assert dc.wait_for("authorizer.unauthorized_ignored")["app"] == auth(1)
    assert da.wait_for("authorizer.unauthorized_ignored")["app"] == auth(1)
    r = redis_server.client()
    base = f"wxtoken:{{{COMP}:component}}"
    assert r.sismember(f"{base}:authorizers", auth(1)) and r.hexists(f"{base}:refresh", auth(1))
    assert not r.exists(f"{base}:gone:{auth(1)}")
    for d in (da, db, dc):
        assert not named(d, "authorizer.removed", auth(1))
        assert "Traceback" not in d.log_path.read_text()
        assert d.stop() == 0


@pytest.mark.parametrize("cancelled", [False, True], ids=["still-listed", "cancelled"])
def test_a_fleets_follower_hands_an_unordered_unauthorized_to_a_candidate_that_asks_wechat(
        cancelled: bool, fleet: Callable[..., Host], emulator: Emulator,
        redis_server: RedisServer, daemons: Callable[..., DaemonProcess]) -> None:
    """An authorizer found in the authorizer list (no WeChat time): an `unauthorized` reaching
    the follower (which calls nothing) is handed to a candidate, which asks WeChat. Still
    listed (a forged or stale push): kept on every host. Cancelled for real: removed on every
    host."""
    emulator.state.settings.token_ttl = 60
    a = fleet(callback=True)
    b = fleet()
    c = fleet(secret=False, callback=True)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, c.url, 2)
    emulator.platforms.authorize(COMP, auth(1), push=False)  # found by the reconcile
    da, db, dc = daemons(a.config), daemons(b.config), daemons(c.config)
    wait_until(lambda: all(h.has(auth(1)) for h in (a, b, c)), timeout=30)
    if cancelled:
        emulator.platforms.unauthorize(COMP, auth(1))  # the merchant cancels, pushed to C
    else:
        post(c.url, unauthorized(emulator, int(time.time())))
    dc.wait_for("authorizer.unauthorized_handed_over")
    r = redis_server.client()
    base = f"wxtoken:{{{COMP}:component}}"
    if cancelled:
        wait_until(lambda: not any(h.has(auth(1)) for h in (a, b, c)), timeout=20)
        assert not r.sismember(f"{base}:authorizers", auth(1))
    else:
        wait_until(lambda: any(named(d, "authorizer.unauthorized_ignored", auth(1))
                               for d in (da, db)), timeout=20)
        time.sleep(1)  # a removal, were it coming, would be done by now
        assert all(h.has(auth(1)) for h in (a, b, c))
        assert r.sismember(f"{base}:authorizers", auth(1))
    for d in (da, db, dc):
        assert "Traceback" not in d.log_path.read_text()
        assert d.stop() == 0
    assert not events(dc, "authorizer.not_handed_over")


# -- item 7 --------------------------------------------------------------------------------------
def test_an_authorization_whose_exchange_answer_is_lost_is_taken_from_the_list(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """api_query_auth is carried out (WeChat stores the authorization, uses the code) but its
    answer is lost; the retry gets 61009. Within a minute the authorizer list gives the
    refresh token: a token file WeChat accepts and a refresh token, no human."""
    d = daemons(platform.config)
    wait_component(d, platform)
    emulator.add_fault("lost", api="query_auth", appid=auth(1), count=1)
    started = time.monotonic()
    emulator.platforms.authorize(COMP, auth(1))
    wait_until(lambda: kept(platform.dir, auth(1)), timeout=60)
    assert time.monotonic() - started < 60
    wait_until(lambda: emulator.token_status(platform.token(auth(1))) == 0, timeout=10)
    adopted = d.wait_for("authorizer.adopted")
    assert adopted["app"] == auth(1) and adopted["level"] == "warning"
    failed = named(d, "authorizer.authorization_failed", auth(1))
    assert failed and failed[0]["from_list"] is True
    assert not pending(platform.dir, "adopting")
    assert d.stop() == 0
    assert emulator.calls(api="query_auth") >= 1


def test_a_lost_exchange_is_taken_from_the_list_after_a_restart(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The answer is lost and the authorizer list cannot be read either: the authorization to
    take from the list is kept (.platform.json) and taken after a restart."""
    d = daemons(platform.config)
    wait_component(d, platform)
    d.wait_for("authorizers.reconciled")
    emulator.add_fault("lost", api="query_auth", appid=auth(1), count=1)
    emulator.add_fault("5xx", api="authorizer_list")
    emulator.platforms.authorize(COMP, auth(1))
    wait_until(lambda: auth(1) in pending(platform.dir, "adopting"), timeout=15)
    assert d.stop() == 0
    assert not (platform.dir / f"{auth(1)}.json").exists()
    emulator.clear_faults()
    d = daemons(platform.config)
    wait_until(lambda: kept(platform.dir, auth(1)), timeout=30)
    wait_until(lambda: emulator.token_status(platform.token(auth(1))) == 0, timeout=10)
    d.wait_for("authorizer.adopted")
    assert not any(e.get("event") == "authorizers.reconciled" for e in d.events())
    assert d.stop() == 0


def test_a_lost_exchange_on_a_fleet_reaches_every_host(
        fleet: Callable[..., Host], emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """On a fleet the candidate that took the code takes the authorization from the list; the
    other candidate and the follower get the token as for any authorization."""
    emulator.state.settings.token_ttl = 60
    a = fleet(callback=True)
    b = fleet()
    c = fleet(secret=False)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, a.url, 2)
    da, db, dc = daemons(a.config), daemons(b.config), daemons(c.config)
    wait_until(lambda: all(h.has(COMP) for h in (a, b, c)), timeout=20)
    emulator.add_fault("lost", api="query_auth", appid=auth(1), count=1)
    emulator.platforms.authorize(COMP, auth(1))
    wait_until(lambda: all(h.has(auth(1)) for h in (a, b, c)), timeout=60)
    wait_until(lambda: len({h.token(auth(1)) for h in (a, b, c)}) == 1, timeout=10)
    assert emulator.token_status(c.token(auth(1))) == 0
    assert da.wait_for("authorizer.adopted")["app"] == auth(1)
    for d in (da, db, dc):
        assert "Traceback" not in d.log_path.read_text()
        assert d.stop() == 0


def test_redis_orders_an_unauthorized_by_wechats_time_and_confirms_the_rest(
        tmp_path: Path, emulator: Emulator, redis_server: RedisServer) -> None:
    """The fleet's decision against a real Redis: an `unauthorized` sent before the fleet's
    authorization (CreateTime) is refused, one sent after it removes the authorizer; a tie or
    a missing time asks for WeChat's word, and the removal WeChat confirmed is refused when the
    authorizer authorized again meanwhile. A rotation keeps the authorization's WeChat time;
    an import has none."""
    from wxtoken.component.fleet import PlatformFleet, Pushed, Verdict
    from wxtoken.config import load_config
    from wxtoken.fleet.shared import Fleet
    host = Host(tmp_path / "h", emulator, redis_server.url, True, False)
    config = load_config(str(host.config))
    assert config.redis is not None
    fleet = Fleet(config, config.redis)
    pf = PlatformFleet(fleet, config.components[0])
    r = redis_server.client()
    aid = auth(7)

    def authorize(rt: str, at: float, wechat: float | None) -> None:
        doc: dict[str, object] = {"refresh_token": rt, "updated_at": at, "authorized_at": at}
        if wechat is not None:
            doc["wechat_at"] = wechat
        assert pf.push_refresh(aid, doc, authorized=True) == Pushed.STORED

    def member() -> bool:
        return bool(r.sismember(pf.members_key, aid))

    authorize("R0", 1000.0, 1000.0)
    assert pf.cancel(aid, 880.0) == (Verdict.REFUSED, ("", ""))  # WeChat's retry of an earlier push
    assert member() and not r.exists(f"{pf.base}:gone:{aid}")
    # a rotation (its doc without the WeChat time) keeps the chain's
    assert pf.push_refresh(aid, {"refresh_token": "R1", "updated_at": 1001.0,
                                 "authorized_at": 1000.0}, after=("R0",)) == Pushed.STORED
    assert pf.cancel(aid, 999.0) == (Verdict.REFUSED, ("", ""))
    tie = pf.cancel(aid, 1000.0)
    assert tie is not None and tie[0] == Verdict.CONFIRM and member()
    assert pf.cancel(aid, None) == tie  # no time on the event: the same question
    authorize("N0", 1005.0, 1005.0)  # authorized again while WeChat was asked
    assert pf.remove(aid, 1000.0, tie[1]) is False and member()
    tie = pf.cancel(aid, 1005.0)
    assert tie is not None and tie[0] == Verdict.CONFIRM
    assert pf.remove(aid, 1005.0, tie[1]) is True and not member()
    assert float(r.get(f"{pf.base}:gone:{aid}") or 0) == 1005.0
    authorize("I0", 2000.0, None)  # an import: no WeChat time, whatever the event's
    verdict = pf.cancel(aid, 2500.0)
    assert verdict is not None and verdict[0] == Verdict.CONFIRM and member()
    authorize("N1", 3000.0, 3000.0)
    assert pf.cancel(aid, 3001.0) == (Verdict.REMOVED, ("", "")) and not member()
    assert pf.cancel(aid, 10.0) == (Verdict.REMOVED, ("", ""))  # the fleet holds none: nothing kept
    assert float(r.get(f"{pf.base}:gone:{aid}") or 0) == 3001.0  # a late one keeps the time
    fleet.client.close()
