"""The daemon: an APScheduler job per app, systemd notification, clean shutdown on signals.

The scheduler sleeps until the next job is due (no polling). Each job runs the app's Refresher and
then moves its own next run to the time the Refresher asked for.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from wxtoken import sdnotify
from wxtoken.clock import human_delta
from wxtoken.config import Config
from wxtoken.control import ControlServer
from wxtoken.errors import ConfigError
from wxtoken.logs import get_logger
from wxtoken.refresher import Forced, Outcome, Refresher
from wxtoken.upstream import WeChatClient

if TYPE_CHECKING:
    from wxtoken.metrics import Metrics

MAX_CONCURRENT_FETCHES = 8
GOOD_STATES = {"fresh", "reused", "refreshed", "unchanged"}


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Daemon:
    """Runs every app's refresher on its own schedule until stopped."""

    def __init__(self, config: Config, client: WeChatClient | None = None,
                 notify: Callable[[str], bool] = sdnotify.notify,
                 clock: Callable[[], float] = time.time) -> None:
        if config.redis is not None:
            raise ConfigError([f"{config.path}: redis: the fleet mode is not implemented in this "
                               "version; remove the [redis] table"])
        self.config = config
        self.client = client or WeChatClient(config.api_base, config.ca_bundle)
        self.notify = notify
        self.clock = clock
        self.log = get_logger()
        self.refreshers = {app.name: Refresher(config, app, self.client, clock=clock)
                           for app in config.apps}
        self.outcomes: dict[str, Outcome] = {}
        self._lock = threading.Condition()
        self._inflight = 0
        self._stopping = False
        self.control: ControlServer | None = None
        self.metrics: Metrics | None = None
        if config.metrics_file:
            from wxtoken.metrics import Metrics  # prometheus_client only when metrics are on
            self.metrics = Metrics(config, config.metrics_file)
        self.ready = threading.Event()
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "default": ThreadPoolExecutor(min(MAX_CONCURRENT_FETCHES, len(config.apps))),
                "watchdog": ThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def start(self) -> None:
        self.log.info("daemon.starting", apps=len(self.refreshers),
                      state_dir=self.config.state_dir)
        now = self.clock()
        for name in self.refreshers:
            self.scheduler.add_job(
                # the job sets its own next run; the interval is only a safety net
                self._tick, IntervalTrigger(seconds=max(3600.0, self.config.refresh_interval)),
                args=[name], id=name, name=f"refresh {name}", next_run_time=_utc(now))
        try:
            self.control = ControlServer(self.config.control_socket, self.refreshers,
                                         self._on_forced, self._working)
        except OSError as exc:  # e.g. /run/wxtoken missing when run by hand: refresh is off
            self.control = None
            self.log.warning("control.disabled", socket=self.config.control_socket,
                             reason=exc.strerror or str(exc))
        interval = sdnotify.watchdog_interval()
        if interval:
            self.scheduler.add_job(self.notify, IntervalTrigger(seconds=interval),
                                   args=["WATCHDOG=1"], id="_watchdog", executor="watchdog")
        self.scheduler.start()
        if self.control is not None:
            self.control.start()
        if self.metrics is not None:
            self.metrics.start()

    @contextlib.contextmanager
    def _working(self) -> Iterator[bool]:
        """Count work in flight (stop() waits for it); yields False once stopping."""
        with self._lock:
            if self._stopping:
                yield False
                return
            self._inflight += 1
        try:
            yield True
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def _tick(self, name: str) -> None:
        with self._working() as ok:
            if ok:
                self._refresh(name)

    def _on_forced(self, name: str, forced: Forced) -> None:
        """After a passive refresh (run inside _working), the app's schedule follows it."""
        if forced.outcome is None:
            return
        if self.metrics is not None:
            self.metrics.observe(name, forced.outcome.state)
        with self._lock:
            self.outcomes[name] = forced.outcome
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self.scheduler.modify_job(name, next_run_time=_utc(forced.outcome.next_at))
        if self.ready.is_set():
            self.notify(f"STATUS={self.summary()}")

    def _refresh(self, name: str) -> None:
        first = name not in self.outcomes
        refresher = self.refreshers[name]
        try:
            outcome = refresher.run(first=first)
        except Exception as exc:  # a bug or a disk problem must not kill the app's schedule
            retry = max(1.0, min(60.0, self.config.renew_before / 4))
            refresher.log.error("refresh.crashed", error=str(exc) or type(exc).__name__,
                                next_in=retry)
            outcome = Outcome("failed", self.clock() + retry)
        if self.metrics is not None:
            self.metrics.observe(name, outcome.state)
        with self._lock:
            self.outcomes[name] = outcome
            all_tried = len(self.outcomes) == len(self.refreshers)
        try:
            self.scheduler.modify_job(name, next_run_time=_utc(outcome.next_at))
        except (JobLookupError, SchedulerNotRunningError):
            return  # shutting down
        if all_tried:
            self.notify(f"STATUS={self.summary()}")
            if not self.ready.is_set():
                self.ready.set()
                self.notify("READY=1")
                self.log.info("daemon.ready", summary=self.summary())

    def summary(self) -> str:
        """One line for systemd's STATUS=, e.g. "2/2 apps fresh; next: main in 59m"."""
        with self._lock:
            outcomes = dict(self.outcomes)
        now = self.clock()
        good = sum(1 for o in outcomes.values()
                   if o.state in GOOD_STATES and (o.expires_at or 0) > now)
        text = f"{good}/{len(self.refreshers)} apps fresh"
        failing = sorted(n for n, o in outcomes.items() if o.state not in GOOD_STATES)
        if failing:
            text += f"; failing: {', '.join(failing[:3])}" + ("…" if len(failing) > 3 else "")
        if outcomes:
            name, nxt = min(outcomes.items(), key=lambda kv: kv[1].next_at)
            text += f"; next: {name} in {human_delta(nxt.next_at - now)}"
        return text

    def stop(self, timeout: float = 80.0) -> None:
        """Let refreshes in progress finish (never cut a write short), then stop the scheduler."""
        self.notify("STOPPING=1")
        self.log.info("daemon.stopping")
        if self.control is not None:
            self.control.stop()
        with self._lock:
            self._stopping = True
            # APScheduler's shutdown() holds its job store lock while it waits for running jobs,
            # and a running job needs that lock to set its next run: wait for them first.
            self._lock.wait_for(lambda: self._inflight == 0, timeout)
        with contextlib.suppress(SchedulerNotRunningError):
            self.scheduler.shutdown(wait=False)
        if self.metrics is not None:
            self.metrics.stop()
        self.client.close()
        self.log.info("daemon.stopped")


def run(config: Config) -> int:
    """Run in the foreground until SIGTERM or SIGINT; return the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    daemon = Daemon(config)
    try:
        daemon.start()
        stop.wait()
    finally:
        daemon.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
