"""The refresh decision, taken under the lock from the files, with a controlled clock."""

from __future__ import annotations

import itertools
import math
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from wxtoken import schedule
from wxtoken.clock import next_wechat_midnight
from wxtoken.config import Api, AppConfig, Config
from wxtoken.emulator import Emulator
from wxtoken.passive import ForcedState
from wxtoken.record import TokenRecord
from wxtoken.refresher import Refresher
from wxtoken.status import AppStatus
from wxtoken.store import FileStore
from wxtoken.upstream import WeChatClient

from helpers import APPID, APPID2, SECRET, SECRET2, read_json, stored

MAIN = AppConfig(name="main", api=Api.TOKEN, appid=APPID, secret=SECRET)
MINI = AppConfig(name="mini", api=Api.STABLE_TOKEN, appid=APPID2, secret=SECRET2)


class Clock:
    """Wall-clock time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def client(emulator: Emulator) -> Iterator[WeChatClient]:
    c = WeChatClient(emulator.url, timeout=(2.0, 2.0))
    yield c
    c.close()


def make(tmp_path: Path, client: WeChatClient, app: AppConfig = MAIN,
         clock: Callable[[], float] | None = None,
         **settings: Any) -> Refresher:
    config = Config("test.toml", (app,), state_dir=str(tmp_path), **settings)
    return Refresher(config, app, client, clock=clock or Clock(), rng=random.Random(7))


def due(record: TokenRecord, api: Api = Api.TOKEN, interval: float = 3600,
        renew_before: float = 300, apps: int = 1, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [schedule.jittered_due_at(record, schedule.model_of(api), interval, renew_before,
                                     apps, rng)
            for _ in range(200)]


def test_due_time_is_interval_or_renew_before_whichever_first() -> None:
    """Due at refreshed + interval or expiry - renew_before, whichever first; jitter earlier."""
    rec = TokenRecord("main", APPID, "t", expires_at=10_000 + 7200, refreshed_at=10_000)
    assert all(10_000 + 3600 - 30 <= d <= 10_000 + 3600 for d in due(rec))
    short = TokenRecord("main", APPID, "t", expires_at=10_000 + 1000, refreshed_at=10_000)
    assert all(10_000 + 700 - 30 <= d <= 10_000 + 700 for d in due(short))
    tiny = TokenRecord("main", APPID, "t", expires_at=10_000 + 100, refreshed_at=10_000)
    assert all(10_000 + 45 <= d <= 10_000 + 50 for d in due(tiny))  # half-life cap
    spread = due(rec, apps=1000)  # many apps: spread over up to a quarter of the interval
    assert min(spread) < 10_000 + 3600 - 400 and min(spread) >= 10_000 + 3600 - 500


def test_stable_token_is_due_inside_the_last_window() -> None:
    """stable_token ignores the interval and aims inside WeChat's last 300 s, even when
    renew_before is longer."""
    rec = TokenRecord("mini", APPID2, "t", expires_at=10_000 + 7200, refreshed_at=10_000)
    for renew_before in (300, 1600):
        dues = due(rec, Api.STABLE_TOKEN, interval=600, renew_before=renew_before)
        assert all(17_200 - 240 <= d <= 17_200 - 180 for d in dues)


def test_a_record_keeps_its_jittered_due_time(tmp_path: Path, client: WeChatClient) -> None:
    """The jitter is drawn once per record: asking again gives the same time."""
    r = make(tmp_path, client)
    rec = TokenRecord("main", APPID, "t", expires_at=10_000 + 7200, refreshed_at=10_000)
    assert len({r.due_at(rec, AppStatus()) for _ in range(20)}) == 1


def test_fresh_file_means_no_upstream_call(tmp_path: Path, client: WeChatClient,
                                           emulator: Emulator) -> None:
    """A valid file (written by another daemon) is not refreshed again."""
    first = make(tmp_path, client)
    assert first.run(first=True).state == "refreshed"
    second = make(tmp_path, client)
    outcome = second.run(first=True)
    assert outcome.state == "reused"
    assert emulator.calls() == 1


def test_daily_budget_stops_calls_and_survives_restart(tmp_path: Path, client: WeChatClient,
                                                      emulator: Emulator) -> None:
    """After daily_budget calls no more are made, across a restart, until the WeChat day ends."""
    clock = Clock()
    r = make(tmp_path, client, clock=clock, refresh_interval=1, daily_budget=3)
    states = []
    with capture_logs() as logs:
        for _ in range(6):
            clock.offset += 2
            states.append(r.run().state)
    assert states == ["refreshed"] * 3 + ["budget"] * 3
    assert [e["event"] for e in logs].count("budget.exhausted") == 1
    assert emulator.calls() == 3
    restarted = make(tmp_path, client, clock=clock, refresh_interval=1, daily_budget=3)
    clock.offset += 2
    assert restarted.run(first=True).state == "budget"
    assert emulator.calls() == 3
    clock.offset = next_wechat_midnight(clock()) - time.time() + 120
    assert restarted.run().state == "refreshed"
    assert emulator.calls() == 4
    assert FileStore(str(tmp_path), "main").read_status().calls_today == 1


def test_quota_exhausted_waits_for_the_daily_reset(tmp_path: Path, client: WeChatClient,
                                                  emulator: Emulator) -> None:
    """45009: no call until 00:00 Asia/Shanghai; the failure is an error line with errcode."""
    clock = Clock()
    r = make(tmp_path, client, clock=clock)
    emulator.add_fault("quota", count=1)
    with capture_logs() as logs:
        outcome = r.run(first=True)
    assert outcome.state == "failed"
    midnight = next_wechat_midnight(clock())
    assert midnight <= outcome.next_at <= midnight + 60
    failed = [e for e in logs if e["event"] == "refresh.failed"]
    assert failed[0]["log_level"] == "error" and failed[0]["errcode"] == 45009
    clock.offset += 3600 if midnight - clock() > 3700 else 0
    assert r.run().state == "waiting"
    assert emulator.calls() == 1
    clock.offset = outcome.next_at - time.time() + 1
    assert r.run().state == "refreshed"


def test_transient_failures_back_off_and_keep_the_valid_token(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """A failing refresh keeps the current (still valid) file and retries later, not at once."""
    clock = Clock()
    r = make(tmp_path, client, clock=clock, refresh_interval=10, renew_before=60)
    r.run(first=True)
    before = (tmp_path / "main.json").read_bytes()
    emulator.add_fault("busy")
    clock.offset += 11
    delays = []
    for _ in range(6):
        outcome = r.run()
        assert outcome.state == "failed"
        delays.append(outcome.next_at - clock())
        assert r.run().state == "waiting"  # before next_at: no call
        clock.offset = outcome.next_at - time.time() + 0.01
    assert (tmp_path / "main.json").read_bytes() == before
    assert emulator.calls() == 7
    assert all(0.9 <= d <= 15.0 for d in delays), delays  # floor 1 s, cap renew_before / 4
    emulator.clear_faults()
    assert r.run().state == "refreshed"
    assert FileStore(str(tmp_path), "main").read_status().failures == 0


def test_hard_error_is_retried_once_after_restart(tmp_path: Path, client: WeChatClient,
                                                 emulator: Emulator) -> None:
    """After a permanent error a restart tries once (the operator may have fixed it); no more."""
    clock = Clock()
    emulator.add_fault("ip")
    r = make(tmp_path, client, clock=clock)
    assert r.run(first=True).state == "failed"
    assert r.run().state == "waiting"
    restarted = make(tmp_path, client, clock=clock)
    emulator.clear_faults()
    assert restarted.run(first=True).state == "refreshed"
    assert emulator.calls() == 2


def test_stable_token_same_answer_is_not_a_refresh(tmp_path: Path, client: WeChatClient,
                                                  emulator: Emulator) -> None:
    """A normal-mode answer with the same token keeps the file and retries a little later."""
    clock = Clock()
    r = make(tmp_path, client, MINI, clock=clock, renew_before=300)
    assert r.run(first=True).state == "refreshed"
    path = tmp_path / "mini.json"
    before = path.read_bytes()
    clock.offset = 7200 - 150  # due for us, but WeChat's clock is far from its window
    with capture_logs() as logs:
        outcome = r.run()
    assert outcome.state == "unchanged"
    assert outcome.next_at - clock() >= 300 / 4 - 1  # a quarter of the window apart
    assert path.read_bytes() == before
    assert [e["event"] for e in logs] == ["token.unchanged"]
    assert emulator.calls() == 2 and emulator.state.issued[APPID2] == 1


def test_corrupt_file_is_logged_and_replaced(tmp_path: Path, client: WeChatClient) -> None:
    """A garbage token file is reported as unusable, then replaced by a fresh token."""
    (tmp_path / "main.json").write_text("{garbage")
    r = make(tmp_path, client)
    with capture_logs() as logs:
        assert r.run(first=True).state == "refreshed"
    unusable = [e for e in logs if e["event"] == "token_file.unusable"]
    assert "not valid JSON" in unusable[0]["reason"]
    assert stored(tmp_path).app == "main"


def test_a_file_stamped_in_the_future_is_due_and_the_fetched_token_wins(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """After the clock stepped back an hour the file's times lie in the future: it is due at
    once, and the token fetched replaces it (WeChat has just retired the file's token)."""
    now = int(time.time())
    store = FileStore(str(tmp_path), "main")
    store.write(TokenRecord("main", APPID, "from-the-future", expires_at=now + 3600 + 7200,
                            refreshed_at=now + 3600))
    r = make(tmp_path, client)
    assert r.run().state == "refreshed"
    record = stored(tmp_path)
    assert record.access_token != "from-the-future"
    assert emulator.token_status(record.access_token) == 0
    assert now <= record.refreshed_at <= now + 2


def test_a_token_fetched_under_the_lock_always_replaces_the_file(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """Clock stepped back 30 s just after a refresh (the file looks newer than now): a passive
    refresh's token is written, never discarded as "older"."""
    r = make(tmp_path, client)
    assert r.run(first=True).state == "refreshed"
    store = FileStore(str(tmp_path), "main")
    current = stored(tmp_path)
    store.write(current.replace(refreshed_at=current.refreshed_at + 30,
                                expires_at=current.expires_at + 30))
    forced = r.force(current.access_token)
    assert forced.state == "refreshed"
    written = stored(tmp_path)
    assert written.access_token != current.access_token
    assert emulator.token_status(written.access_token) == 0


def test_passive_refresh_spacing_is_not_stretched_by_a_backward_step(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """A last forced refresh stamped an hour ahead (clock stepped back) does not refuse
    passive refreshes for that hour."""
    r = make(tmp_path, client)
    r.run(first=True)
    store = FileStore(str(tmp_path), "main")
    status = store.read_status()
    status.last_forced_at = time.time() + 3600
    store.write_status(status)
    forced = r.force(stored(tmp_path).access_token)
    assert forced.state == "refreshed", forced
    assert emulator.calls() == 2


def test_a_wait_set_before_a_backward_step_is_not_kept(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """A retry due in a second, set just before the clock stepped back two hours, would look
    like a two-hour wait on the new clock: it is dropped, and the refresh happens now."""
    clock = Clock()
    r = make(tmp_path, client, clock=clock, refresh_interval=10, renew_before=60)
    r.run(first=True)
    clock.offset += 11  # due
    emulator.add_fault("busy", count=1)
    failed = r.run()
    assert failed.state == "failed" and failed.next_at - clock() < 16
    clock.offset -= 7200
    assert r.run().state == "refreshed"
    assert emulator.calls() == 3


# -- a simulated day: the refresher and the emulator share a clock that jumps -----------------
class SimClock:
    """Simulated time, shared by the refresher and the emulator; it moves only when told to."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim() -> SimClock:
    return SimClock()


@pytest.fixture
def sim_emulator(sim: SimClock) -> Iterator[Emulator]:
    with Emulator({APPID: SECRET, APPID2: SECRET2}, clock=sim) as emu:
        yield emu


@dataclass
class Day:
    """What a simulated stretch of time did."""

    outcomes: list[str]
    forced: list[str]
    history: list[tuple[float, str]]  # (when, the file's token from then on)

    def expired_seconds(self, emu: Emulator, end: float) -> float:
        """How long readers of the file held a token WeChat refused."""
        total = 0.0
        marks = [*self.history, (end, "")]
        for (since, token), (until, _) in itertools.pairwise(marks):
            dies = emu.state.tokens[token].expires_at
            total += max(0.0, until - max(since, dies))
        return total


def simulate(r: Refresher, sim: SimClock, seconds: float,
             report_every: float | None = None) -> Day:
    """Run the app's job when it asks to run (and, if given, a reader that reports the file's
    current token as invalid every ``report_every`` s) for ``seconds`` of simulated time."""
    end = sim.now + seconds
    day = Day([], [], [])
    next_run = sim.now
    next_report = sim.now + report_every if report_every else math.inf
    while sim.now < end:
        if next_report <= next_run:
            sim.now = max(sim.now, next_report)
            next_report += report_every or math.inf
            forced = r.force(stored(r.config.state_dir, r.app.name).access_token)
            day.forced.append(forced.state)
            if forced.outcome is not None:
                next_run = forced.outcome.next_at
        else:
            sim.now = max(sim.now, next_run)
            outcome = r.run(first=not day.outcomes)
            day.outcomes.append(outcome.state)
            next_run = max(outcome.next_at, sim.now + 0.001)
        token = stored(r.config.state_dir, r.app.name).access_token
        if not day.history or day.history[-1][1] != token:
            day.history.append((sim.now, token))
    return day


def test_stable_token_with_a_large_renew_before_never_expires(
        tmp_path: Path, sim: SimClock, sim_emulator: Emulator) -> None:
    """renew_before 1600 reaches past WeChat's 300 s stable_token window: over a simulated
    day the file never holds an expired token, and calls stay a few per lifetime."""
    client = WeChatClient(sim_emulator.url)
    r = make(tmp_path, client, MINI, clock=sim, renew_before=1600)
    start = sim.now
    day = simulate(r, sim, 86400)
    assert day.expired_seconds(sim_emulator, start + 86400) == 0
    assert sim_emulator.calls(APPID2) <= 13 * 5
    client.close()


def test_a_ticket_refused_for_good_replaces_the_token_once_per_lifetime(
        tmp_path: Path, sim: SimClock, sim_emulator: Emulator) -> None:
    """getticket answering 40001 all day: the token is replaced at most once per lifetime,
    ticket retries back off, and the budget is never spent."""
    sim_emulator.add_fault("errcode:40001", api="ticket_jsapi")
    app = AppConfig(name="main", api=Api.TOKEN, appid=APPID, secret=SECRET, tickets=("jsapi",))
    client = WeChatClient(sim_emulator.url)
    r = make(tmp_path, client, app, clock=sim)
    day = simulate(r, sim, 86400)
    token_calls = sim_emulator.calls(APPID, "token")
    assert token_calls <= 2 * 25 + 1, token_calls  # 25 refreshes, one early replacement each
    assert sim_emulator.calls(APPID, "ticket_jsapi") <= 100
    assert "budget" not in day.outcomes
    client.close()


def test_a_reader_that_keeps_reporting_cannot_spend_the_day(
        tmp_path: Path, sim: SimClock, sim_emulator: Emulator) -> None:
    """A reader reports every token it gets, every 10 s, for a simulated day: forced refreshes
    thin out, the budget's reserve keeps the scheduled refreshes going, no token expires."""
    client = WeChatClient(sim_emulator.url)
    r = make(tmp_path, client, clock=sim)
    start = sim.now
    day = simulate(r, sim, 86400, report_every=10)
    assert day.forced.count("refreshed") <= 60, day.forced.count("refreshed")
    assert "budget" not in day.outcomes
    assert day.expired_seconds(sim_emulator, start + 86400) == 0
    client.close()


def test_reports_during_a_hard_error_wait_make_no_call(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """While a hard error (IP not whitelisted) backs off, a reader's report is answered
    "waiting" with retry_after, without calling WeChat."""
    r = make(tmp_path, client)
    r.run(first=True)
    emulator.add_fault("ip")
    assert r.force(None).state == "failed"
    calls = emulator.calls()
    waiting = r.force(stored(tmp_path).access_token)
    assert waiting.state == "waiting" and waiting.retry_after > 0
    assert emulator.calls() == calls


def test_backoff_is_capped_jittered_and_floored() -> None:
    """Backoff grows exponentially to the cap, with full jitter but never below the base."""
    rng = random.Random(1)
    for failures in range(1, 40):
        ceiling = max(1.0, min(60.0, 2 ** (failures - 1)))
        values = [schedule.backoff(failures, 1.0, 60.0, rng) for _ in range(50)]
        assert all(1.0 <= v <= ceiling for v in values)
        equal = [schedule.backoff(failures, 1.0, 60.0, rng, full_jitter=False) for _ in range(50)]
        assert all(max(1.0, ceiling / 2) <= v <= ceiling for v in equal)
    assert max(schedule.backoff(30, 1.0, 60.0, rng) for _ in range(200)) > 30
    assert min(schedule.backoff(30, 1.0, 60.0, rng) for _ in range(200)) < 30


def test_retries_come_faster_as_the_token_nears_its_end(tmp_path: Path, client: WeChatClient,
                                                        emulator: Emulator) -> None:
    """Transient failures: the wait never exceeds an eighth of the token's remaining life."""
    now = int(time.time())
    FileStore(str(tmp_path), "main").write(
        TokenRecord("main", APPID, "old-token", expires_at=now + 40, refreshed_at=now - 7160))
    emulator.add_fault("busy")
    clock = Clock()
    r = make(tmp_path, client, clock=clock, renew_before=300)  # transient cap: 75 s
    for _ in range(12):
        started = clock()
        outcome = r.run()
        assert outcome.state == "failed"
        remaining = now + 40 - started
        assert outcome.next_at - started <= max(1.0, remaining / 8) + 0.05
        clock.offset = outcome.next_at - time.time() + 0.01
    assert emulator.calls() == 12


def test_token_refused_while_fetching_a_ticket_is_replaced_at_once(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """getticket answering 42001 means WeChat dropped the token early: it is replaced now."""
    app = AppConfig(name="main", api=Api.TOKEN, appid=APPID, secret=SECRET, tickets=("jsapi",))
    r = make(tmp_path, client, app)
    assert r.run(first=True).state == "refreshed"
    store = FileStore(str(tmp_path), "main")
    old = stored(tmp_path)
    assert "jsapi" in old.tickets
    store.write(old.replace(tickets={}))  # e.g. `tickets` was added to the config since
    emulator.invalidate(old.access_token)  # and another process fetched a token meanwhile
    with capture_logs() as logs:
        outcome = r.run()
    assert outcome.state == "refreshed"
    new = stored(tmp_path)
    assert new.access_token != old.access_token
    assert emulator.token_status(new.access_token) == 0
    assert emulator.ticket_status(new.tickets["jsapi"][0]) == 0
    assert [e["event"] for e in logs if e["event"].startswith(("ticket.", "token."))] == [
        "ticket.failed", "ticket.token_refused", "ticket.refreshed", "token.refreshed"]
    assert emulator.calls(APPID, "token") == 2


def test_one_app_is_jittered_by_5_percent_of_its_interval_at_most() -> None:
    """A lone app's jitter stays small at scaled-down intervals too (a second: 50 ms)."""
    rec = TokenRecord("main", APPID, "t", expires_at=10_000 + 7200, refreshed_at=10_000)
    assert all(10_000 + 0.95 <= d <= 10_000 + 1 for d in due(rec, interval=1))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("target", ["refused", "tls", "proxy", "handshake_hangs"])
def test_a_call_that_never_reached_wechat_costs_no_budget(
        tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch,
        target: str) -> None:
    """Connection refused, a failed or hung TLS handshake, a proxy that cannot be reached: no
    request byte reached api_base, so a whole outage of them spends none of daily_budget, and
    the error names host, port and cause."""
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    mute = socket.socket()  # accepts TCP (the kernel's backlog) and never says a word
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    if target == "refused":
        port = _closed_port()
        base, cause = f"http://127.0.0.1:{port}", f"connection refused by 127.0.0.1:{port}"
    elif target == "tls":
        base = emulator.url.replace("http://", "https://")  # the emulator speaks plain HTTP
        cause = "TLS handshake with 127.0.0.1:"
    elif target == "handshake_hangs":
        base = f"https://127.0.0.1:{mute.getsockname()[1]}"
        cause = f"timed out connecting to 127.0.0.1:{mute.getsockname()[1]}"
    else:
        base, cause = "https://api.weixin.qq.com", "the proxy (HTTPS_PROXY) refused"
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    client = WeChatClient(base, timeout=(0.5, 0.5))
    clock = Clock()
    r = make(tmp_path, client, clock=clock, daily_budget=3)
    try:
        for _ in range(5):
            outcome = r.run()
            assert outcome.state == "failed"
            clock.offset = outcome.next_at - time.time() + 0.01
    finally:
        client.close()
        mute.close()
    status = FileStore(str(tmp_path), "main").read_status()
    assert status.calls_today == 0 and status.failures == 5
    assert status.error is not None and cause in status.error, status.error
    assert emulator.calls() == 0


def test_tickets_and_forced_refreshes_that_never_reached_wechat_cost_nothing(
        tmp_path: Path) -> None:
    """A ticket fetch or a passive refresh that could not connect spends neither the budget
    nor one of stable_token's 20 forced refreshes a day."""
    client = WeChatClient(f"http://127.0.0.1:{_closed_port()}", timeout=(0.5, 0.5))
    now = int(time.time())
    app = AppConfig(name="mini", api=Api.STABLE_TOKEN, appid=APPID2, secret=SECRET2,
                    tickets=("jsapi",))
    FileStore(str(tmp_path), "mini").write(
        TokenRecord("mini", APPID2, "valid-token", expires_at=now + 7000, refreshed_at=now))
    clock = Clock()
    r = make(tmp_path, client, app=app, clock=clock, daily_budget=3)
    try:
        for _ in range(4):  # the token is valid, its ticket is missing: ticket fetches
            outcome = r.run()
            clock.offset = max(clock.offset, outcome.next_at - time.time() + 0.01)
        status = FileStore(str(tmp_path), "mini").read_status()
        assert status.calls_today == 0 and status.last_attempt_at > 0
        forced = r.force(privileged=True)
    finally:
        client.close()
    assert forced.state == "failed"
    status = FileStore(str(tmp_path), "mini").read_status()
    assert status.calls_today == 0 and status.forced_today == 0


@pytest.mark.parametrize("fault", ["5xx", "reset", "hang"])
def test_a_call_that_reached_wechat_counts_against_the_budget(
        tmp_path: Path, emulator: Emulator, fault: str) -> None:
    """An HTTP 5xx, a reset after the request was sent, a read timeout: WeChat may have
    counted (and answered) it, so it counts against daily_budget."""
    client = WeChatClient(emulator.url, timeout=(2.0, 0.5), deadline=1.0)
    emulator.add_fault(fault)
    clock = Clock()
    r = make(tmp_path, client, clock=clock, daily_budget=3)
    try:
        states = []
        for _ in range(4):
            outcome = r.run()
            states.append(outcome.state)
            clock.offset = outcome.next_at - time.time() + 0.01
    finally:
        client.close()
    assert states == ["failed"] * 3 + ["budget"]
    assert FileStore(str(tmp_path), "main").read_status().calls_today == 3


def test_a_budget_wait_ends_when_daily_budget_is_raised(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """The budget wait is derived from the day's count and the config, not from the wait the
    file holds: a restart (or reload) with a higher daily_budget refreshes at once."""
    clock = Clock()
    emulator.add_fault("busy", count=3)
    r = make(tmp_path, client, clock=clock, daily_budget=3)
    for _ in range(3):
        outcome = r.run()
        clock.offset = outcome.next_at - time.time() + 0.01
    outcome = r.run()
    assert outcome.state == "budget" and outcome.next_at - clock() > 60
    assert r.run().state == "budget"
    raised = make(tmp_path, client, clock=clock, daily_budget=100)
    clock.offset += 1  # a second later, not at midnight
    assert raised.run(first=True).state == "refreshed"
    assert emulator.calls() == 4


def test_a_backoff_longer_than_the_config_allows_is_not_kept(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """A wait written under another config (a longer refresh_interval: longer hard-error waits)
    is cut to what the current config allows."""
    clock = Clock()
    emulator.add_fault("ip", count=1)
    r = make(tmp_path, client, clock=clock, refresh_interval=7200)
    for _ in range(3):
        outcome = r.run()
        clock.offset = outcome.next_at - time.time() + 0.01
    status = FileStore(str(tmp_path), "main").read_status()
    assert status.failures == 0
    emulator.add_fault("ip")
    outcome = r.run()
    assert outcome.state == "failed" and outcome.next_at - clock() > 60
    short = make(tmp_path, client, clock=clock, refresh_interval=6)
    clock.offset += 60  # well past the longest hard-error wait of refresh_interval = 6
    emulator.clear_faults()
    assert short.run().state == "refreshed"


def test_transient_retries_while_the_token_is_valid_wait_up_to_five_minutes(
        tmp_path: Path, client: WeChatClient, emulator: Emulator) -> None:
    """While the file's token has hours left, transient retries back off to a five-minute cap
    (renew_before at most), not 75 s; without a valid token the cap is renew_before / 4."""
    clock = Clock()
    r = make(tmp_path, client, clock=clock, renew_before=300)
    assert r.run(first=True).state == "refreshed"
    emulator.add_fault("busy")
    clock.offset += 3600
    waits = _failed_waits(r, clock, 14)
    assert max(waits) <= 300.0 + 0.05 and max(waits[8:]) > 100, waits
    clock.offset += 7200  # the token has expired
    waits = _failed_waits(r, clock, 14)
    assert max(waits) <= 75.0 + 0.05, waits


def _failed_waits(r: Refresher, clock: Clock, runs: int) -> list[float]:
    """Run ``runs`` failing attempts, each when the last one's wait ends; the waits."""
    waits = []
    for _ in range(runs):
        outcome = r.run()
        assert outcome.state == "failed"
        waits.append(outcome.next_at - clock())
        clock.offset = outcome.next_at - time.time() + 0.01
    return waits


def test_a_new_client_reaches_the_tickets_too(tmp_path: Path, client: WeChatClient,
                                              emulator: Emulator) -> None:
    """A reload hands a refresher it keeps a new WeChat client (registry.reconfigure): the
    token and its tickets are both fetched with it from then on, never the ticket with the
    old, closed one (another api_base, say)."""
    app = AppConfig(name="main", api=Api.TOKEN, appid=APPID, secret=SECRET, tickets=("jsapi",))
    r = make(tmp_path, client, app)
    r.run(first=True)
    assert emulator.calls(APPID, "ticket_jsapi") == 1
    with Emulator({APPID: SECRET}) as other:
        new = WeChatClient(other.url, timeout=(2.0, 2.0))
        try:
            r.client = new
            forced = r.force(None, privileged=True)
        finally:
            new.close()
        assert forced.state is ForcedState.REFRESHED, forced
        assert (other.calls(APPID, "token"), other.calls(APPID, "ticket_jsapi")) == (1, 1)
    assert emulator.calls(APPID, "ticket_jsapi") == 1
    assert "jsapi_ticket" in read_json(tmp_path / "main.json")
