"""Every token the daemon keeps fresh: one APScheduler job per refresher, work in flight, the
platforms' one-off jobs, and what READY waits for.

A job runs its refresher and then moves its own next run to the time the refresher asked for
(its interval trigger is only a safety net). Work in flight (a job, a passive refresh) is
counted so that the monitor can see a stuck one and stop() can wait for them. Every token
family (an app, an Open Platform's component and authorizers) is added here and reaches the
scheduler only through this class; a reload reaches every refresher through
:meth:`TokenRegistry.reconfigure`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from wxtoken.config import Config
from wxtoken.logs import get_logger
from wxtoken.passive import Forced
from wxtoken.refresher import Refresher
from wxtoken.schedule import Outcome, State
from wxtoken.upstream import WeChatClient

MAX_CONCURRENT_FETCHES = 8
# a job moved to a time that comes before it has returned would be skipped by APScheduler
# ("maximum number of running instances reached") and fall back to its safety-net interval
MIN_RESCHEDULE = 0.2


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class TokenRegistry:
    """The refreshers and their jobs. ``on_outcome`` hears every outcome (metrics, the
    fleet's leadership); ``on_all_tried`` is called once every token awaited at start has an
    outcome (READY)."""

    def __init__(self, config: Config, client: WeChatClient, clock: Callable[[], float],
                 refreshers: dict[str, Refresher], stall_after: float,
                 on_outcome: Callable[[str, Outcome], None],
                 on_all_tried: Callable[[], None]) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self.refreshers = refreshers
        self.stall_after = stall_after
        self.log = get_logger()
        self._on_outcome = on_outcome
        self._on_all_tried = on_all_tried
        # every job sets its own next run; should one be lost, its trigger runs it this often
        self.safety_net = max(1.0, min(3600.0, config.renew_before / 2))
        self.outcomes: dict[str, Outcome] = {}
        self.ready = threading.Event()
        self._lock = threading.Condition()
        self._inflight: dict[int, tuple[str, float]] = {}  # work id -> (key, monotonic start)
        self._stopping = False
        # keys whose first outcome READY waits for (apps, and a platform's tokens at start)
        self._awaiting: set[str] = set(refreshers)
        self._children: dict[str, set[str]] = {}  # parent key -> the keys waiting for it
        self._valid_at: dict[str, float] = {}  # key -> when a run last ended with a valid token
        fetches = MAX_CONCURRENT_FETCHES if config.components else max(
            1, min(MAX_CONCURRENT_FETCHES, len(refreshers)))
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(fetches),
                       # quota_watch polls have their own thread: never in a refresh's way
                       "quota": ThreadPoolExecutor(1),
                       # the Open Platform's events, reconciles and imports
                       "platform": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    @property
    def stopping(self) -> bool:
        return self._stopping

    def population(self) -> int:
        return len(self.refreshers)

    def wall(self, ts: float) -> float:
        """A time of the daemon's clock (the fleet's, in the fleet mode) as this host's."""
        return ts - (self.clock() - time.time())

    # -- tokens ---------------------------------------------------------------------------------
    def settled(self, outcomes: dict[str, Outcome]) -> None:
        """Outcomes decided before any job runs (the fleet's followed apps at start)."""
        with self._lock:
            self.outcomes.update(outcomes)
            self._awaiting -= set(outcomes)

    def schedule(self, key: str, refresher: Refresher) -> None:
        """The start pass for one refresher: a valid file that is not due settles it here (no
        lock, no upstream call, no thread contention); otherwise its job runs at once."""
        outcome = refresher.peek(first=True)
        with self._lock:
            if outcome is not None:
                self.outcomes[key] = outcome
                self._awaiting.discard(key)
        self._add_job(key, self.wall(outcome.next_at) if outcome else time.time())

    def add_refresher(self, key: str, refresher: Refresher) -> None:
        """Start keeping one more token fresh (a component's or an authorizer's)."""
        with self._lock:
            self.refreshers[key] = refresher
            if key not in self.outcomes and not self.ready.is_set():
                self._awaiting.add(key)
        self.schedule(key, refresher)

    def replace(self, key: str, refresher: Refresher) -> None:
        """A reload's new or changed app: it decides again now, from its file (no call
        unless due)."""
        self.refreshers[key] = refresher
        try:
            self.scheduler.modify_job(key, next_run_time=_utc(time.time()))
        except JobLookupError:
            self._add_job(key, time.time())

    def _add_job(self, key: str, at: float) -> None:
        """The token's job, first at ``at`` (this host's time): it sets its own next run, its
        interval is only a safety net."""
        self.scheduler.add_job(self._tick, IntervalTrigger(seconds=self.safety_net), args=[key],
                               id=key, name=f"refresh {key}", replace_existing=True,
                               next_run_time=_utc(at))

    def remove_refresher(self, key: str) -> None:
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self.scheduler.remove_job(key)
        with self._lock:
            self.refreshers.pop(key, None)
            self.outcomes.pop(key, None)
            self._awaiting.discard(key)
            self._valid_at.pop(key, None)
            for children in self._children.values():
                children.discard(key)

    def reconfigure(self, config: Config, client: WeChatClient) -> None:
        """A reload: every refresher not rebuilt for it (an Open Platform's component and
        authorizers, unchanged apps) takes the new daily_budget, renew_before and
        refresh_interval, and the new WeChat client."""
        self.config = config
        self.client = client
        for refresher in list(self.refreshers.values()):
            if refresher.config is not config:
                refresher.reconfigure(config)
            if isinstance(refresher.client, WeChatClient) and refresher.client is not client:
                # a platform's refreshers have a source of their own, which reads the
                # registry's current client itself
                refresher.client = client

    def settle(self, key: str, timeout: float) -> bool:
        """Wait until no run of ``key`` is in flight (after remove_refresher: none starts
        again); False when one still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(name == key for name, _ in self._inflight.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def wake(self, key: str) -> None:
        """Run the job now (it decides again from its file)."""
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self.scheduler.modify_job(key, next_run_time=_utc(time.time()))

    def wake_all(self, why: str) -> None:
        """Every job runs now and decides again (from its file, or the fleet's record)."""
        self.log.info("daemon.rescheduled", reason=why, apps=len(self.refreshers))
        now = _utc(time.time())
        for key in list(self.refreshers):
            with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
                self.scheduler.modify_job(key, next_run_time=now)

    def force(self, key: str, invalid_token: str | None, privileged: bool) -> Forced | None:
        """A passive refresh of one of the registry's tokens; None once stopping, or when it
        was removed meanwhile. Its job then runs when the refresh asks for."""
        with self.working(key) as ok:
            refresher = self.refreshers.get(key)
            if not ok or refresher is None:
                return None
            forced = refresher.force(invalid_token, privileged)
            if forced.outcome is not None:
                self._after(key, forced.outcome)
            return forced

    def next_runs(self) -> dict[str, float]:
        """Each token's next run, on this host's clock."""
        with self._lock:
            return {key: self.wall(o.next_at) for key, o in self.outcomes.items()
                    if key in self.refreshers}  # a followed app has no runs

    def tried(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def all_tried(self) -> bool:
        with self._lock:
            return not self._awaiting

    # -- other jobs -----------------------------------------------------------------------------
    def later(self, func: Callable[[], None], delay: float, job: str) -> None:
        """Run ``func`` once, ``delay`` seconds from now, on the platform's threads (a later
        call with the same ``job`` replaces a pending one)."""
        def run() -> None:
            if self._stopping:
                return
            try:
                func()
            except Exception as exc:  # a bug must not end the platform's work silently
                self.log.error("platform.job_crashed", job=job,
                               error=str(exc) or type(exc).__name__)
        with contextlib.suppress(SchedulerNotRunningError):
            self.scheduler.add_job(run, next_run_time=_utc(time.time() + max(0.0, delay)),
                                   id=job, name=job, replace_existing=True,
                                   executor="platform", misfire_grace_time=None)

    def every(self, func: Callable[[], None], seconds: float, job: str, first_in: float,
              executor: str) -> None:
        """Run ``func`` every ``seconds`` (a tenth of jitter), first ``first_in`` from now."""
        self.scheduler.add_job(func, IntervalTrigger(seconds=seconds, jitter=seconds / 10),
                               id=job, name=job, executor=executor,
                               next_run_time=_utc(time.time() + first_in))

    def cancel(self, job: str) -> None:
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self.scheduler.remove_job(job)

    # -- work in flight -------------------------------------------------------------------------
    @contextlib.contextmanager
    def working(self, key: str) -> Iterator[bool]:
        """Count work in flight (the monitor and stop() watch it); yields False once stopping."""
        work = id(threading.current_thread())
        with self._lock:
            if self._stopping:
                yield False
                return
            self._inflight[work] = (key, time.monotonic())
        try:
            yield True
        finally:
            with self._lock:
                self._inflight.pop(work, None)
                self._lock.notify_all()

    def stalled(self) -> list[tuple[str, float]]:
        """(key, seconds running) of every piece of work running longer than stall_after."""
        now = time.monotonic()
        with self._lock:
            return [(key, now - began) for key, began in self._inflight.values()
                    if now - began > self.stall_after]

    def _tick(self, key: str) -> None:
        with self.working(key) as ok:
            if not ok:
                return
            first = key not in self.outcomes
            refresher = self.refreshers.get(key)
            if refresher is None:
                return  # removed by a reload while this run was queued
            try:
                outcome = refresher.run(first=first)
            except Exception as exc:  # a bug must not kill the token's schedule
                retry = max(1.0, min(60.0, self.config.renew_before / 4))
                refresher.log.error("refresh.crashed", error=str(exc) or type(exc).__name__,
                                    next_in=retry)
                outcome = Outcome(State.FAILED, self.clock() + retry)
            self._after(key, outcome)

    def _after(self, key: str, outcome: Outcome) -> None:
        """Reschedule the token's job, tell on_outcome, and on_all_tried once."""
        self._on_outcome(key, outcome)
        with self._lock:
            refresher = self.refreshers.get(key)
            if refresher is None:
                return  # removed meanwhile (a reload, an authorizer gone)
            woken: set[str] = set()
            if outcome.expires_at is not None and outcome.expires_at > self.clock():
                self._valid_at[key] = time.monotonic()
                woken = self._children.pop(key, set())
            parent = refresher.parent.missing
            if parent is not None:
                if self._valid_at.get(parent, -1.0) >= refresher.parent.checked_at:
                    # the parent got a token after this run looked (its wake came before
                    # this run was listed, or while it ran): once more, now
                    outcome = Outcome(outcome.state, self.clock(), outcome.expires_at)
                else:
                    self._children.setdefault(parent, set()).add(key)
            self.outcomes[key] = outcome
            self._awaiting.discard(key)
            all_tried = not self._awaiting
        for child in sorted(woken):  # its parent has a token: they fetch with it now
            self.wake(child)
        try:
            self.scheduler.modify_job(key, next_run_time=_utc(
                self.wall(max(outcome.next_at, self.clock() + MIN_RESCHEDULE))))
        except (JobLookupError, SchedulerNotRunningError):
            return  # shutting down
        if all_tried and not self.ready.is_set():
            self._on_all_tried()

    # -- start and stop -------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()

    def stop(self, wait: float) -> list[str]:
        """Let work in progress finish within ``wait`` seconds, then stop the scheduler; the
        keys of the work that had to be abandoned (stuck where no deadline reaches)."""
        with self._lock:
            self._stopping = True
            # APScheduler's shutdown() holds its job store lock while it waits for running jobs,
            # and a running job needs that lock to set its next run: wait for them first
            self._lock.wait_for(lambda: len(self._stalled_locked()) == len(self._inflight),
                                wait)
            left = [key for key, _ in self._inflight.values()]
        with contextlib.suppress(SchedulerNotRunningError):
            self.scheduler.shutdown(wait=False)
        return left

    def _stalled_locked(self) -> list[str]:
        now = time.monotonic()
        return [key for key, began in self._inflight.values()
                if now - began > self.stall_after]
