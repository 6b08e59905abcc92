"""Prometheus textfile metrics (node exporter's textfile collector), written atomically.

The values are read from the apps' files when the file is written, so they agree with
`wxtoken status` whichever daemon made the refresh. Writes are coalesced: a burst of refreshes
(1,000 apps starting) costs a few writes, not one per refresh.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wxtoken.config import Config
from wxtoken.health import app_health
from wxtoken.logs import get_logger

COALESCE = 0.25  # seconds to gather a burst of refreshes into one write
RESULTS = {"refreshed": "ok", "unchanged": "unchanged", "failed": "error", "budget": "budget"}


class Metrics:
    """Collects per-app figures and rewrites ``metrics_file`` after refreshes."""

    def __init__(self, config: Config, path: str) -> None:
        self.config = config
        self.path = path
        self.log = get_logger()
        self.up = 1
        self.results: Counter[tuple[str, str]] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    def start(self) -> None:
        self._dirty.set()
        self._thread.start()

    def observe(self, app: str, state: str) -> None:
        """Count one refresh attempt's result and schedule a write."""
        result = RESULTS.get(state)
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
            time.sleep(COALESCE)
            self._dirty.clear()
            self.write()

    def write(self) -> None:
        try:
            write_to_textfile(self.path, self.registry)
        except OSError as exc:
            self.log.warning("metrics.write_failed", path=self.path,
                             error=exc.strerror or str(exc))

    def collect(self) -> Iterator[Any]:
        now = time.time()
        up = GaugeMetricFamily("wxtoken_up", "1 while the wxtoken daemon runs")
        up.add_metric([], self.up)
        expiry = GaugeMetricFamily("wxtoken_token_expiry_timestamp_seconds",
                                   "When the app's token in its file expires", labels=["app"])
        success = GaugeMetricFamily("wxtoken_last_refresh_success_timestamp_seconds",
                                    "Last successful upstream fetch for the app", labels=["app"])
        calls = GaugeMetricFamily("wxtoken_upstream_calls_today",
                                  "Upstream calls this WeChat day (00:00 Asia/Shanghai)",
                                  labels=["app"])
        total = CounterMetricFamily("wxtoken_refresh", "Refresh attempts by this daemon process",
                                    labels=["app", "result"])
        for app in self.config.apps:
            health = app_health(self.config, app, now)
            if "expires_at" in health:
                expiry.add_metric([app.name], health["expires_at"])
            if health.get("last_success_at"):
                success.add_metric([app.name], health["last_success_at"])
            calls.add_metric([app.name], health["calls_today"])
        with self._lock:
            for (app_name, result), count in sorted(self.results.items()):
                total.add_metric([app_name, result], count)
        yield from (up, expiry, success, calls, total)
