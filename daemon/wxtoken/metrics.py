"""Prometheus textfile metrics (node exporter's textfile collector), written atomically.

The figures come from the daemon's in-memory health (what its refreshers last saw), so a write
reads no files even at 10,000 apps. Writes are coalesced: a burst of refreshes (many apps
starting) costs a few writes, not one per refresh.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wxtoken import __version__
from wxtoken.logs import get_logger
from wxtoken.schedule import State
from wxtoken.status import Role

RESULTS = {State.REFRESHED: "ok", State.UNCHANGED: "unchanged", State.FAILED: "error",
           State.BUDGET: "budget"}


class Metrics:
    """Collects per-app figures and rewrites ``path`` after refreshes."""

    def __init__(self, path: str, health: Callable[[], list[dict[str, Any]]],
                 apps: int = 1, fleet: Callable[[], dict[str, Any]] | None = None) -> None:
        self.path = path
        self.health = health
        self.fleet = fleet  # the fleet mode's Redis state, when on
        self.log = get_logger()
        self.up = 1
        # gather a burst into one write: longer with more apps, as each write covers them all
        self.coalesce = 0.25 * math.ceil(max(1, apps) / 1000)
        self.results: Counter[tuple[str, str]] = Counter()
        # (app, path, daily_limit, used, remain) of every quota_watch path (the daemon sets it)
        self.quota: Callable[[], list[tuple[str, str, int, int, int]]] = list
        # (component, seconds since the last ticket or None, authorizers, appids that need a
        # new authorization) of every Open Platform component (the daemon sets it)
        self.components: Callable[[], list[tuple[str, float | None, int, list[str]]]] = list
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    def start(self) -> None:
        self._dirty.set()
        self._thread.start()

    def observe(self, app: str, state: State | None) -> None:
        """Count one refresh attempt's result (None: no refresh, new quota figures) and
        schedule a write."""
        result = RESULTS.get(state) if state is not None else None
        if result is not None:
            with self._lock:
                self.results[(app, result)] += 1
        self._dirty.set()

    def stop(self) -> None:
        """Write a last file with wxtoken_up 0: a stopped daemon must not look alive."""
        self.up = 0
        self._stopping = True
        self._dirty.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.write()

    def _loop(self) -> None:
        while True:
            self._dirty.wait()  # sleeps until a refresh happened: no polling
            if self._stopping:
                return
            time.sleep(self.coalesce)
            self._dirty.clear()
            self.write()

    def write(self) -> None:
        try:
            write_to_textfile(self.path, self.registry)
        except OSError as exc:
            self.log.warning("metrics.write_failed", path=self.path,
                             error=exc.strerror or str(exc))

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("wxtoken_up", "1 while the wxtoken daemon runs")
        up.add_metric([], self.up)
        build = GaugeMetricFamily("wxtoken_build_info", "The running wxtoken's version (always 1)",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        expiry = GaugeMetricFamily("wxtoken_token_expiry_timestamp_seconds",
                                   "When the app's token in its file expires", labels=["app"])
        success = GaugeMetricFamily("wxtoken_last_refresh_success_timestamp_seconds",
                                    "Last successful upstream fetch for the app", labels=["app"])
        calls = GaugeMetricFamily("wxtoken_upstream_calls_today",
                                  "Upstream calls this WeChat day (00:00 Asia/Shanghai)",
                                  labels=["app"])
        total = CounterMetricFamily("wxtoken_refresh", "Refresh attempts by this daemon process",
                                    labels=["app", "result"])
        leader = GaugeMetricFamily("wxtoken_leader",
                                   "1 while this host wrote the app's current fleet record",
                                   labels=["app"])
        for health in self.health():
            name = health["app"]
            if "expires_at" in health:
                expiry.add_metric([name], health["expires_at"])
            if health.get("last_success_at"):
                success.add_metric([name], health["last_success_at"])
            calls.add_metric([name], health["calls_today"])
            if "role" in health:
                leader.add_metric([name], 1 if health["role"] == Role.LEADER else 0)
        with self._lock:
            for (app_name, result), count in sorted(self.results.items()):
                total.add_metric([app_name, result], count)
        yield from (up, build, expiry, success, calls, total)
        platforms = self.components()
        if platforms:
            ticket = GaugeMetricFamily("wxtoken_component_ticket_age_seconds",
                                       "Seconds since the component's last "
                                       "component_verify_ticket (WeChat pushes one every 10 "
                                       "minutes; it is good for 12 hours)", labels=["component"])
            known = GaugeMetricFamily("wxtoken_component_authorizers",
                                      "Authorizers whose tokens the daemon keeps",
                                      labels=["component"])
            reauth = GaugeMetricFamily("wxtoken_authorizer_needs_reauthorization",
                                       "1 for an authorizer whose refresh tokens WeChat refuses "
                                       "(it must authorize the platform again)",
                                       labels=["component", "appid"])
            for name, age, authorizers, needing in platforms:
                if age is not None:
                    ticket.add_metric([name], age)
                known.add_metric([name], authorizers)
                for appid in needing:
                    reauth.add_metric([name, appid], 1)
            yield from (ticket, known, reauth)
        figures = self.quota()
        if figures:
            remaining = GaugeMetricFamily("wxtoken_api_quota_remaining",
                                          "WeChat's remaining daily quota of the API path "
                                          "(openapi/quota/get, polled for quota_watch)",
                                          labels=["app", "path"])
            limit = GaugeMetricFamily("wxtoken_api_quota_limit",
                                      "WeChat's daily limit of the API path", labels=["app",
                                                                                      "path"])
            for app_name, path, daily_limit, _used, remain in figures:
                remaining.add_metric([app_name, path], remain)
                limit.add_metric([app_name, path], daily_limit)
            yield from (remaining, limit)
        if self.fleet is not None:
            state = self.fleet()
            redis_up = GaugeMetricFamily("wxtoken_redis_up", "1 while the fleet's Redis answers")
            redis_up.add_metric([], 1 if state["redis_up"] else 0)
            skew = GaugeMetricFamily("wxtoken_clock_skew_seconds",
                                     "Redis TIME minus this host's clock")
            skew.add_metric([], state["clock_skew"])
            yield from (redis_up, skew, leader)
