"""The daemon: an APScheduler job per app, the control endpoint, systemd notification, a
monitor thread, and a stop that is always bounded.

The scheduler sleeps until the next job is due (no polling). Each job runs the app's Refresher
and then moves its own next run to the time the Refresher asked for. The monitor wakes a few
times a minute at most: it feeds systemd's watchdog only while no job is stalled, extends the
start timeout while first fetches progress, and reschedules every job when the wall clock steps
(APScheduler's run times are wall-clock times: a step back would delay every job by the step).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

import wxtoken
from wxtoken import __version__, logs, schedule, sdnotify
from wxtoken.component.platform import Platform
from wxtoken.config import load_config
from wxtoken.errors import ConfigError
from wxtoken.health import app_health, summary
from wxtoken.logs import get_logger
from wxtoken.passive import ForcedState
from wxtoken.quota import Operations, watch_interval
from wxtoken.refresher import Forced, Refresher
from wxtoken.reload import plan
from wxtoken.runinfo import remove_run_info, run_path, write_run_info
from wxtoken.schedule import Outcome, State
from wxtoken.status import AppStatus
from wxtoken.store import TokenStore, clean_state_dir
from wxtoken.upstream import WeChatClient

if TYPE_CHECKING:
    from wxtoken.component.callback import CallbackServer
    from wxtoken.config import Config
    from wxtoken.control import ControlServer
    from wxtoken.fleet.node import FleetNode
    from wxtoken.metrics import Metrics

MAX_CONCURRENT_FETCHES = 8
# a job moved to a time that comes before it has returned would be skipped by APScheduler
# ("maximum number of running instances reached") and fall back to its safety-net interval
MIN_RESCHEDULE = 0.2
CLOCK_STEP = 2.0  # a change of wall minus monotonic time larger than this is a clock step
STARTING_TICK = 10.0  # the monitor's period before READY (it extends the start timeout)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Daemon:
    """Runs every app's refresher on its own schedule until stopped."""

    def __init__(self, config: Config, client: WeChatClient | None = None,
                 notify: Callable[[str], bool] = sdnotify.notify,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.node: FleetNode | None = None
        stores: dict[str, TokenStore] = {}
        if config.redis is not None:
            from wxtoken.fleet.node import FleetNode  # redis only in the fleet mode
            self.node = FleetNode(config, self._requested,
                                  lambda: self._wake_all("the fleet's Redis is back"))
            self.node.fleet.on_fenced = self.wake
            clock = self.node.clock  # the fleet's time: every record's times are in it
            stores = dict(self.node.stores)
        deadline = schedule.call_deadline(config.renew_before)
        self.client = client or WeChatClient(config.api_base, config.ca_bundle,
                                             deadline=deadline)
        self.notify = notify
        self.clock = clock
        self.log = get_logger()
        rng = self._rng = random.Random()  # one for all: 10,000 generators would cost 25 MB
        # an app this host only follows (fleet mode, no secret) has no refresher here
        self.refreshers = {
            app.name: Refresher(config, app, self.client, store=stores.get(app.name),
                                clock=clock, rng=rng)
            for app in config.apps if not (self.node and app.follower)}
        # a job running for longer than this is stuck somewhere no deadline reaches
        # (name resolution, a hung disk): twice the longest a run may hold the lock, plus the
        # wait for a fleet lease, plus slack
        self.stall_after = 2 * max((r.hold_limit for r in self.refreshers.values()),
                                   default=10.0) + max(
            (r.store.extra_wait for r in self.refreshers.values()),
            # a platform's refreshers come later: in the fleet mode they wait for leases too
            default=self.node.fleet.lease_timeout + 1 if self.node else 0.0) + 10
        self.stop_wait = min(45.0, self.stall_after)  # under TimeoutStopSec=90 with the rest
        # every job sets its own next run; should one be lost, its trigger runs it this often
        self.safety_net = max(1.0, min(3600.0, config.renew_before / 2))
        self.outcomes: dict[str, Outcome] = {}
        self._lock = threading.Condition()
        self._inflight: dict[int, tuple[str, float]] = {}  # work id -> (app, monotonic start)
        self._stopping = False
        self._stopped = threading.Event()
        self._reloading = threading.Lock()
        self.control: ControlServer | None = None
        self.metrics: Metrics | None = None
        if config.metrics_file:
            from wxtoken.metrics import Metrics  # prometheus_client only when metrics are on
            self.metrics = Metrics(config.metrics_file, self.health, len(config.apps),
                                   self.node.fleet.status if self.node else None)
        self.ops = Operations(lambda: self.config, lambda: self.client, self.force,
                              self.node.fleet if self.node else None, self._quota_cleared)
        if self.metrics is not None:
            self.metrics.quota = self.ops.figures
        self.ready = threading.Event()
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(MAX_CONCURRENT_FETCHES if config.components
                                                     else max(1, min(MAX_CONCURRENT_FETCHES,
                                                                     len(self.refreshers)))),
                       # quota_watch polls have their own thread: never in a refresh's way
                       "quota": ThreadPoolExecutor(1),
                       # the Open Platform's events, reconciles and imports
                       "platform": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._monitor_thread = threading.Thread(target=self._monitor, name="monitor",
                                                daemon=True)
        # keys whose first outcome READY waits for (apps, and a platform's tokens at start)
        self._awaiting: set[str] = set(self.refreshers)
        self.platforms: dict[str, Platform] = {}
        self.callback: CallbackServer | None = None

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.log.info("daemon.starting", apps=len(self.refreshers),
                      state_dir=self.config.state_dir, version=__version__)
        for done in clean_state_dir(self.config.state_dir):
            self.log.info("state_dir.cleaned", action=done)
        if self.node is not None:  # the fleet first: ConfigError when the hosts disagree
            self.outcomes.update(self.node.start())
        # one pass over every app's files, in this thread: apps with a valid token that is not
        # due are settled here (no lock, no upstream call, no thread contention), the others
        # run at once
        self._awaiting -= set(self.outcomes)
        for name, refresher in list(self.refreshers.items()):
            self._schedule(name, refresher)
        for app in self.config.apps:
            self._watch_quota(app.name)
        if self.config.components:
            for comp in self.config.components:
                self.platforms[comp.name] = platform = Platform(self, comp, self.clock,
                                                                self._rng, self.node)
                platform.start()
            if self.metrics is not None:
                self.metrics.components = self._component_figures
            if self.config.callback_listen is not None:
                # api layer: the daemon still builds its listeners (#17 moves that out)
                from wxtoken.component.callback import CallbackServer
                host, port = self.config.callback_listen
                try:
                    self.callback = CallbackServer(self.config.callback_listen, self.platforms)
                except OSError as exc:
                    where = host if port == 0 else f"{host}:{port}"  # port 0: a Unix socket
                    raise ConfigError([f"{self.config.path}: callback_listen: cannot listen on "
                                       f"{where}: {exc.strerror or exc}"]) from None
        try:
            # api layer: the daemon still builds its listeners (#17 moves that out)
            from wxtoken.control import ControlServer
            self.control = ControlServer(self.config.control_socket, lambda: self.config,
                                         self.force, self.reload, self.ops, self.platforms)
        except OSError as exc:  # e.g. /run/wxtoken missing when run by hand: refresh is off
            # an error line: readers would otherwise find out during an outage, when their
            # passive refresh fails
            self.control = None
            self.log.error("control.disabled", socket=self.config.control_socket,
                           reason=exc.strerror or str(exc),
                           impact="no passive refresh, reload over the socket or quota tools; "
                                  "tokens are still kept fresh",
                           hint="create the socket's directory (or set control_socket) and "
                                "restart")
        self.scheduler.start()
        if self.control is not None:
            self.control.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.callback is not None:
            self.callback.start()
        self._monitor_thread.start()
        with self._lock:
            settled = not self._awaiting
        if settled:
            self._ready()  # every token was reused: nothing left to try

    def _schedule(self, name: str, refresher: Refresher) -> None:
        """The start pass for one refresher: a valid file that is not due settles it here (no
        lock, no upstream call, no thread contention); otherwise its job runs at once."""
        outcome = refresher.peek(first=True)
        with self._lock:
            if outcome is not None:
                self.outcomes[name] = outcome
                self._awaiting.discard(name)
        self.scheduler.add_job(
            # the job sets its own next run; the interval is only a safety net
            self._tick, IntervalTrigger(seconds=self.safety_net), args=[name], id=name,
            name=f"refresh {name}", replace_existing=True,
            next_run_time=_utc(self._wall(outcome.next_at) if outcome else time.time()))

    # -- what a platform (the Open Platform's component) asks of the daemon ----------------------
    def add_refresher(self, key: str, refresher: Refresher) -> None:
        """Start keeping one more token fresh (a component's or an authorizer's)."""
        with self._lock:
            self.refreshers[key] = refresher
            if key not in self.outcomes and not self.ready.is_set():
                self._awaiting.add(key)
        self._schedule(key, refresher)

    def remove_refresher(self, key: str) -> None:
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self.scheduler.remove_job(key)
        with self._lock:
            self.refreshers.pop(key, None)
            self.outcomes.pop(key, None)
            self._awaiting.discard(key)

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

    def population(self) -> int:
        return len(self.refreshers)

    def _component_figures(self) -> list[tuple[str, float | None, int, list[str]]]:
        now = time.time()
        out = []
        for name, platform in self.platforms.items():
            at = platform.files.newest_ticket_at()
            out.append((name, None if at is None else max(0.0, now - at),
                        max(0, len(platform.keys) - 1), sorted(platform.needing_reauth())))
        return out

    # -- work in flight ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _working(self, name: str) -> Iterator[bool]:
        """Count work in flight (the monitor and stop() watch it); yields False once stopping."""
        key = id(threading.current_thread())
        with self._lock:
            if self._stopping:
                yield False
                return
            self._inflight[key] = (name, time.monotonic())
        try:
            yield True
        finally:
            with self._lock:
                self._inflight.pop(key, None)
                self._lock.notify_all()

    def _stalled(self) -> list[tuple[str, float]]:
        """(app, seconds running) of every piece of work running longer than stall_after."""
        now = time.monotonic()
        with self._lock:
            return [(name, now - began) for name, began in self._inflight.values()
                    if now - began > self.stall_after]

    # -- the jobs ---------------------------------------------------------------------------------
    def _tick(self, name: str) -> None:
        with self._working(name) as ok:
            if not ok:
                return
            first = name not in self.outcomes
            refresher = self.refreshers.get(name)
            if refresher is None:
                return  # removed by a reload while this run was queued
            try:
                outcome = refresher.run(first=first)
            except Exception as exc:  # a bug must not kill the app's schedule
                retry = max(1.0, min(60.0, self.config.renew_before / 4))
                refresher.log.error("refresh.crashed", error=str(exc) or type(exc).__name__,
                                    next_in=retry)
                outcome = Outcome(State.FAILED, self.clock() + retry)
            self._after(name, outcome)

    def _wall(self, ts: float) -> float:
        """A time of the daemon's clock (the fleet's, in the fleet mode) as this host's."""
        return ts - (self.clock() - time.time())

    def force(self, name: str, invalid_token: str | None, privileged: bool) -> Forced | None:
        """A passive refresh of app ``name`` (the control endpoint's one way in); None once the
        daemon is stopping. The app's job then runs when the refresh asks for."""
        with self._working(name) as ok:
            if not ok:
                return None
            if name not in self.refreshers and "/" in name:  # a platform's token it follows
                return self._followed_component(name)
            if name not in self.refreshers:  # an app this host follows: the fleet refreshes it
                assert self.node is not None
                return self.node.ask(self.config.app(name), invalid_token, privileged,
                                     timeout=self.stall_after / 2)
            refresher = self.refreshers.get(name)
            if refresher is None:  # a platform's authorizer removed meanwhile
                return None
            forced = refresher.force(invalid_token, privileged)
            if forced.outcome is not None:
                self._after(name, forced.outcome)
            return forced

    def _followed_component(self, key: str) -> Forced:
        comp, _, appid = key.partition("/")
        platform = self.platforms.get(comp)
        return Forced(ForcedState.FAILED, platform.record(appid) if platform else None,
                      retry_after=30.0, reason=f"this host only follows component {comp} (no "
                      "secret): report the token on a host of the fleet that has its secret")

    # -- the quota tools ------------------------------------------------------------------------
    def _watch_quota(self, name: str) -> None:
        """(Re)schedule the app's quota_watch job: none when it watches nothing."""
        job = f"quota:{name}"
        with contextlib.suppress(JobLookupError):
            self.scheduler.remove_job(job)
        app = next((a for a in self.config.apps if a.name == name), None)
        if app is None or not app.quota_watch or self.metrics is None:
            return  # (without metrics_file the figures would go nowhere: check-config warns)
        every = watch_interval(self.config)
        first = min(every, 30.0) * (1 + self._rng.random() / 2)  # after the first fetches
        self.scheduler.add_job(self._quota_tick, IntervalTrigger(seconds=every,
                                                                 jitter=every / 10),
                               args=[name], id=job, name=f"quota_watch {name}",
                               executor="quota", next_run_time=_utc(time.time() + first))

    def _quota_tick(self, name: str) -> None:
        if self._stopping:
            return
        try:
            self.ops.watch(name)
        except Exception as exc:  # a bug must not end the watch
            self.log.error("quota.watch_crashed", app=name, error=str(exc) or type(exc).__name__)
        else:
            if self.metrics is not None:
                self.metrics.observe(name, None)

    def _quota_cleared(self, appid: str) -> None:
        """WeChat's quota of ``appid`` was reset: apps waiting for it (45009) run now."""
        def wake() -> None:
            for key, refresher in list(self.refreshers.items()):
                if refresher.app.appid == appid and refresher.quota_cleared():
                    self.wake(key)
        threading.Thread(target=wake, name="quota-cleared", daemon=True).start()

    def _requested(self, name: str, invalid_token: str | None, privileged: bool) -> None:
        """A follower elsewhere in the fleet asked for a passive refresh of an app this host
        has the secret of (for an operator or a token reader there)."""
        forced = self.force(name, invalid_token, privileged)
        if forced is not None:
            self.log.info("fleet.request_served", app=name, state=forced.state)

    def _after(self, name: str, outcome: Outcome) -> None:
        """Reschedule the app's job, count the result, tell systemd."""
        if self.metrics is not None:
            self.metrics.observe(name, outcome.state)
        if self.node is not None:
            self.node.note_leadership(name)
        with self._lock:
            if name not in self.refreshers and (self.node is None or name not in
                                                self.node.followers):
                return  # removed meanwhile (a reload, an authorizer gone)
            self.outcomes[name] = outcome
            self._awaiting.discard(name)
            all_tried = not self._awaiting
        try:
            self.scheduler.modify_job(name, next_run_time=_utc(
                self._wall(max(outcome.next_at, self.clock() + MIN_RESCHEDULE))))
        except (JobLookupError, SchedulerNotRunningError):
            return  # shutting down
        if all_tried and not self.ready.is_set():
            self._ready()

    def _ready(self) -> None:
        with self._lock:
            if self.ready.is_set():
                return
            self.ready.set()
            states = Counter(o.state.value for o in self.outcomes.values())
        line = self.summary()
        self.notify(f"STATUS={line}")
        self.notify("READY=1")
        self.log.info("daemon.ready", summary=line, **dict(sorted(states.items())))

    # -- health -----------------------------------------------------------------------------------
    def health(self) -> list[dict[str, Any]]:
        """Every app's health from what its refresher last saw (no file reads; a followed
        app's from its file)."""
        now = self.clock()
        out = []
        for app in self.config.apps:
            role = self.node.role(app.name) if self.node else None
            refresher = self.refreshers.get(app.name)
            if refresher is None:
                assert self.node is not None
                out.append(app_health(self.config, app, self.node.record(app.name),
                                      AppStatus(), time.time(), role=role))
            else:
                out.append(app_health(self.config, app, refresher.record, refresher.status,
                                      now, problem=refresher.problem, role=role))
        for name, platform in self.platforms.items():
            ticket_problem = platform.ticket_problem(time.time())
            for key in sorted(platform.keys):
                refresher = self.refreshers.get(key)
                component = key == platform.component_key
                if refresher is None:
                    if platform.following:  # a mirror: its health from its file
                        appid = key.partition("/")[2]
                        info = app_health(self.config, platform.app(appid),
                                          platform.record(appid), AppStatus(), time.time(),
                                          role="follower")
                        info.update(app=key, component=name)
                        out.append(info)
                    continue
                info = app_health(self.config, refresher.app, refresher.record,
                                  refresher.status, now, problem=refresher.problem,
                                  role="component" if component else "authorizer")
                info.update(app=key, component=name)
                if component and ticket_problem:
                    info["problems"].append(ticket_problem)
                    info["healthy"] = False
                out.append(info)
        return out

    def summary(self) -> str:
        """One line for systemd's STATUS=, e.g. "2/2 apps fresh; next: main in 59m"."""
        with self._lock:
            next_runs = {name: self._wall(o.next_at) for name, o in self.outcomes.items()
                         if name in self.refreshers}  # a followed app has no runs
        return summary(self.health(), next_runs, time.time())

    # -- the monitor ------------------------------------------------------------------------------
    def _monitor(self) -> None:
        watchdog = sdnotify.watchdog_interval()
        clock_check = min(60.0, max(1.0, self.config.renew_before / 4))
        period = min(watchdog or clock_check, clock_check)
        offset = time.time() - time.monotonic()
        tried = 0
        withheld = False
        while not self._stopped.wait(period if self.ready.is_set() else min(period,
                                                                             STARTING_TICK)):
            now_offset = time.time() - time.monotonic()
            if abs(now_offset - offset) > CLOCK_STEP:
                self._clock_stepped(now_offset - offset)
            offset = now_offset
            if not self.ready.is_set():
                with self._lock:
                    progress, tried = len(self.outcomes) > tried, len(self.outcomes)
                if progress:  # first fetches are moving: keep systemd from timing out
                    self.notify(f"EXTEND_TIMEOUT_USEC={int(3 * STARTING_TICK * 1_000_000)}")
            if self.ready.is_set():
                self.notify(f"STATUS={self.summary()}")  # a few times a minute at most
            if self.node is not None:
                self.node.write_status()
            stalled = self._stalled()
            if stalled:
                if not withheld:
                    app, running = max(stalled, key=lambda s: s[1])
                    self.log.error("watchdog.withheld", app=app, running_for=int(running),
                                   reason="a job is stuck where no deadline reaches it; "
                                   "systemd's watchdog will restart the daemon")
                withheld = True
            else:
                withheld = False
                if watchdog:
                    self.notify("WATCHDOG=1")

    def _clock_stepped(self, by: float) -> None:
        self.log.warning("clock.stepped", by=round(by, 1),
                         reason="rescheduling every app from its file")
        if self.node is not None:
            with contextlib.suppress(Exception):
                self.node.fleet.measure_clock()
        self._wake_all("the wall clock stepped")

    def _wake_all(self, why: str) -> None:
        """Every app's job runs now and decides again (from its file, or the fleet's record)."""
        self.log.info("daemon.rescheduled", reason=why, apps=len(self.refreshers))
        now = _utc(time.time())
        for name in list(self.refreshers):
            with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
                self.scheduler.modify_job(name, next_run_time=now)

    # -- stop -------------------------------------------------------------------------------------
    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config file and apply it: (True, [what changed]); or refuse it, leaving
        the running config as it was: (False, [one line per problem]). systemd hears
        RELOADING=1 meanwhile, and READY=1 after."""
        with self._reloading:
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                applied, lines = self._reload()
            finally:
                self.notify("READY=1")
                self.notify(f"STATUS={self.summary()}")
        if applied:
            self.log.info("config.reloaded", changes=lines[0])
        else:
            self.log.error("config.reload_refused", problems=lines,
                           reason="the running config stays")
        return applied, lines

    def _reload(self) -> tuple[bool, list[str]]:
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            return False, exc.problems
        change = plan(self.config, new)
        if change.needs_restart:
            return False, change.problems(new.path)
        if self.node is not None:
            try:
                self.node.reload(new, change)
            except ConfigError as exc:
                return False, exc.problems
        logs.register_secrets(app.secret for app in new.apps)
        client = self.client
        if change.new_client:
            client = WeChatClient(new.api_base, new.ca_bundle,
                                  deadline=schedule.call_deadline(new.renew_before))
        old_client, self.client, self.config = self.client, client, new
        now = time.time()
        for name in change.removed:
            with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
                self.scheduler.remove_job(name)
            self.refreshers.pop(name, None)
            with self._lock:
                self.outcomes.pop(name, None)
        for name in (*change.added, *change.changed):
            app = new.app(name)
            if self.node is not None and app.follower:
                self.refreshers.pop(name, None)
                with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
                    self.scheduler.remove_job(name)
                continue
            store = self.node.stores[name] if self.node is not None else None
            self.refreshers[name] = Refresher(new, app, client, store=store, clock=self.clock,
                                              rng=self._rng)
            try:  # a changed app decides again now, from its file: no call unless due
                self.scheduler.modify_job(name, next_run_time=_utc(now))
            except JobLookupError:
                self.scheduler.add_job(
                    self._tick, IntervalTrigger(seconds=self.safety_net), args=[name], id=name,
                    name=f"refresh {name}", next_run_time=_utc(now))
        for name in (*change.removed, *change.added, *change.changed, *change.watch_changed):
            self._watch_quota(name)
        for refresher in list(self.refreshers.values()):
            if refresher.config is not new:
                # not rebuilt (an Open Platform's component and authorizers, unchanged apps):
                # the new daily_budget, renew_before and refresh_interval hold for them too
                refresher.reconfigure(new)
            if isinstance(refresher.client, WeChatClient) and refresher.client is not client:
                # unchanged apps, when only the client changed (a platform's refreshers read
                # the daemon's current client themselves)
                refresher.client = client
        if old_client is not client:
            old_client.close()
        return True, [change.summary()]

    def stop(self) -> bool:
        """Let work in progress finish (never cut a write short), within ``stop_wait``; then stop.
        False when some work had to be abandoned (stuck where no deadline reaches)."""
        self.notify("STOPPING=1")
        self.log.info("daemon.stopping")
        self._stopped.set()
        if self.callback is not None:
            self.callback.stop()
        if self.control is not None:
            self.control.stop()
        with self._lock:
            self._stopping = True
            # APScheduler's shutdown() holds its job store lock while it waits for running jobs,
            # and a running job needs that lock to set its next run: wait for them first
            self._lock.wait_for(lambda: len(self._stalled_locked()) == len(self._inflight),
                                self.stop_wait)
            left = [name for name, _ in self._inflight.values()]
        with contextlib.suppress(SchedulerNotRunningError):
            self.scheduler.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.stop()
        if self.node is not None:
            self.node.stop()
        self.client.close()
        if left:
            self.log.warning("daemon.stop_abandoned", apps=sorted(set(left)),
                             reason="stuck where no deadline reaches; the files stay whole")
        self.log.info("daemon.stopped")
        return not left

    def _stalled_locked(self) -> list[str]:
        now = time.monotonic()
        return [name for name, began in self._inflight.values()
                if now - began > self.stall_after]


# modules a running daemon never needs (the test and demo tools, the wechatpy adapter)
NOT_PRELOADED = frozenset({"emulator", "demo", "wechatpy_session", "__main__"})


# what APScheduler would load by its entry points at first use (add_job without a trigger)
THIRD_PARTY_LAZY = ("apscheduler.triggers.date",)


def preload() -> None:
    """Import every module of the program the daemon may need later, before it is READY: an
    upgrade (apt, install.sh) replaces the files under the running daemon, which must never load
    a module of the new version beside the old ones (the reload code at the first SIGHUP, the
    Open Platform's at its first event, the quota tools at their first use)."""
    def walk(path: list[str], prefix: str) -> None:
        for module in pkgutil.iter_modules(path, prefix):
            if module.name.split(".")[1] in NOT_PRELOADED:
                continue  # never imported, not even to look inside
            imported = importlib.import_module(module.name)
            if module.ispkg:
                walk(list(imported.__path__), module.name + ".")

    walk(list(wxtoken.__path__), "wxtoken.")
    for name in THIRD_PARTY_LAZY:
        importlib.import_module(name)


def run(config: Config) -> int:
    """Run in the foreground until SIGTERM or SIGINT (SIGHUP reloads); return the exit code.

    The signals are blocked in every thread (the mask is set before any thread starts) and
    taken with sigwait() here: a Python handler that set an Event would deadlock if the signal
    arrived while this thread was inside that Event's wait().
    """
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # for good: the process ends here
    preload()
    daemon = Daemon(config)
    clean = True
    try:
        if (why := write_run_info(config.state_dir, __version__)) is not None:
            daemon.log.warning("daemon.run_info_failed", path=run_path(config.state_dir),
                               error=why, impact="wxtoken status cannot tell that it runs")
        daemon.start()
        while signal.sigwait(signals) == signal.SIGHUP:
            daemon.reload()  # the verdict goes to the journal
    finally:
        clean = daemon.stop()
        remove_run_info(config.state_dir)
    if not clean:
        # a thread stuck in a call that cannot be interrupted would keep the interpreter from
        # exiting (the executor's threads are joined at exit): leave now, the files are whole
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
