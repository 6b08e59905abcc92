"""The passive-refresh rules as pure functions of the bookkeeping: no server, no files."""

from __future__ import annotations

import time

import pytest

from wxtoken import passive
from wxtoken.clock import wechat_day
from wxtoken.errcodes import ErrorClass
from wxtoken.passive import ForcedState
from wxtoken.status import AppStatus, LastResult

NOW = float(int(time.time()))


def status(**fields: object) -> AppStatus:
    s = AppStatus(calls_day=wechat_day(NOW))
    for key, value in fields.items():
        setattr(s, key, value)
    return s


def test_spacing_doubles_while_fresh_tokens_keep_being_reported() -> None:
    """30 s, 60 s, 120 s … up to 30 min between forced refreshes while each replaces the token
    the previous one issued; a report of an old token starts afresh."""
    s = status()
    now = NOW
    issued = NOW - 3000  # the token the first report is about came from the schedule
    gaps = []
    for _ in range(10):
        assert passive.refusal(s, now, "token", 1000, 1, False) is None
        passive.count_forced(s, now, 1, issued)
        issued = now
        refused = passive.refusal(s, now + 1, "token", 1000, 1, False)
        assert refused is not None and refused.state is ForcedState.RATE_LIMITED
        gaps.append(round(refused.retry_after + 1))
        now += refused.retry_after + 1
    assert gaps == [30, 60, 120, 240, 480, 960, 1800, 1800, 1800, 1800]
    passive.count_forced(s, now + 3 * 3600, 1, refreshed_at=now + 3600)  # an hour-old token
    assert s.forced_streak == 0


@pytest.mark.parametrize("every", [10, 61, 599, 601, 1801])
def test_a_reader_reporting_every_token_gets_few_forced_refreshes_a_day(every: int) -> None:
    """Whatever the pace of a reader that reports each token it gets, a day has at most one
    forced refresh per ten minutes (and once it keeps at it, one per 30 minutes)."""
    s = status()
    now, issued, forced = NOW, NOW - 3000, 0
    while now < NOW + 86400:
        if passive.refusal(s, now, "token", 10**6, 1, False) is None:
            passive.count_forced(s, now, 1, issued)
            issued, forced = now, forced + 1
        now += every
    assert forced <= 86400 / 600 + 1, forced


def test_readers_may_use_80_percent_of_the_budget_the_operator_all_of_it() -> None:
    """Forced refreshes stop at 80 % of daily_budget for readers; the operator may go on."""
    s = status(calls_today=8)
    refused = passive.refusal(s, NOW, "token", 10, 1, privileged=False)
    assert refused is not None and refused.state is ForcedState.BUDGET
    assert refused.retry_after > 0
    assert passive.refusal(s, NOW, "token", 10, 1, privileged=True) is None
    assert passive.refusal(status(calls_today=7), NOW, "token", 10, 1, False) is None


def test_quota_and_hard_error_waits_hold_for_readers_only() -> None:
    """During a 45009 or hard-error wait a reader gets "waiting"; the operator may try."""
    for kind in (ErrorClass.QUOTA_EXHAUSTED, ErrorClass.PERMANENT, ErrorClass.NEEDS_HUMAN):
        s = status(retry_at=NOW + 600, error_class=kind, last_result=LastResult.ERROR)
        refused = passive.refusal(s, NOW, "token", 1000, 1, privileged=False)
        assert refused is not None and refused.state is ForcedState.WAITING
        assert 599 <= refused.retry_after <= 600
        assert passive.refusal(s, NOW, "token", 1000, 1, privileged=True) is None
    transient = status(retry_at=NOW + 5, error_class=ErrorClass.TRANSIENT)
    assert passive.refusal(transient, NOW, "token", 1000, 1, False) is None


def test_a_spent_budget_holds_for_everyone() -> None:
    """Once the whole budget is spent, not even the operator calls until the reset; the
    operator is told daily_budget is what holds it back."""
    s = status(retry_at=NOW + 3600, last_result=LastResult.BUDGET, calls_today=1000)
    refused = passive.refusal(s, NOW, "token", 1000, 1, privileged=True)
    assert refused is not None and refused.state is ForcedState.BUDGET
    assert "daily_budget is spent: 1000 of 1000" in refused.reason


def test_a_budget_wait_is_decided_by_the_counts_not_by_the_file() -> None:
    """A budget wait written when daily_budget was lower ends when the counts now allow a call:
    the operator may call at once, readers within their share."""
    s = status(retry_at=NOW + 3600, last_result=LastResult.BUDGET, calls_today=24)
    assert passive.refusal(s, NOW, "token", 100, 1, privileged=True) is None
    assert passive.refusal(s, NOW, "token", 100, 1, privileged=False) is None
    refused = passive.refusal(s, NOW, "token", 25, 1, privileged=False)
    assert refused is not None and refused.state is ForcedState.BUDGET
    assert "passive refreshes may use" in refused.reason


def test_stable_token_has_20_forced_refreshes_a_day_the_last_5_for_the_operator() -> None:
    """Readers get 15 stable_token force_refreshes a WeChat day, the operator all 20; the next
    is refused until midnight."""
    readers_done = status(forced_today=15)
    refused = passive.refusal(readers_done, NOW, "stable_token", 1000, 1, privileged=False)
    assert refused is not None and refused.state is ForcedState.RATE_LIMITED
    assert refused.retry_after > 30
    assert passive.refusal(readers_done, NOW, "stable_token", 1000, 1, privileged=True) is None
    s = status(forced_today=20)
    refused = passive.refusal(s, NOW, "stable_token", 1000, 1, privileged=True)
    assert refused is not None and refused.state is ForcedState.RATE_LIMITED
    assert passive.refusal(s, NOW, "token", 1000, 1, privileged=True) is None


def test_times_from_before_a_backward_clock_step_do_not_block() -> None:
    """A last forced refresh, or a wait set by an attempt, stamped ahead of the clock (it
    stepped back since) is not trusted, however short the wait looks now."""
    s = status(last_forced_at=NOW + 3600, last_attempt_at=NOW + 7200, retry_at=NOW + 7300,
               error_class=ErrorClass.PERMANENT)
    assert passive.refusal(s, NOW, "token", 1000, 1, privileged=False) is None


def test_a_new_wechat_day_starts_the_counts_afresh() -> None:
    """Counters of another WeChat day do not count today."""
    s = AppStatus(calls_day="2001-01-01", calls_today=999, forced_today=20)
    assert passive.calls_today(s, NOW) == 0 and s.forced_today == 0
