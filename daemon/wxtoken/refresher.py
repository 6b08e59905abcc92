"""One app's refresh decision and action, taken under the writers' lock, from the file.

Because the decision reads the file under the lock (never memory), any number of daemons,
restarts and CLI calls on one state directory make one upstream call per refresh.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from wxtoken import schedule
from wxtoken.clock import next_wechat_midnight, wechat_day
from wxtoken.config import AppConfig, Config
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import StoreError, TokenCorrupt, UpstreamError
from wxtoken.logs import get_logger, mask
from wxtoken.record import TokenRecord
from wxtoken.store import AppStatus, Store
from wxtoken.upstream import WeChatClient

TRANSIENT_BASE = 1.0
HARD_ERRORS = (ErrorClass.PERMANENT, ErrorClass.NEEDS_HUMAN)


@dataclass(frozen=True)
class Outcome:
    """What one run did, and when the next run should be (Unix seconds)."""

    state: str  # fresh | reused | refreshed | unchanged | failed | waiting | budget
    next_at: float
    expires_at: int | None = None


def backoff(failures: int, base: float, cap: float, rng: random.Random,
            full_jitter: bool = True) -> float:
    """Capped exponential backoff, never shorter than ``base``.

    Full jitter (uniform over [0, ceiling]) spreads transient retries; hard errors use equal
    jitter (uniform over [ceiling/2, ceiling]) so that the waits really grow.
    """
    ceiling = min(cap, base * 2 ** min(failures - 1, 30))
    return max(base, rng.uniform(0 if full_jitter else ceiling / 2, ceiling))


class Refresher:
    """Keeps one app's token file fresh."""

    def __init__(self, config: Config, app: AppConfig, client: WeChatClient,
                 store: Store | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, log: Any = None) -> None:
        self.config = config
        self.app = app
        self.client = client
        self.store = store or Store(config.state_dir, app.name, app.file_mode, app.file_group)
        self.clock = clock
        self.rng = rng or random.Random()
        self.log = log or get_logger(app=app.name, appid=app.appid, api=app.api)
        self.transient_cap = min(300.0, max(TRANSIENT_BASE, config.renew_before / 4))
        self.hard_base = min(600.0, max(1.0, config.refresh_interval / 6))
        self.hard_cap = max(self.hard_base, config.refresh_interval)
        # a token fetched but not yet written (disk full, …): written on the next run instead of
        # fetching again, since every fetch shortens the life of the token readers hold
        self.pending: TokenRecord | None = None
        self.store_failures = 0

    # -- the schedule -------------------------------------------------------------------------
    def _lead(self, record: TokenRecord) -> float:
        return schedule.lead(record, self.config.renew_before)

    def due_at(self, record: TokenRecord, status: AppStatus | None = None) -> float:
        """When this record should be replaced, jitter included (always earlier, never later)."""
        exact: float | None = None
        if status is not None and int(status.refreshed_at_exact) == record.refreshed_at:
            exact = status.refreshed_at_exact  # the file's whole seconds, made exact
        latest = schedule.due_at(record, self.app.api, self.config.refresh_interval,
                                 self.config.renew_before, exact)
        if self.app.api == "stable_token":
            spread = self._lead(record) * (schedule.STABLE_EARLIEST - schedule.STABLE_LATEST)
            return latest - self.rng.uniform(0, spread)
        span = max(0.0, latest - (exact or record.refreshed_at))
        return latest - self.rng.uniform(0, min(30.0, 0.05 * span))

    # -- one run ------------------------------------------------------------------------------
    def _current(self) -> TokenRecord | None:
        try:
            return self.store.read()
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise StoreError(f"cannot read {self.store.path}: {exc.strerror}") from None
        except (TokenCorrupt, OSError) as exc:
            self.log.warning("token_file.unusable", reason=str(exc), path=self.store.path)
            return None

    def run(self, first: bool = False) -> Outcome:
        """Refresh if due (decided under the lock, from the file); return what happened.

        A state directory that cannot be written (disk full, read-only, permissions) never loses
        the current file: the run is retried with backoff until the cause goes away.
        """
        try:
            with self.store.locked():
                if first:
                    for tmp in self.store.remove_stale_temp():
                        self.log.info("store.temp_removed", path=tmp)
                outcome = self._run_locked(first)
        except StoreError as exc:
            self.store_failures += 1
            delay = backoff(self.store_failures, TRANSIENT_BASE, self.transient_cap, self.rng)
            self.log.error("store.failed", error=str(exc), attempt=self.store_failures,
                           next_in=round(delay, 1), token_pending=self.pending is not None)
            return Outcome("failed", self.clock() + delay)
        self.store_failures = 0
        return outcome

    def _write_pending(self, record: TokenRecord | None, status: AppStatus,
                       now: float) -> Outcome | None:
        pending, self.pending = self.pending, None
        if pending is None or pending.expires_at <= now or (
                record is not None and record.refreshed_at > pending.refreshed_at):
            return None  # gone stale, or another writer has a newer token
        self.pending = pending
        self.store.write(pending)
        self.pending = None
        status.last_result = "ok"
        self.store.write_status(status)
        due = self.due_at(pending)
        self.log.info("token.refreshed", token=mask(pending.access_token), late_write=True,
                      expires_in=int(pending.expires_at - now), next_in=int(due - now))
        return Outcome("refreshed", due, pending.expires_at)

    def _run_locked(self, first: bool) -> Outcome:
        now = self.clock()
        record = self._current()
        status = self.store.read_status()
        if self.pending is not None and (written := self._write_pending(record, status, now)):
            return written
        if record is not None and record.expires_at > now:
            due = self.due_at(record, status)
            if due > now:
                if first:
                    self.log.info("token.reused", expires_in=int(record.expires_at - now),
                                  next_in=int(due - now))
                return Outcome("reused" if first else "fresh", due, record.expires_at)
        if status.retry_at > now and not (first and status.error_class in {
                c.value for c in HARD_ERRORS}):
            # a hard error may have been fixed by the operator before this restart: try once
            expires = record.expires_at if record else None
            state = "budget" if status.last_result == "budget" else "waiting"
            return Outcome(state, status.retry_at, expires)
        day = wechat_day(now)
        if status.calls_day != day:
            status.calls_day, status.calls_today = day, 0
        if status.calls_today >= self.config.daily_budget:
            status.retry_at = next_wechat_midnight(now) + self.rng.uniform(0, 60)
            if status.last_result != "budget":
                self.log.error("budget.exhausted", calls_today=status.calls_today,
                               daily_budget=self.config.daily_budget,
                               next_in=int(status.retry_at - now))
            status.last_result = "budget"
            self.store.write_status(status)
            return Outcome("budget", status.retry_at, record.expires_at if record else None)
        # count the call before making it, so a crash cannot hide spent quota
        status.calls_today += 1
        status.last_attempt_at = now
        self.store.write_status(status)
        try:
            fetched = self.client.fetch(self.app)
        except UpstreamError as exc:
            return self._failed(exc, status, record, now)
        done = self.clock()
        status.failures, status.retry_at = 0, 0.0
        status.error_class = status.errcode = status.errmsg = status.error = None
        status.last_success_at = done
        if record is not None and fetched.access_token == record.access_token:
            # stable_token's normal mode hands back the same token outside its last window:
            # that is not a refresh. Correct the expiry if WeChat says it is sooner, then retry
            # a few times inside the window (bounded: a quarter of the lead apart).
            expires_at = min(record.expires_at, int(now) + fetched.expires_in)
            if expires_at != record.expires_at:
                record = replace(record, expires_at=expires_at)
                self.store.write(record)
            status.last_result = "unchanged"
            self.store.write_status(status)
            next_at = done + max(1.0, self._lead(record) / 4)
            self.log.info("token.unchanged", expires_in=int(expires_at - done),
                          took_ms=fetched.took_ms, next_in=int(next_at - done))
            return Outcome("unchanged", next_at, expires_at)
        new = TokenRecord(app=self.app.name, appid=self.app.appid,
                          access_token=fetched.access_token,
                          expires_at=int(now) + fetched.expires_in, refreshed_at=int(now))
        if record is not None and record.refreshed_at > new.refreshed_at:
            # never replace a newer file with an older result (a clock step backwards)
            self.log.warning("token.discarded_older", token=mask(new.access_token))
            return Outcome("fresh", self.due_at(record), record.expires_at)
        self.pending = new
        self.store.write(new)
        self.pending = None
        status.refreshed_at_exact = now
        status.last_result = "ok"
        self.store.write_status(status)
        due = self.due_at(new, status)
        self.log.info("token.refreshed", token=mask(new.access_token),
                      expires_in=fetched.expires_in, took_ms=fetched.took_ms,
                      calls_today=status.calls_today, next_in=int(due - done))
        return Outcome("refreshed", due, new.expires_at)

    def _failed(self, exc: UpstreamError, status: AppStatus, record: TokenRecord | None,
                now: float) -> Outcome:
        status.failures += 1
        status.last_result = "error"
        status.error_class = exc.kind.value
        status.errcode, status.errmsg, status.error = exc.errcode, exc.errmsg, str(exc)
        if exc.kind is ErrorClass.QUOTA_EXHAUSTED:
            delay = next_wechat_midnight(now) - now + self.rng.uniform(0, 60)
        elif exc.kind in HARD_ERRORS:
            delay = backoff(status.failures, self.hard_base, self.hard_cap, self.rng,
                            full_jitter=False)
        else:
            delay = backoff(status.failures, TRANSIENT_BASE, self.transient_cap, self.rng)
        status.retry_at = now + delay
        self.store.write_status(status)
        fields: dict[str, Any] = {
            "error": str(exc), "error_class": exc.kind.value, "attempt": status.failures,
            "next_in": round(delay, 1),
            "token_valid_for": int(record.expires_at - now) if record else 0,
        }
        if exc.errcode is not None:
            fields.update(errcode=exc.errcode, errmsg=exc.errmsg)
        if exc.kind is ErrorClass.TRANSIENT:
            self.log.warning("refresh.failed", **fields)
        else:
            self.log.error("refresh.failed", **fields)
        return Outcome("failed", status.retry_at, record.expires_at if record else None)
