"""One app's refresh decision and action, taken under the writers' lock, from the file.

Because the decision reads the file under the lock (never memory), any number of daemons,
restarts and CLI calls on one state directory make one upstream call per refresh.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wxtoken import schedule
from wxtoken.clock import next_wechat_midnight, wechat_day
from wxtoken.config import AppConfig, Config
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import StoreError, TokenCorrupt, UpstreamError
from wxtoken.logs import get_logger, mask
from wxtoken.record import TokenRecord
from wxtoken.store import AppStatus, Store
from wxtoken.upstream import Fetched, WeChatClient

TRANSIENT_BASE = 1.0
HARD_ERRORS = (ErrorClass.PERMANENT, ErrorClass.NEEDS_HUMAN)
FORCE_SPACING = 30.0  # at most one forced (passive) refresh per app per 30 s
STABLE_FORCE_PER_DAY = 20  # WeChat's limit on stable_token force_refresh


@dataclass(frozen=True)
class Outcome:
    """What one run did, and when the next run should be (Unix seconds)."""

    state: str  # fresh | reused | refreshed | unchanged | failed | waiting | budget
    next_at: float
    expires_at: int | None = None


@dataclass(frozen=True)
class Forced:
    """The answer to a passive refresh request."""

    state: str  # current | refreshed | rate_limited | budget | failed
    record: TokenRecord | None
    outcome: Outcome | None = None  # for rescheduling the app's job
    error: UpstreamError | None = None
    retry_after: float = 0.0


def backoff(failures: int, base: float, cap: float, rng: random.Random,
            full_jitter: bool = True) -> float:
    """Capped exponential backoff, never shorter than ``base``.

    Full jitter (uniform over [0, ceiling]) spreads transient retries; hard errors use equal
    jitter (uniform over [ceiling/2, ceiling]) so that the waits really grow.
    """
    ceiling = min(cap, base * 2 ** min(failures - 1, 30))
    return max(base, rng.uniform(0 if full_jitter else ceiling / 2, ceiling))


class Refresher:
    """Keeps one app's token file (and its tickets) fresh."""

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
        self.ticket_failures = 0
        self.ticket_retry_at = 0.0
        # WeChat refused the token while we fetched a ticket: it was dropped early (another
        # fetch somewhere). Replace it at once rather than waiting for its due time.
        self.token_refused = False

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
        return latest - self.rng.uniform(0, self._spread(span))

    def _spread(self, span: float) -> float:
        """Jitter window: small (<= 30 s) for a few apps; with many apps in one daemon, wide
        enough (half a second per app, at most a quarter of the interval) that their refreshes
        spread out instead of hitting WeChat in one burst every interval."""
        small = min(30.0, 0.05 * span)
        return min(max(small, 0.5 * len(self.config.apps)), max(small, 0.25 * span))

    def tickets_due_at(self, record: TokenRecord) -> float:
        """When a configured ticket is missing or close to expiry (inf when none configured)."""
        due = math.inf
        for kind in self.app.tickets:
            ticket = record.tickets.get(kind)
            if ticket is None:
                due = min(due, self.ticket_retry_at)
            else:
                due = min(due, max(ticket[1] - self._lead(record), self.ticket_retry_at))
        return due

    # -- entry points ---------------------------------------------------------------------------
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
            return self._store_failed(exc)
        self.store_failures = 0
        return outcome

    def force(self, invalid_token: str | None = None, timeout: float = 30.0) -> Forced:
        """Passive refresh: replace the token now, unless the reported one is already replaced.

        Concurrent requests are serialised by the lock; after the first has refreshed, the others
        find a token other than the one they report and get it without an upstream call.
        """
        try:
            with self.store.locked(timeout):
                return self._force_locked(invalid_token)
        except StoreError as exc:
            self._store_failed(exc)
            raise

    # -- the scheduled run ------------------------------------------------------------------------
    def _store_failed(self, exc: StoreError) -> Outcome:
        self.store_failures += 1
        delay = backoff(self.store_failures, TRANSIENT_BASE, self.transient_cap, self.rng)
        self.log.error("store.failed", error=str(exc), attempt=self.store_failures,
                       next_in=round(delay, 1), token_pending=self.pending is not None)
        return Outcome("failed", self.clock() + delay)

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

    def _run_locked(self, first: bool) -> Outcome:
        now = self.clock()
        record = self._current()
        status = self.store.read_status()
        if self.pending is not None and (written := self._write_pending(record, status, now)):
            return written
        if record is not None and record.expires_at > now and not self.token_refused:
            due = self.due_at(record, status)
            if due > now and self.tickets_due_at(record) <= now:
                outcome = self._refresh_tickets(record, status, now, due)
                if not self.token_refused:
                    return outcome
                record = self._current()
            elif due > now:
                if first:
                    self.log.info("token.reused", expires_in=int(record.expires_at - now),
                                  next_in=int(due - now))
                next_at = min(due, self.tickets_due_at(record))
                return Outcome("reused" if first else "fresh", next_at, record.expires_at)
        if status.retry_at > now and not (first and status.error_class in {
                c.value for c in HARD_ERRORS}):
            # a hard error may have been fixed by the operator before this restart: try once
            expires = record.expires_at if record else None
            state = "budget" if status.last_result == "budget" else "waiting"
            return Outcome(state, status.retry_at, expires)
        if not self._spend_call(status, now):
            return Outcome("budget", status.retry_at, record.expires_at if record else None)
        try:
            fetched = self.client.fetch(self.app)
        except UpstreamError as exc:
            return self._failed(exc, status, record, now)
        return self._store_fetched(fetched, record, status, now)

    def _spend_call(self, status: AppStatus, now: float, calls: int = 1) -> bool:
        """Count upstream calls against the daily budget *before* making them (a crash cannot
        hide spent quota); False, with an error line once, when the budget is spent."""
        day = wechat_day(now)
        if status.calls_day != day:
            status.calls_day, status.calls_today, status.forced_today = day, 0, 0
        if status.calls_today + calls > self.config.daily_budget:
            status.retry_at = next_wechat_midnight(now) + self.rng.uniform(0, 60)
            if status.last_result != "budget":
                self.log.error("budget.exhausted", calls_today=status.calls_today,
                               daily_budget=self.config.daily_budget,
                               next_in=int(status.retry_at - now))
            status.last_result = "budget"
            self.store.write_status(status)
            return False
        status.calls_today += calls
        status.last_attempt_at = now
        self.store.write_status(status)
        return True

    def _store_fetched(self, fetched: Fetched, record: TokenRecord | None, status: AppStatus,
                       now: float, forced: bool = False) -> Outcome:
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
                record = record.replace(expires_at=expires_at)
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
        # tickets belong to the new token's file: fetched first, so readers see both at once
        self.token_refused = False
        new = self._with_tickets(new, record, status, now)
        self.pending = new
        self.store.write(new)
        self.pending = None
        status.refreshed_at_exact = now
        status.last_result = "ok"
        self.store.write_status(status)
        due = self.due_at(new, status)
        self.log.info("token.refreshed", token=mask(new.access_token), forced=forced,
                      expires_in=fetched.expires_in, took_ms=fetched.took_ms,
                      calls_today=status.calls_today, next_in=int(due - done))
        return Outcome("refreshed", min(due, self.tickets_due_at(new)), new.expires_at)

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

    # -- tickets ----------------------------------------------------------------------------------
    def _with_tickets(self, record: TokenRecord, previous: TokenRecord | None,
                      status: AppStatus, now: float) -> TokenRecord:
        """``record`` with fresh tickets; a ticket that cannot be fetched keeps its valid old
        value (tickets do not die with the token) and is retried with backoff."""
        if not self.app.tickets:
            return record
        tickets = dict(previous.tickets) if previous is not None else {}
        failed = False
        for kind in self.app.tickets:
            if not self._spend_call(status, now):
                failed = True
                break
            try:
                got = self.client.fetch_ticket(self.app, record.access_token, kind)
            except UpstreamError as exc:
                failed = True
                self.log.warning("ticket.failed", ticket=kind, error=str(exc),
                                 errcode=exc.errcode, errmsg=exc.errmsg)
                # stable_token cannot be replaced early without a (scarce) forced refresh
                if exc.kind is ErrorClass.TOKEN_INVALID and self.app.api != "stable_token":
                    self.token_refused = True
                    break
                continue
            tickets[kind] = (got.access_token, int(now) + got.expires_in)
            self.log.info("ticket.refreshed", ticket=kind, expires_in=got.expires_in,
                          took_ms=got.took_ms)
        if failed:
            self.ticket_failures += 1
            self.ticket_retry_at = now + backoff(self.ticket_failures, TRANSIENT_BASE,
                                                 self.transient_cap, self.rng)
        else:
            self.ticket_failures, self.ticket_retry_at = 0, 0.0
        kept = {k: v for k, v in tickets.items() if k in self.app.tickets and v[1] > now}
        return record.replace(tickets=kept)

    def _refresh_tickets(self, record: TokenRecord, status: AppStatus, now: float,
                         token_due: float) -> Outcome:
        updated = self._with_tickets(record, record, status, now)
        if updated != record:
            self.store.write(updated)
        return Outcome("fresh", min(token_due, self.tickets_due_at(updated)), record.expires_at)

    # -- failures -------------------------------------------------------------------------------
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
            cap = self.transient_cap
            if record is not None and record.expires_at > now:
                # the closer the token in the file is to its end, the more often we try
                cap = min(cap, max(TRANSIENT_BASE, (record.expires_at - now) / 8))
            delay = backoff(status.failures, TRANSIENT_BASE, cap, self.rng)
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

    # -- passive refresh -------------------------------------------------------------------------
    def _force_locked(self, invalid_token: str | None) -> Forced:
        now = self.clock()
        record = self._current()
        status = self.store.read_status()
        valid = record is not None and record.expires_at > now
        if invalid_token is not None and valid and record is not None and \
                record.access_token != invalid_token:
            return Forced("current", record)  # already replaced: no upstream call
        since = now - status.last_forced_at
        if since < FORCE_SPACING:
            self.log.warning("refresh.rate_limited", reason="one forced refresh per 30 s",
                             retry_after=round(FORCE_SPACING - since, 1))
            return Forced("rate_limited", record, retry_after=FORCE_SPACING - since)
        if self.app.api == "stable_token" and status.calls_day == wechat_day(now) and \
                status.forced_today >= STABLE_FORCE_PER_DAY:
            retry = next_wechat_midnight(now) - now
            self.log.error("refresh.rate_limited", reason="stable_token force_refresh: 20 a day",
                           retry_after=int(retry))
            return Forced("rate_limited", record, retry_after=retry)
        if not self._spend_call(status, now):
            return Forced("budget", record, retry_after=status.retry_at - now)
        status.forced_today += 1
        status.last_forced_at = now
        self.store.write_status(status)
        self.log.info("refresh.forced", reported=mask(invalid_token) if invalid_token else None)
        try:
            fetched = self.client.fetch(self.app, force_refresh=self.app.api == "stable_token")
        except UpstreamError as exc:
            outcome = self._failed(exc, status, record, now)
            return Forced("failed", record if valid else None, outcome, error=exc)
        outcome = self._store_fetched(fetched, record, status, now, forced=True)
        return Forced("refreshed", self.store.read(), outcome)
