"""Prometheus textfile metrics from a real daemon, parsed with prometheus_client's parser."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wxtoken import __version__
from wxtoken.emulator import Emulator

from helpers import APPID, APPID2, SECRET, SECRET2, DaemonProcess, samples, wait_until


def test_metrics_file_parses_and_tracks_refreshes(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The .prom file parses, names the running version (as the start line does), follows each
    refresh, and says wxtoken_up 0 after a stop."""
    prom = tmp_path / "wxtoken.prom"
    config = make_config({"main": {"appid": APPID, "secret": SECRET},
                          "mini": {"appid": APPID2, "secret": SECRET2, "api": "stable_token"}},
                         refresh_interval=1, metrics_file=str(prom))
    d = daemons(config)
    assert d.wait_for("daemon.starting")["version"] == __version__
    d.wait_for("daemon.ready")
    state = config.parent / "state"
    expiry = ("wxtoken_token_expiry_timestamp_seconds", (("app", "main"),))
    seen: dict[str, Any] = {}

    def agree() -> bool:
        # main is refreshed every second and the metrics follow a moment later: take a pair of
        # reads where the metrics file describes the token file's current token
        if not prom.exists():
            return False
        seen["first"], seen["main"] = samples(prom), json.loads(
            (state / "main.json").read_text())
        return ("wxtoken_refresh_total", (("app", "main"), ("result", "ok"))) in \
            seen["first"] and seen["first"].get(expiry) == seen["main"]["expires_at"]

    wait_until(agree)
    first, main = seen["first"], seen["main"]
    assert first[("wxtoken_up", ())] == 1
    assert first[("wxtoken_build_info", (("version", __version__),))] == 1
    assert [key for key in first if key[0] == "wxtoken_build_info"] == [
        ("wxtoken_build_info", (("version", __version__),))]
    assert first[("wxtoken_token_expiry_timestamp_seconds", (("app", "main"),))] == \
        main["expires_at"]
    assert first[("wxtoken_upstream_calls_today", (("app", "mini"),))] == 1
    assert first[("wxtoken_last_refresh_success_timestamp_seconds", (("app", "main"),))] >= \
        main["refreshed_at"]
    d.wait_for("token.refreshed", count=4)  # main refreshes every second

    def tracked() -> bool:
        now = samples(prom)
        return now[("wxtoken_refresh_total", (("app", "main"), ("result", "ok")))] >= 3 and \
            now[("wxtoken_upstream_calls_today", (("app", "main"),))] >= 3

    wait_until(tracked)
    later = samples(prom)
    main = json.loads((state / "main.json").read_text())
    assert later[("wxtoken_token_expiry_timestamp_seconds", (("app", "main"),))] >= \
        first[("wxtoken_token_expiry_timestamp_seconds", (("app", "main"),))]
    assert d.stop() == 0
    final = samples(prom)
    assert final[("wxtoken_up", ())] == 0
    assert final[("wxtoken_build_info", (("version", __version__),))] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("wxtoken.prom.")] == []


def test_failures_are_counted_by_result(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A failing refresh shows up as wxtoken_refresh_total{result="error"}, without expiry."""
    emulator.add_fault("busy")
    prom = tmp_path / "wxtoken.prom"
    config = make_config(metrics_file=str(prom))
    d = daemons(config)
    d.wait_for("refresh.failed", count=2, timeout=15)
    key = ("wxtoken_refresh_total", (("app", "main"), ("result", "error")))
    wait_until(lambda: prom.exists() and samples(prom).get(key, 0) >= 2)
    assert not any(name == "wxtoken_token_expiry_timestamp_seconds"
                   for name, _ in samples(prom))
    d.stop()
