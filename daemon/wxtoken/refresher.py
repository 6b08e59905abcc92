"""One app's refresh decision, taken under the writers' lock, from the store.

Because the decision reads the record under the lock (never memory), any number of daemons,
restarts and CLI calls on one store make one upstream call per refresh.

A scheduled run (:meth:`Refresher.run`), in order:

1. a token fetched earlier but not written (disk full, …) is written, unless the file changed;
2. a valid record that is not due costs nothing (its tickets are renewed when they are due);
3. while a backoff, quota or budget wait runs, nothing is called;
4. otherwise the calls are counted, the token is fetched, then its tickets, and all is written.

A passive refresh (:meth:`Refresher.force`) takes the same lock and the same path, behind its
own limits: the spacing between forced refreshes, stable_token's 20 a day, a reserve of the
budget for scheduled refreshes, and the quota and hard-error waits.

Its collaborators: timing.py (when the token is due), failures.py (the backoff after a failure
and how long a wait holds), forced.py (the passive refresh's path), tickets.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wxtoken import passive, schedule
from wxtoken.clock import next_wechat_midnight
from wxtoken.config import AppConfig, Config
from wxtoken.errcodes import HARD_ERRORS, ErrorClass
from wxtoken.errors import StoreError, Superseded, TokenCorrupt, UpstreamError
from wxtoken.failures import TRANSIENT_BASE, Failures
from wxtoken.forced import forced_refresh
from wxtoken.logs import get_logger, mask
from wxtoken.passive import Forced, ForcedState
from wxtoken.record import TokenRecord
from wxtoken.schedule import Outcome, RefreshModel, State
from wxtoken.source import ParentWait, TokenSource
from wxtoken.status import AppStatus, LastResult
from wxtoken.store import FileStore, TokenStore
from wxtoken.tickets import Tickets
from wxtoken.timing import Timing
from wxtoken.upstream import Fetched

STORE_SLACK = 5.0  # seconds a holder of the lock may spend on disk I/O beyond its calls
QUIET_ABOVE = 100  # with more apps than this, token.reused is a debug line


@dataclass(frozen=True)
class _Pending:
    """A token fetched but not yet written, and the token the file held when it was fetched:
    it is written later only if nobody has written the file since."""

    record: TokenRecord
    replaces: str | None


class Refresher:
    """Keeps one app's token (and its tickets) fresh."""

    def __init__(self, config: Config, app: AppConfig, client: TokenSource,
                 store: TokenStore | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, log: Any = None,
                 population: Callable[[], int] | None = None) -> None:
        self.config = config
        # how many tokens the daemon keeps (apps and a platform's authorizers): the wider the
        # jitter, and the quieter the per-app lines at start
        self.population = population or (lambda: len(self.config.apps))
        self.app = app
        self._client = client
        self.model = client.model(app)  # what a call does to the last token (schedule.py)
        self.store: TokenStore = store or FileStore(config.state_dir, app.name, app.file_mode,
                                                    app.file_group)
        self.clock = clock
        self.rng = rng or random.Random()
        self.log = log or get_logger(app=app.name, appid=app.appid, api=app.api)
        self.tickets = Tickets(app, client, self.log, self.rng, (0.0, 0.0), (0.0, 0.0))
        self.failures = Failures(self.log, self.rng)
        self.timing = Timing(app, config, self.store, client, self.tickets, self.rng, clock,
                             self.population)
        self.reconfigure(config)
        self.pending: _Pending | None = None
        self.parent = ParentWait(client, app, self.log)  # the token it is fetched with
        # what the last run saw (the daemon's health and metrics read these, not the files)
        self.record: TokenRecord | None = None
        self.status = AppStatus()

    @property
    def client(self) -> TokenSource:
        return self._client

    @client.setter
    def client(self, client: TokenSource) -> None:
        """A reload's new WeChat client: the tickets and the timing take it too."""
        self._client = self.tickets.client = self.timing.source = self.parent.source = client

    @property
    def problem(self) -> str | None:
        """The state could not be read or written, or the token is gone and the one it is
        fetched with is missing (the daemon's health shows it)."""
        return self.failures.problem or self.parent.problem(self.record, self.clock())

    def reconfigure(self, config: Config) -> None:
        """Take the config's global settings (daily_budget, renew_before, refresh_interval):
        at start, and at a reload for a refresher the reload does not rebuild (an Open
        Platform's component and authorizers)."""
        self.config = config
        deadline = schedule.call_deadline(config.renew_before)
        # the longest a run holds the lock (its calls, each bounded, and its writes): others
        # wait that long for it, and the daemon calls a run that takes twice as long stalled
        self.hold_limit = deadline * (1 + len(self.app.tickets)) + STORE_SLACK
        self.lock_timeout = self.hold_limit + self.store.extra_wait
        self.failures.configure(config)  # the backoff's bounds (failures.py)
        self.tickets.transient = (TRANSIENT_BASE, self.failures.transient_cap)
        self.tickets.hard = (self.failures.hard_base, self.failures.hard_cap)
        self.timing.configure(config)  # due times drawn again under the new settings

    # -- entry points ---------------------------------------------------------------------------
    def run(self, first: bool = False) -> Outcome:
        """Refresh if due (decided under the lock, from the store); return what happened.

        A state that cannot be written (disk full, read-only, permissions) never loses the
        current token: the run is retried with backoff until the cause goes away.
        """
        self.parent.missing = None
        if (idle := self.peek(first)) is not None:
            return self._checked(idle)
        try:
            with self.store.locked(self.lock_timeout):
                outcome = self._run_locked(first)
        except Superseded:
            return self._checked(self._superseded())
        except StoreError as exc:
            return self._store_failed(exc)
        self.failures.cleared()
        return self._checked(outcome)

    def _checked(self, outcome: Outcome) -> Outcome:
        """The outcome, rescheduled earlier when the store's checks (the fleet's) are due."""
        checks = self.store.checks
        return outcome if checks is None else checks.reschedule(outcome, self.clock())

    def force(self, invalid_token: str | None = None, privileged: bool = False) -> Forced:
        """Passive refresh: replace the token now, unless the reported one is already replaced.

        Concurrent requests are serialised by the lock; after the first has refreshed, the others
        find a token other than the one they report and get it without an upstream call.
        ``privileged`` (root or the daemon's own user) may call through a quota or hard-error
        wait and use the whole budget.
        """
        self.parent.missing = None
        try:
            with self.store.locked(self.lock_timeout):
                forced = forced_refresh(self, invalid_token, privileged)
        except Superseded as exc:
            return Forced(ForcedState.FAILED, None, self._superseded(), error=exc)
        except StoreError as exc:
            return Forced(ForcedState.STORE_FAILED, None, self._store_failed(exc), error=exc)
        self.failures.cleared()
        return forced

    def quota_cleared(self) -> bool:
        """WeChat's daily quota of this app's account was reset (`wxtoken clear-quota`): a wait
        for it (45009) ends now. True when the app was waiting (the daemon then runs it)."""
        return self.end_wait(lambda s: s.error_class is ErrorClass.QUOTA_EXHAUSTED,
                             "the account's quota was reset")

    def end_wait(self, which: Callable[[AppStatus], bool], reason: str) -> bool:
        """End a wait after a failure that ``which`` recognises, because what caused it is gone
        (a quota reset, a new component_verify_ticket). True when the app was waiting."""
        try:
            with self.store.locked(self.lock_timeout):
                status = self.store.read_status()
                if not which(status) or status.retry_at <= self.clock():
                    return False
                status.retry_at = 0.0
                self.store.write_status(status)
                self.status = status
        except StoreError:
            return False
        self.log.info("refresh.wait_ended", reason=reason)
        return True

    # -- the schedule (timing.py) ----------------------------------------------------------------
    def due_at(self, record: TokenRecord, status: AppStatus) -> float:
        return self.timing.due_at(record, status)

    # -- the scheduled run ------------------------------------------------------------------------
    def peek(self, first: bool = False) -> Outcome | None:
        """The run's outcome when a look without the lock shows nothing to do (a valid record,
        not due, tickets not due, nothing pending); None when the run must take the lock.
        Deciding *not* to act needs no exclusion, and a restart of 10,000 apps takes no lock."""
        checks = self.store.checks
        if self.pending is not None or (checks is not None and checks.due(self.clock())):
            return None
        now = self.clock()
        try:
            record = self.store.look()
        except TokenCorrupt:
            return None
        status = self.store.read_status()
        if checks is not None:
            checks.settle(status)
        if record is None or record.expires_at <= now or self.timing.is_due(record, status, now):
            if (parent := self.parent.look()) is not None:
                return self.parent.waits(parent, record, now)  # no lock: no call can be made
            return None
        if self.timing.tickets_due_at(record) <= now:
            return None
        self.record, self.status = record, status
        return self._reused(record, status, now, first)

    def _reused(self, record: TokenRecord, status: AppStatus, now: float,
                first: bool) -> Outcome:
        next_at = self.timing.next_at(record, status)
        if first:
            # one line per app is noise past a hundred apps: daemon.ready counts them
            log = self.log.info if self.population() <= QUIET_ABOVE else self.log.debug
            log("token.reused", expires_in=int(record.expires_at - now),
                next_in=int(next_at - now))
        return Outcome(State.REUSED if first else State.FRESH, next_at, record.expires_at)

    def _run_locked(self, first: bool) -> Outcome:
        now = self.clock()
        record = self._read()
        status = self.store.read_status()
        self.record, self.status = record, status
        checks = self.store.checks
        if checks is not None:
            checks.settle(status)
            checks.verify(self.app, self.client, record, status, now)
        if self.pending is not None and (written := self._write_pending(record, status, now)):
            return written
        if record is not None and schedule.from_the_future(record.refreshed_at, now):
            self.log.warning("token.from_the_future", refreshed_in=int(record.refreshed_at - now),
                             reason="the clock stepped back: replacing the token now")
        if record is not None and record.expires_at > now and not self.timing.is_due(record, status,
                                                                               now):
            if self.timing.tickets_due_at(record) > now:
                return self._reused(record, status, now, first)
            if (outcome := self._refresh_tickets(record, status, now)) is not None:
                return outcome
            # getticket refused the token: WeChat dropped it early; replace it now
        if (waiting := self._waiting(record, status, now, first)) is not None:
            return waiting
        if checks is not None and (
                held := checks.before_fetch(self.app, self.client, record, status, now)):
            return held
        if (parent := self.parent.look()) is not None:
            return self.parent.waits(parent, record, now)
        self.parent.there()
        if not self._spend(status, now, 1 + len(self.app.tickets)):
            return Outcome(State.BUDGET, status.retry_at, record.expires_at if record else None)
        return self._call(record, status, now, forced=False)

    def _read(self) -> TokenRecord | None:
        try:
            return self.store.read()
        except TokenCorrupt as exc:
            # unreadable counts too: this daemon owns the state dir and replaces what it
            # cannot use (a file left by a run as another user, say)
            self.log.warning("token_file.unusable", reason=exc.reason)
            return None

    def wait_end(self, status: AppStatus, now: float, calls: int) -> float:
        """When the current wait ends (0: none): failures.py."""
        return self.failures.wait_end(status, now, calls, self.hold_limit)

    def _waiting(self, record: TokenRecord | None, status: AppStatus, now: float,
                 first: bool) -> Outcome | None:
        retry_at = self.wait_end(status, now, 1 + len(self.app.tickets))
        if retry_at <= now:
            return None
        if first and status.error_class in HARD_ERRORS:
            return None  # a hard error may have been fixed by the operator before this restart
        state = State.BUDGET if status.last_result is LastResult.BUDGET else State.WAITING
        return Outcome(state, retry_at, record.expires_at if record else None)

    def _spend(self, status: AppStatus, now: float, calls: int) -> bool:
        """Count upstream calls against the daily budget *before* making them (a crash cannot
        hide spent quota); False, with an error line once, when the budget is spent."""
        if passive.calls_today(status, now) + calls > self.config.daily_budget:
            status.retry_at = next_wechat_midnight(now) + self.rng.uniform(0, 60)
            if status.last_result is not LastResult.BUDGET:
                self.log.error("budget.exhausted", calls_today=status.calls_today,
                               daily_budget=self.config.daily_budget,
                               next_in=int(status.retry_at - now))
            status.last_result = LastResult.BUDGET
            self.store.write_status(status)
            return False
        status.calls_today += calls
        status.last_attempt_at = now
        self.store.write_status(status, durable=False)  # survives a crash of this process
        return True

    def _call(self, record: TokenRecord | None, status: AppStatus, now: float,
              forced: bool) -> Outcome:
        """Fetch a token (the calls are counted) and store it."""
        if self.store.degraded:
            self.log.warning("refresh.uncoordinated", reason="the fleet's Redis is unreachable: "
                             "this host refreshes on its own")
        self._still_holding()
        try:
            fetched = self._fetch(forced and self.model is RefreshModel.FINAL_WINDOW)
        except UpstreamError as exc:
            status.calls_today -= len(self.app.tickets)  # counted, never asked for
            if not exc.called:
                status.calls_today -= 1  # nothing reached WeChat
            return self._failed(exc, status, record, now)
        return self._store_fetched(fetched, record, status, now, forced)

    def _fetch(self, force_refresh: bool) -> Fetched:
        """The token call; the store hears of every call WeChat may have answered (a fleet
        whose lease ran out meanwhile marks its record: this call may have retired it)."""
        # stable_token's normal mode and WeCom hand back the current token: nothing retired
        retires = self.model is RefreshModel.NEW_EACH_CALL or force_refresh
        try:
            fetched = self.client.fetch(self.app, force_refresh=force_refresh)
        except UpstreamError as exc:
            if exc.called:
                self.store.fetched(retires)
            raise
        self.store.fetched(retires)
        return fetched

    def _store_fetched(self, fetched: Fetched, record: TokenRecord | None, status: AppStatus,
                       now: float, forced: bool) -> Outcome:
        done = self.clock()
        status.succeeded(done)
        if record is not None and fetched.access_token == record.access_token:
            return self._unchanged(fetched, record, status, now, done)
        # a token this process just fetched under the lock always wins: nothing else can have
        # written meanwhile, and WeChat has already retired the file's token
        new = TokenRecord(app=self.app.name, appid=self.app.appid,
                          access_token=fetched.access_token,
                          expires_at=int(now) + fetched.expires_in, refreshed_at=int(now),
                          tickets=dict(record.tickets) if record else None)
        # tickets belong to the new token's file: fetched first, so readers see both at once
        tickets = self.tickets.fetch(new, now)
        status.calls_today -= tickets.unused
        new = tickets.record
        self._write(new, replaces=record.access_token if record else None)
        status.refreshed_at_exact = now
        status.last_result = LastResult.OK
        self.store.write_status(status)
        next_at = self.timing.next_at(new, status)
        self.log.info("token.refreshed", token=mask(new.access_token), forced=forced,
                      expires_in=fetched.expires_in, took_ms=fetched.took_ms,
                      calls_today=status.calls_today, next_in=int(next_at - done))
        return Outcome(State.REFRESHED, next_at, new.expires_at)

    def _unchanged(self, fetched: Fetched, record: TokenRecord, status: AppStatus, now: float,
                   done: float) -> Outcome:
        """stable_token's normal mode hands back the same token outside its last window: that
        is not a refresh. Correct the expiry if WeChat says it is sooner, then retry a few times
        inside the window (a quarter of the lead apart; the lead never exceeds the window)."""
        status.calls_today -= len(self.app.tickets)
        expires_at = min(record.expires_at, int(now) + fetched.expires_in)
        if expires_at != record.expires_at:
            record = record.replace(expires_at=expires_at)
            self._write(record, replaces=record.access_token)
        status.last_result = LastResult.UNCHANGED
        self.store.write_status(status)
        next_at = done + max(1.0, schedule.lead(record, self.model,
                                                self.config.renew_before) / 4)
        self.log.info("token.unchanged", expires_in=int(expires_at - done),
                      took_ms=fetched.took_ms, next_in=int(next_at - done))
        return Outcome(State.UNCHANGED, next_at, expires_at)

    def _write(self, record: TokenRecord, replaces: str | None) -> None:
        """Write the record; if that fails, keep it to write later instead of fetching again
        (every fetch shortens the life of the token readers hold)."""
        self.pending = _Pending(record, replaces)
        self.store.write(record)
        self.pending = None
        self.record = record

    def _write_pending(self, record: TokenRecord | None, status: AppStatus,
                       now: float) -> Outcome | None:
        pending = self.pending
        assert pending is not None
        if pending.record.expires_at <= now or (
                record.access_token if record else None) != pending.replaces:
            self.pending = None
            self.log.info("token.pending_dropped", token=mask(pending.record.access_token),
                          reason="expired" if pending.record.expires_at <= now else
                          "the file was written by another writer since")
            return None
        self._write(pending.record, pending.replaces)
        status.last_result = LastResult.OK
        status.refreshed_at_exact = float(pending.record.refreshed_at)
        self.store.write_status(status)
        next_at = self.timing.next_at(pending.record, status)
        self.log.info("token.refreshed", token=mask(pending.record.access_token),
                      late_write=True, expires_in=int(pending.record.expires_at - now),
                      next_in=int(next_at - now))
        return Outcome(State.REFRESHED, next_at, pending.record.expires_at)

    # -- tickets ----------------------------------------------------------------------------------
    def _refresh_tickets(self, record: TokenRecord, status: AppStatus,
                         now: float) -> Outcome | None:
        """Renew due tickets with the file's token; None when getticket refused the token and
        it may be replaced now (at most once per token lifetime)."""
        if not self._spend(status, now, len(self.app.tickets)):
            return Outcome(State.BUDGET, status.retry_at, record.expires_at)
        tickets = self.tickets.fetch(record, now)
        status.calls_today -= tickets.unused
        if tickets.record != record:
            self._write(tickets.record, replaces=record.access_token)
        self.store.write_status(status, durable=False)
        if tickets.refused:
            lifetime = record.expires_at - record.refreshed_at
            if self.model is RefreshModel.FINAL_WINDOW:
                # replacing early would cost one of the 20 forced refreshes a day
                self.log.warning("ticket.token_refused", action="waiting for the next window")
            elif schedule.elapsed(status.ticket_replaced_at, now) >= lifetime:
                status.ticket_replaced_at = now
                self.log.warning("ticket.token_refused", action="replacing the token now")
                return None
            else:
                self.log.error("ticket.token_refused", action="backing off",
                               next_in=int(self.tickets.retry_at - now),
                               reason="the token was already replaced for this in its lifetime")
        return Outcome(State.FRESH, self.timing.next_at(tickets.record, status), record.expires_at)

    # -- failures -------------------------------------------------------------------------------
    def _still_holding(self) -> None:
        """Right before the upstream call: a shared lock that ran out while this holder was
        paused means another host may be refreshing: no call (it would retire that host's
        token). The calls counted for it stay counted: a budget errs on the safe side."""
        if not self.store.holding():
            raise Superseded("the lease ran out before the upstream call")

    def _superseded(self) -> Outcome:
        """Another host wrote a newer token while this one's lease had run out: this token is
        dropped (the file and Redis keep the newer one) and the app is looked at again soon."""
        self.pending = None
        return Outcome(State.FRESH, self.clock() + 1.0)

    def _store_failed(self, exc: StoreError) -> Outcome:
        return self.failures.store(exc, self.clock(), token_pending=self.pending is not None)

    def _failed(self, exc: UpstreamError, status: AppStatus, record: TokenRecord | None,
                now: float) -> Outcome:
        """Record the failed call and the wait it sets (failures.py)."""
        return self.failures.upstream(exc, status, record, max(now, self.clock()),
                                      self.store.write_status)
