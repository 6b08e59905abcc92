"""When to call WeChat: due times, jitter, backoff and the outcome of a run. Pure functions of
their arguments (time and randomness are passed in), standard library only: `wxtoken status`
uses them too.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from wxtoken.record import TokenRecord

STABLE_WINDOW = 300.0  # WeChat hands out the next stable token only in its last 5 minutes
# stable_token: call between these fractions of the lead before expiry (inside that window)
STABLE_EARLIEST, STABLE_LATEST = 0.8, 0.6
# a time this far ahead of the clock was written before the clock stepped back: not trusted
FUTURE_TOLERANCE = 60.0
MAX_WAIT = 86_400.0 + 120  # the longest wait ever set (a quota or budget wait: to 00:00 + jitter)
FORCE_SPACING = 30.0  # forced (passive) refreshes of one app: at least this far apart...
FORCE_SPACING_MAX = 1800.0  # ...doubling up to this while fresh tokens keep being reported
FRESH_REPORT = 600.0  # a token reported this soon after it was issued was "freshly issued"


class State(enum.StrEnum):
    """What one scheduled run of an app's job did."""

    FRESH = "fresh"  # the file's token is good; nothing to do yet
    REUSED = "reused"  # the same, on the first run after a start
    REFRESHED = "refreshed"  # a new token was written
    UNCHANGED = "unchanged"  # stable_token answered the same token (outside its window)
    FAILED = "failed"  # the call or the write failed; retried with backoff
    WAITING = "waiting"  # an earlier failure's backoff (or quota wait) is not over
    BUDGET = "budget"  # the daily budget is spent


class RefreshModel(enum.StrEnum):
    """How an API hands out tokens: what a call does to the token before it. A token source
    declares it (source.TokenSource.model); the schedule, the passive refresh and the fleet's
    checks follow it."""

    # every call issues a new token; the last one stays valid for WeChat's overlap (~5 min):
    # cgi-bin/token, the Open Platform's component and authorizer tokens
    NEW_EACH_CALL = "new_each_call"
    # the same token until its final window, where a call gets the next; force_refresh issues
    # a new one at once (20 a day): stable_token
    FINAL_WINDOW = "final_window"
    # the same token until it expires (it may be dropped early): WeCom's gettoken
    SAME_UNTIL_EXPIRY = "same_until_expiry"


def model_of(api: str) -> RefreshModel:
    """The refresh model of an app's ``api`` (config.Api)."""
    return {"stable_token": RefreshModel.FINAL_WINDOW,
            "wecom": RefreshModel.SAME_UNTIL_EXPIRY}.get(api, RefreshModel.NEW_EACH_CALL)


GOOD_STATES = frozenset({State.FRESH, State.REUSED, State.REFRESHED, State.UNCHANGED})


@dataclass(frozen=True)
class Outcome:
    """What one run did, and when the next run should be (Unix seconds)."""

    state: State
    next_at: float
    expires_at: int | None = None


def call_deadline(renew_before: float) -> float:
    """Overall deadline of one upstream call: a quarter of renew_before, between 1 and 20 s,
    so a hung call is given up well before the token it replaces gets close to expiry."""
    return min(20.0, max(1.0, renew_before / 4))


def lead(record: TokenRecord, model: RefreshModel, renew_before: float) -> float:
    """How long before expiry the token must be replaced (never more than half its life; for
    stable_token never more than WeChat's window, where the next token is handed out)."""
    ahead = min(renew_before, (record.expires_at - record.refreshed_at) / 2)
    return min(ahead, STABLE_WINDOW) if model is RefreshModel.FINAL_WINDOW else ahead


def due_at(record: TokenRecord, model: RefreshModel, refresh_interval: float,
           renew_before: float, refreshed_at: float | None = None) -> float:
    """The latest moment the record should be replaced (the refresher jitters earlier).

    ``refreshed_at`` may give the file's whole-second ``refreshed_at`` its fraction back.
    """
    ahead = lead(record, model, renew_before)
    if model is RefreshModel.FINAL_WINDOW:
        return record.expires_at - ahead * STABLE_LATEST
    start = record.refreshed_at if refreshed_at is None else refreshed_at
    return min(start + refresh_interval, record.expires_at - ahead)


