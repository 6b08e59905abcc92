"""How one token's refresher answers a failure, and how long the wait it set holds.

- **A failed call** (:meth:`Failures.upstream`): transient errors back off from 1 s, up to five
  minutes apart while the file's token is valid (like kubelet's and Vault Agent's backoff), never
  more than ``renew_before`` nor an eighth of the token's remaining life; without a valid token,
  up to ``renew_before / 4`` (75 s). Hard errors (a wrong secret, an IP not whitelisted) back off
  from ``refresh_interval / 6`` to ``refresh_interval``, without jitter; WeChat's quota (45009)
  waits for the WeChat day's end.
- **A state that cannot be written** (:meth:`Failures.store`): retried with the transient
  backoff; the token the file holds is never lost meanwhile.
- **The wait** (:meth:`Failures.wait_end`) is derived from the config and the day's counts, so a
  reload or restart that raises ``daily_budget`` or shortens the waits ends a wait written under
  the old config.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wxtoken import passive, schedule
from wxtoken.clock import next_wechat_midnight
from wxtoken.errcodes import HARD_ERRORS, ErrorClass
from wxtoken.schedule import Outcome, State
from wxtoken.status import AppStatus, LastResult

if TYPE_CHECKING:
    from wxtoken.config import Config
    from wxtoken.errors import StoreError, UpstreamError
    from wxtoken.record import TokenRecord

TRANSIENT_BASE = 1.0
TRANSIENT_CAP = 300.0


class Failures:
    """One token's failure bookkeeping and backoff policy (its refresher's, sharing its log and
    random source)."""

    def __init__(self, log: Any, rng: random.Random) -> None:
        self.log = log
        self.rng = rng
        self.store_failures = 0
        self.problem: str | None = None  # the state could not be read or written
        self.told_waiting = False  # a wait for what comes by itself is said once per process
        self.transient_cap = self.valid_cap = self.hard_base = self.hard_cap = 0.0
        self.daily_budget = 0

    def configure(self, config: Config) -> None:
        self.daily_budget = config.daily_budget
        self.transient_cap = min(TRANSIENT_CAP, max(TRANSIENT_BASE, config.renew_before / 4))
        self.valid_cap = min(TRANSIENT_CAP, max(TRANSIENT_BASE, config.renew_before))
        self.hard_base = min(600.0, max(1.0, config.refresh_interval / 6))
        self.hard_cap = max(self.hard_base, config.refresh_interval)

    def cleared(self) -> None:
        """The state was read and written again."""
        self.store_failures, self.problem = 0, None

    def store(self, exc: StoreError, now: float, token_pending: bool) -> Outcome:
        self.store_failures += 1
        self.problem = str(exc)
        delay = schedule.backoff(self.store_failures, TRANSIENT_BASE, self.transient_cap,
                                 self.rng)
        self.log.error("store.failed", error=str(exc), attempt=self.store_failures,
                       next_in=round(delay, 1), token_pending=token_pending)
        return Outcome(State.FAILED, now + delay)

    def upstream(self, exc: UpstreamError, status: AppStatus, record: TokenRecord | None,
                 now: float, write: Callable[[AppStatus], None]) -> Outcome:
        """Record a failed call in ``status``, ``write`` it, then log it; the Outcome holds
        the wait."""
        status.failures += 1
        status.last_result = LastResult.ERROR
        status.error_class = exc.kind
        status.errcode, status.errmsg, status.error = exc.errcode, exc.errmsg, str(exc)
        status.rid = exc.rid
        if exc.kind is ErrorClass.QUOTA_EXHAUSTED:
            delay = next_wechat_midnight(now) - now + self.rng.uniform(0, 60)
        elif exc.kind in HARD_ERRORS:
            delay = schedule.backoff(status.failures, self.hard_base, self.hard_cap, self.rng,
                                     full_jitter=False)
        else:
            cap = self.transient_cap
            if record is not None and record.expires_at > now:
                # the closer the token in the file is to its end, the more often we try
                cap = min(self.valid_cap, max(TRANSIENT_BASE, (record.expires_at - now) / 8))
            delay = schedule.backoff(status.failures, TRANSIENT_BASE, cap, self.rng)
        status.retry_at = now + delay
        write(status)  # before the line: whoever reads the line finds the status written
        fields: dict[str, Any] = {
            "error": str(exc), "error_class": exc.kind.value, "attempt": status.failures,
            "next_in": round(delay, 1),
            "token_valid_for": max(0, int(record.expires_at - now)) if record else 0,
        }
        if exc.errcode is not None:
            fields.update(errcode=exc.errcode, errmsg=exc.errmsg)
        if exc.rid:
            fields["rid"] = exc.rid  # `wxtoken rid APP <rid>` looks it up
        if exc.waiting:
            (self.log.debug if self.told_waiting else self.log.info)(
                "refresh.waiting", reason=str(exc), next_in=fields["next_in"])
            self.told_waiting = True
        elif exc.kind is ErrorClass.TRANSIENT:
            self.log.warning("refresh.failed", **fields)
        else:
            self.log.error("refresh.failed", **fields)
        return Outcome(State.FAILED, status.retry_at, record.expires_at if record else None)

    def wait_end(self, status: AppStatus, now: float, calls: int, hold_limit: float) -> float:
        """When the current wait ends (0: none): the file's retry_at is believed only as far
        as the current config would have set it (``calls``: what the next run would spend;
        ``hold_limit``: the longest a run holds the lock)."""
        retry_at = schedule.wait_until(status.retry_at, status.last_attempt_at, now)
        if retry_at <= now:
            return 0.0
        midnight = next_wechat_midnight(now) + 60  # waits to the WeChat day's end, jitter incl.
        if status.last_result is LastResult.BUDGET:
            if passive.calls_today(status, now) + calls <= self.daily_budget:
                return 0.0
            return min(retry_at, midnight)
        if status.error_class is ErrorClass.QUOTA_EXHAUSTED:
            return min(retry_at, midnight)
        cap = self.hard_cap if status.error_class in HARD_ERRORS else self.valid_cap
        # the wait was set when the call failed: at most hold_limit after the attempt began
        return min(retry_at, status.last_attempt_at + hold_limit + cap)
