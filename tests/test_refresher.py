"""The refresh decision, taken under the lock from the files, with a controlled clock."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from wxtoken.clock import next_wechat_midnight
from wxtoken.config import AppConfig, Config
from wxtoken.emulator import Emulator
from wxtoken.record import TokenRecord
from wxtoken.refresher import Refresher, backoff
from wxtoken.store import Store
from wxtoken.upstream import WeChatClient

from helpers import APPID, APPID2, SECRET, SECRET2

MAIN = AppConfig(name="main", api="token", appid=APPID, secret=SECRET)
MINI = AppConfig(name="mini", api="stable_token", appid=APPID2, secret=SECRET2)


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


def make(tmp_path: Path, client: WeChatClient, app: AppConfig = MAIN, clock: Clock | None = None,
         **settings: Any) -> Refresher:
    config = Config("test.toml", (app,), state_dir=str(tmp_path), **settings)
    return Refresher(config, app, client, clock=clock or Clock(), rng=random.Random(7))


def test_due_time_is_interval_or_renew_before_whichever_first(tmp_path: Path,
                                                             client: WeChatClient) -> None:
    """Due at refreshed + interval or expiry - renew_before, whichever first; jitter earlier."""
    r = make(tmp_path, client, refresh_interval=3600, renew_before=300)
    rec = TokenRecord("main", APPID, "t", expires_at=10_000 + 7200, refreshed_at=10_000)
    dues = [r.due_at(rec) for _ in range(200)]
    assert all(10_000 + 3600 - 30 <= d <= 10_000 + 3600 for d in dues)
    short = TokenRecord("main", APPID, "t", expires_at=10_000 + 1000, refreshed_at=10_000)
    assert all(10_000 + 700 - 30 <= r.due_at(short) <= 10_000 + 700 for _ in range(200))
    tiny = TokenRecord("main", APPID, "t", expires_at=10_000 + 100, refreshed_at=10_000)
    assert all(10_000 + 45 <= r.due_at(tiny) <= 10_000 + 50 for _ in range(200))  # half-life cap


def test_stable_token_is_due_inside_the_last_window(tmp_path: Path, client: WeChatClient) -> None:
    """stable_token ignores the interval and aims inside WeChat's last renew_before seconds."""
    r = make(tmp_path, client, MINI, refresh_interval=600, renew_before=300)
    rec = TokenRecord("mini", APPID2, "t", expires_at=10_000 + 7200, refreshed_at=10_000)
    assert all(17_200 - 240 <= r.due_at(rec) <= 17_200 - 180 for _ in range(200))


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
    assert Store(str(tmp_path), "main").read_status().calls_today == 1


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
    assert Store(str(tmp_path), "main").read_status().failures == 0


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
    assert Store(str(tmp_path), "main").read().app == "main"


def test_newer_file_is_never_replaced_by_an_older_result(tmp_path: Path,
                                                         client: WeChatClient) -> None:
    """A file stamped later than our fetch (clock stepped back) is kept."""
    now = int(time.time())
    newer = TokenRecord("main", APPID, "newer-token", expires_at=now + 200, refreshed_at=now + 100)
    Store(str(tmp_path), "main").write(newer)
    r = make(tmp_path, client, renew_before=300)
    assert r.run().state == "fresh"
    assert Store(str(tmp_path), "main").read() == newer


def test_stale_temp_files_are_removed_on_first_run(tmp_path: Path, client: WeChatClient) -> None:
    """Temp files a killed writer left are removed when the daemon starts."""
    (tmp_path / ".main.k1ll3d.tmp").write_text('{"app": "main", "acc')
    make(tmp_path, client).run(first=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "main.json", "main.lock", "main.status.json"]


def test_backoff_is_capped_jittered_and_floored() -> None:
    """Backoff grows exponentially to the cap, with full jitter but never below the base."""
    rng = random.Random(1)
    for failures in range(1, 40):
        ceiling = max(1.0, min(60.0, 2 ** (failures - 1)))
        values = [backoff(failures, 1.0, 60.0, rng) for _ in range(50)]
        assert all(1.0 <= v <= ceiling for v in values)
        equal = [backoff(failures, 1.0, 60.0, rng, full_jitter=False) for _ in range(50)]
        assert all(max(1.0, ceiling / 2) <= v <= ceiling for v in equal)
    assert max(backoff(30, 1.0, 60.0, rng) for _ in range(200)) > 30
    assert min(backoff(30, 1.0, 60.0, rng) for _ in range(200)) < 30


def test_retries_come_faster_as_the_token_nears_its_end(tmp_path: Path, client: WeChatClient,
                                                        emulator: Emulator) -> None:
    """Transient failures: the wait never exceeds an eighth of the token's remaining life."""
    now = int(time.time())
    Store(str(tmp_path), "main").write(
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
    app = AppConfig(name="main", api="token", appid=APPID, secret=SECRET, tickets=("jsapi",))
    r = make(tmp_path, client, app)
    assert r.run(first=True).state == "refreshed"
    store = Store(str(tmp_path), "main")
    old = store.read()
    assert "jsapi" in old.tickets
    store.write(old.replace(tickets={}))  # e.g. `tickets` was added to the config since
    emulator.invalidate(old.access_token)  # and another process fetched a token meanwhile
    with capture_logs() as logs:
        outcome = r.run()
    assert outcome.state == "refreshed"
    new = store.read()
    assert new.access_token != old.access_token
    assert emulator.token_status(new.access_token) == 0
    assert emulator.ticket_status(new.tickets["jsapi"][0]) == 0
    assert [e["event"] for e in logs if e["event"].startswith(("ticket.", "token."))] == [
        "ticket.failed", "ticket.refreshed", "token.refreshed"]
    assert emulator.calls(APPID, "token") == 2