def degraded_due_at(record: TokenRecord, model: RefreshModel, renew_before: float,
                    rng: random.Random) -> float:
    """When a shared store's coordination is down (the fleet's Redis): candidates that
    refreshed on their own would retire each other's tokens, so each waits for the token's last
    lead, then makes one attempt, jittered over its second half."""
    return record.expires_at - lead(record, model, renew_before) * rng.uniform(0.5, 1.0)


def jittered_due_at(record: TokenRecord, model: RefreshModel, refresh_interval: float,
                    renew_before: float, apps: int, rng: random.Random,
                    refreshed_at: float | None = None) -> float:
    """When to replace the record, jitter included (always earlier than due_at, never later)."""
    latest = due_at(record, model, refresh_interval, renew_before, refreshed_at)
    if model is RefreshModel.FINAL_WINDOW:
        width = lead(record, model, renew_before) * (STABLE_EARLIEST - STABLE_LATEST)
        return latest - rng.uniform(0, width)
    start = record.refreshed_at if refreshed_at is None else refreshed_at
    return latest - rng.uniform(0, spread(max(0.0, latest - start), apps))


def spread(span: float, apps: int) -> float:
    """Jitter window: small (5 % of the span, at most 30 s) for a few apps; with many apps in
    one daemon, wide enough (half a second per other app, at most a quarter of the span) that
    their refreshes spread out instead of hitting WeChat in one burst every interval."""
    small = min(30.0, 0.05 * span)
    return min(max(small, 0.5 * (apps - 1)), max(small, 0.25 * span))


def from_the_future(ts: float, now: float) -> bool:
    """Whether a stored time lies ahead of the clock by more than a minute: it was written
    before the clock stepped back, so the times derived from it are not to be trusted."""
    return ts > now + FUTURE_TOLERANCE


def wait_until(retry_at: float, set_at: float, now: float) -> float:
    """The end of a wait set at ``set_at``; 0 (no wait) when it was set before the clock
    stepped back, since its length was measured on the old clock."""
    return 0.0 if from_the_future(set_at, now) or retry_at > now + MAX_WAIT else retry_at


def elapsed(since: float, now: float) -> float:
    """Seconds from ``since`` to ``now``, never negative; a ``since`` from the future (the clock
    stepped back) counts as long ago."""
    if from_the_future(since, now):
        return math.inf
    return max(0.0, now - since)


def backoff(failures: int, base: float, cap: float, rng: random.Random,
            full_jitter: bool = True) -> float:
    """Capped exponential backoff, never shorter than ``base``.

    Full jitter (uniform over [0, ceiling]) spreads transient retries; hard errors use equal
    jitter (uniform over [ceiling/2, ceiling]) so that the waits really grow.
    """
    ceiling = min(cap, base * 2 ** min(failures - 1, 30))
    return max(base, rng.uniform(0 if full_jitter else ceiling / 2, ceiling))


def force_spacing(streak: int) -> float:
    """Spacing between forced refreshes after ``streak`` reports in a row of freshly issued
    tokens: 30 s, doubling up to 30 minutes."""
    return float(min(FORCE_SPACING_MAX, FORCE_SPACING * 2 ** min(streak, 16)))


def freshly_issued(refreshed_at: float, streak: int, now: float) -> bool:
    """Whether a token reported now was freshly issued: within ten minutes of its issue, or
    within twice the current spacing (a reader held back by the spacing reports tokens that
    are as old as the spacing)."""
    return elapsed(refreshed_at, now) < max(FRESH_REPORT, 2 * force_spacing(streak))


def overdue_by(record: TokenRecord, model: RefreshModel, refresh_interval: float,
               renew_before: float, now: float) -> float:
    """Seconds past the latest due time, beyond a grace of a quarter of the lead (<= 0: fine)."""
    grace = max(1.0, lead(record, model, renew_before) / 4)
    return now - due_at(record, model, refresh_interval, renew_before) - grace
