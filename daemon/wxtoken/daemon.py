"""The daemon: the composition root. It builds the parts (the token registry and its
refreshers, the fleet node, the Open Platform's components, the quota tools, the metrics, the
control endpoint and the callback), starts them, routes a passive refresh, reloads, notifies
systemd and stops, always within a bound.

The registry (registry.py) runs the jobs. The monitor wakes a few times a minute at most: it
feeds systemd's watchdog only while no job is stalled, extends the start timeout while first
fetches progress, and reschedules every job when the wall clock steps (APScheduler's run times
are wall-clock times: a step back would delay every job by the step).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from wxtoken import __version__, logs, schedule, sdnotify
from wxtoken.component.platform import Platform
from wxtoken.config import load_config
from wxtoken.errors import ConfigError
from wxtoken.fleet.events import Fenced, RedisBack, RefreshRequested
from wxtoken.fleet.node import FleetNode
from wxtoken.health import daemon_health, summary
from wxtoken.logs import get_logger
from wxtoken.passive import Forced, ForcedState
from wxtoken.quota import Operations, watch_interval
from wxtoken.refresher import Refresher
from wxtoken.registry import TokenRegistry
from wxtoken.reload import plan
from wxtoken.schedule import Outcome
from wxtoken.store import TokenStore, clean_state_dir
from wxtoken.upstream import WeChatClient

if TYPE_CHECKING:
    from wxtoken.config import Config
    from wxtoken.metrics import Metrics

CLOCK_STEP = 2.0  # a change of wall minus monotonic time larger than this is a clock step
STARTING_TICK = 10.0  # the monitor's period before READY (it extends the start timeout)


class Listener(Protocol):
    """What serves requests beside the jobs (the control endpoint, the callback)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Daemon:
    """Keeps every configured token fresh until stopped."""

    def __init__(self, config: Config, client: WeChatClient | None = None,
                 notify: Callable[[str], bool] = sdnotify.notify,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.node: FleetNode | None = None
        stores: dict[str, TokenStore] = {}
        if config.redis is not None:
            self.node = FleetNode(config)
            events = self.node.fleet.events
            events.subscribe(RefreshRequested, self._requested)
            # the schedules made while Redis was down (token apps wait for renew_before)
            events.subscribe(RedisBack,
                             lambda _: self.registry.wake_all("the fleet's Redis is back"))
            events.subscribe(Fenced, lambda e: self.registry.wake(e.key))
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
        refreshers = {
            app.name: Refresher(config, app, self.client, store=stores.get(app.name),
                                clock=clock, rng=rng)
            for app in config.apps if not (self.node and app.follower)}
        # a job running for longer than this is stuck somewhere no deadline reaches
        # (name resolution, a hung disk): twice the longest a run may hold the lock, plus the
        # wait for a fleet lease, plus slack
        stall_after = 2 * max((r.hold_limit for r in refreshers.values()),
                              default=10.0) + max(
            (r.store.extra_wait for r in refreshers.values()),
            # a platform's refreshers come later: in the fleet mode they wait for leases too
            default=self.node.fleet.lease_timeout + 1 if self.node else 0.0) + 10
        self.stop_wait = min(45.0, stall_after)  # under TimeoutStopSec=90 with the rest
        self.registry = TokenRegistry(config, self.client, clock, refreshers, stall_after,
                                      self._observed, self._ready)
        self.refreshers = self.registry.refreshers  # every token's, by key
        self.ready = self.registry.ready
        self._ready_lock = threading.Lock()
        self._stopped = threading.Event()
        self._reloading = threading.Lock()
        self.metrics: Metrics | None = None
        if config.metrics_file:
            from wxtoken.metrics import Metrics  # prometheus_client only when metrics are on
            self.metrics = Metrics(config.metrics_file, self.health, len(config.apps),
                                   self.node.fleet.status if self.node else None)
        self.ops = Operations(lambda: self.config, lambda: self.client, self.force,
                              self.node.fleet if self.node else None, self._quota_cleared)
        if self.metrics is not None:
            self.metrics.quota = self.ops.figures
        self._monitor_thread = threading.Thread(target=self._monitor, name="monitor",
                                                daemon=True)
        self.platforms: dict[str, Platform] = {}
        self.listeners: list[Listener] = []

    # -- start ----------------------------------------------------------------------------------
    def open(self) -> None:
        """Everything before the jobs run: the fleet, each app's start pass, the platforms. A
        ConfigError when the fleet's hosts disagree."""
        self.log.info("daemon.starting", apps=len(self.refreshers),
                      state_dir=self.config.state_dir, version=__version__)
        for done in clean_state_dir(self.config.state_dir):
            self.log.info("state_dir.cleaned", action=done)
        if self.node is not None:  # the fleet first: ConfigError when the hosts disagree
            self.registry.settled(self.node.start())
        # one pass over every app's files, in this thread: apps with a valid token that is not
        # due are settled here (no lock, no upstream call, no thread contention), the others
        # run at once
        for name, refresher in list(self.refreshers.items()):
            self.registry.schedule(name, refresher)
        for app in self.config.apps:
            self._watch_quota(app.name)
        for comp in self.config.components:
            self.platforms[comp.name] = platform = Platform(self.registry, comp, self.clock,
                                                            self._rng, self.node)
            platform.start()
        if self.platforms and self.metrics is not None:
            self.metrics.components = self._component_figures

    def start(self, listeners: Sequence[Listener] = ()) -> None:
        """Run the jobs, the listeners (the control endpoint, the callback: serve.py opens
        them), the metrics and the monitor; stop() stops the listeners first."""
        self.listeners = list(listeners)
        self.registry.start()
        for listener in self.listeners:
            listener.start()
        if self.metrics is not None:
            self.metrics.start()
        self._monitor_thread.start()
        if self.registry.all_tried():
            self._ready()  # every token was reused: nothing left to try

    def _component_figures(self) -> list[tuple[str, float | None, int, list[str]]]:
        now = time.time()
        out = []
        for name, platform in self.platforms.items():
            at = platform.files.ticket.newest_at()
            out.append((name, None if at is None else max(0.0, now - at),
                        max(0, len(platform.keys) - 1), sorted(platform.needing_reauth())))
        return out

    # -- a passive refresh ------------------------------------------------------------------------
    def force(self, name: str, invalid_token: str | None, privileged: bool) -> Forced | None:
        """A passive refresh of app ``name`` (the control endpoint's one way in); None once the
        daemon is stopping. The app's job then runs when the refresh asks for."""
        if name in self.refreshers:
            return self.registry.force(name, invalid_token, privileged)
        with self.registry.working(name) as ok:
            if not ok:
                return None
            if "/" in name:  # a platform's token it follows (or an authorizer just removed)
                return self._followed_component(name)
            # an app this host follows: the fleet refreshes it
            assert self.node is not None
            return self.node.ask(self.config.app(name), invalid_token, privileged,
                                 timeout=self.registry.stall_after / 2)

    def _followed_component(self, key: str) -> Forced:
        comp, _, appid = key.partition("/")
        platform = self.platforms.get(comp)
        return Forced(ForcedState.FAILED, platform.record(appid) if platform else None,
                      retry_after=30.0, reason=f"this host only follows component {comp} (no "
                      "secret): report the token on a host of the fleet that has its secret")

    def _requested(self, request: RefreshRequested) -> None:
        """A follower elsewhere in the fleet asked for a passive refresh of an app this host
        has the secret of (for an operator or a token reader there)."""
        forced = self.force(request.name, request.invalid_token, request.privileged)
        if forced is not None:
            self.log.info("fleet.request_served", app=request.name, state=forced.state)

    # -- the quota tools ------------------------------------------------------------------------
    def _watch_quota(self, name: str) -> None:
        """(Re)schedule the app's quota_watch job: none when it watches nothing."""
        job = f"quota:{name}"
        self.registry.cancel(job)
        app = next((a for a in self.config.apps if a.name == name), None)
        if app is None or not app.quota_watch or self.metrics is None:
            return  # (without metrics_file the figures would go nowhere: check-config warns)
        every = watch_interval(self.config)
        first = min(every, 30.0) * (1 + self._rng.random() / 2)  # after the first fetches
        self.registry.every(lambda: self._quota_tick(name), every, job, first, "quota")

    def _quota_tick(self, name: str) -> None:
        if self.registry.stopping:
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
                    self.registry.wake(key)
        threading.Thread(target=wake, name="quota-cleared", daemon=True).start()

    # -- outcomes, READY and health ---------------------------------------------------------------
    def _observed(self, name: str, outcome: Outcome) -> None:
        if self.metrics is not None:
            self.metrics.observe(name, outcome.state)
        if self.node is not None:
            self.node.note_leadership(name)

    def _ready(self) -> None:
        with self._ready_lock:
            if self.ready.is_set():
                return
            self.ready.set()
        states = Counter(o.state.value for o in list(self.registry.outcomes.values()))
        line = self.summary()
        self.notify(f"STATUS={line}")
        self.notify("READY=1")
        self.log.info("daemon.ready", summary=line, **dict(sorted(states.items())))

    def health(self) -> list[dict[str, Any]]:
        """Every token's health from what its refresher last saw (no file reads; a followed
        one's from its file)."""
        return daemon_health(self.config, self.refreshers, self.node, self.platforms,
                             self.clock())

    def summary(self) -> str:
        """One line for systemd's STATUS=, e.g. "2/2 apps fresh; next: main in 59m"."""
        return summary(self.health(), self.registry.next_runs(), time.time())

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
                progress, tried = self.registry.tried() > tried, self.registry.tried()
                if progress:  # first fetches are moving: keep systemd from timing out
                    self.notify(f"EXTEND_TIMEOUT_USEC={int(3 * STARTING_TICK * 1_000_000)}")
            if self.ready.is_set():
                self.notify(f"STATUS={self.summary()}")  # a few times a minute at most
            if self.node is not None:
                self.node.write_status()
            stalled = self.registry.stalled()
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
        self.registry.wake_all("the wall clock stepped")

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
        for name in change.removed:
            self.registry.remove_refresher(name)
        for name in (*change.added, *change.changed):
            app = new.app(name)
            if self.node is not None and app.follower:
                self.registry.remove_refresher(name)
                continue
            store = self.node.stores[name] if self.node is not None else None
            self.registry.replace(name, Refresher(new, app, client, store=store,
                                                  clock=self.clock, rng=self._rng))
        for name in (*change.removed, *change.added, *change.changed, *change.watch_changed):
            self._watch_quota(name)
        # the component's and authorizers' refreshers and the unchanged apps' take the new
        # daily_budget, renew_before and refresh_interval, and the new client
        self.registry.reconfigure(new, client)
        if old_client is not client:
            old_client.close()
        return True, [change.summary()]

    # -- stop -------------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Let work in progress finish (never cut a write short), within ``stop_wait``; then stop.
        False when some work had to be abandoned (stuck where no deadline reaches)."""
        self.notify("STOPPING=1")
        self.log.info("daemon.stopping")
        self._stopped.set()
        for listener in self.listeners:
            listener.stop()
        left = self.registry.stop(self.stop_wait)
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
