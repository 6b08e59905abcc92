"""The rules a passive refresh (a reader reporting a token WeChat refused) obeys, as pure
functions of the app's bookkeeping: they decide whether a forced refresh may call WeChat now.

- One forced refresh per app per 30 s; while the tokens reported are freshly issued ones (ten
  minutes old at most, or twice the current spacing) the spacing doubles, up to 30 minutes.
  A report of an older token starts afresh. So a reader that reports every token it gets can
  cause at most one forced refresh every ten minutes, or every 30 once it has kept at it.
- stable_token: WeChat allows 20 ``force_refresh`` calls a day; readers may use 15 of them,
  the last 5 are kept for the operator.
- Forced refreshes may use 80 % of ``daily_budget``; the rest is kept for scheduled refreshes.
- While a quota (45009) or hard-error wait runs, token readers are answered "waiting".

The operator (root, or the daemon's own user) may call through a wait and use the whole budget;
the spacing and WeChat's own limits hold for everyone.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from wxtoken import schedule
from wxtoken.clock import next_wechat_midnight, wechat_day
from wxtoken.errcodes import HARD_ERRORS, ErrorClass
from wxtoken.errors import WxtokenError
from wxtoken.record import TokenRecord
from wxtoken.schedule import Outcome
from wxtoken.status import AppStatus

STABLE_FORCE_PER_DAY = 20  # WeChat's limit on stable_token force_refresh
STABLE_FORCE_READERS = 15  # of which token readers may use these
FORCED_SHARE = 0.8  # forced refreshes may use this share of daily_budget; the rest is kept
WAITS_FOR_READERS = HARD_ERRORS | {ErrorClass.QUOTA_EXHAUSTED}


class ForcedState(enum.StrEnum):
    """The answer to a passive refresh request."""

    CURRENT = "current"  # the reported token was already replaced: here is the current one
    REFRESHED = "refreshed"
    RATE_LIMITED = "rate_limited"  # spacing between forced refreshes, or stable_token's 20/day
    WAITING = "waiting"  # a quota (45009) or hard-error wait runs
    BUDGET = "budget"  # the share of daily_budget forced refreshes may use is spent
    FAILED = "failed"  # WeChat refused
    STORE_FAILED = "store_failed"  # the state could not be read or written


@dataclass(frozen=True)
class Refusal:
    """Why a forced refresh may not call WeChat now, and when to ask again."""

    state: ForcedState
    retry_after: float
    reason: str


def calls_today(status: AppStatus, now: float) -> int:
    """Upstream calls counted on the current WeChat day (the counters start afresh on a new
    day)."""
    day = wechat_day(now)
    if status.calls_day != day:
        status.calls_day, status.calls_today, status.forced_today = day, 0, 0
    return status.calls_today


def refusal(status: AppStatus, now: float, api: str, daily_budget: int, calls: int,
            privileged: bool, retry_at: float | None = None) -> Refusal | None:
    """Whether a forced refresh costing ``calls`` upstream calls may go ahead (None) or not.
    ``retry_at`` is when the app's current wait ends, as the refresher derives it from the
    config and the counts (default: the status's own); a budget wait is decided by the counts
    below, never by a wait the file holds."""
    if retry_at is None:
        retry_at = schedule.wait_until(status.retry_at, status.last_attempt_at, now)
    if retry_at > now and status.error_class in WAITS_FOR_READERS and not privileged:
        return Refusal(ForcedState.WAITING, retry_at - now,
                       f"waiting after {status.error_class} (errcode {status.errcode}): no "
                       f"call before the wait ends in {retry_at - now:.0f} s")
    since = schedule.elapsed(status.last_forced_at, now)
    spacing = schedule.force_spacing(status.forced_streak)
    if since < spacing:
        return Refusal(ForcedState.RATE_LIMITED, spacing - since,
                       f"rate-limited: one forced refresh per {spacing:g} s; retry in "
                       f"{spacing - since:.0f} s")
    midnight = next_wechat_midnight(now) - now
    used = calls_today(status, now)
    if api == "stable_token" and status.forced_today >= (
            STABLE_FORCE_PER_DAY if privileged else STABLE_FORCE_READERS):
        return Refusal(ForcedState.RATE_LIMITED, midnight,
                       "rate-limited: stable_token's force_refresh is allowed 20 times a day, "
                       "the last 5 for the operator")
    if privileged and used + calls > daily_budget:
        return Refusal(ForcedState.BUDGET, midnight,
                       f"daily_budget is spent: {used} of {daily_budget} calls counted today; "
                       "raise daily_budget in the config and reload, or wait for 00:00 "
                       "Asia/Shanghai")
    share = math.floor(daily_budget * FORCED_SHARE)
    if not privileged and used + calls > share:
        return Refusal(ForcedState.BUDGET, midnight,
                       f"the share of daily_budget passive refreshes may use is spent ({used} "
                       f"of {share} calls); the rest is kept for scheduled refreshes")
    return None


def count_forced(status: AppStatus, now: float, calls: int, refreshed_at: float | None) -> None:
    """Count a forced refresh about to be made of a token issued at ``refreshed_at`` (None:
    there is none): a freshly issued one extends the streak (the spacing doubles), an older one
    starts it afresh."""
    fresh = refreshed_at is not None and schedule.freshly_issued(refreshed_at,
                                                                 status.forced_streak, now)
    status.forced_streak = status.forced_streak + 1 if fresh else 0
    status.forced_today += 1
    status.last_forced_at = now
    status.calls_today += calls
    status.last_attempt_at = now


@dataclass(frozen=True)
class Forced:
    """What a passive refresh did; ``outcome`` (when set) reschedules the app's job."""

    state: ForcedState
    record: TokenRecord | None
    outcome: Outcome | None = None
    error: WxtokenError | None = None
    retry_after: float = 0.0
    reason: str = ""  # for an answer no error or state explains by itself
