"""Passive refresh through the daemon's control socket, and tickets: real daemon processes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wxtoken import ControlError, read_token, report_invalid
from wxtoken.clock import wechat_day
from wxtoken.emulator import Emulator
from wxtoken.reader import drop_cache

from helpers import (
    APPID,
    APPID2,
    CORPID,
    CORPSECRET,
    SECRET,
    SECRET2,
    DaemonProcess,
    curl,
    run_cli,
    socket_of,
)

MAIN = {"main": {"appid": APPID, "secret": SECRET}}


@pytest.fixture
def running(emulator: Emulator, make_config: Callable[..., Path],
            daemons: Callable[..., DaemonProcess]) -> tuple[Path, DaemonProcess, str]:
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("control.listening")
    d.wait_for("daemon.ready")
    drop_cache()
    return config, d, str(config.parent / "state")


def test_reported_stale_token_is_replaced_within_a_second(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """WeChat refuses the token: report_invalid returns a new, working one in under 1 s."""
    config, d, state = running
    old = read_token("main", state)
    emulator.invalidate(old)
    assert emulator.token_status(old) == 42001
    started = time.monotonic()
    new = report_invalid("main", old, state, socket_of(config))
    assert time.monotonic() - started < 1.0
    assert new != old and emulator.token_status(new) == 0
    assert read_token("main", state) == new  # the cache was dropped
    assert emulator.calls() == 2
    forced = d.wait_for("token.refreshed", count=2)
    assert forced["forced"] is True


def test_cli_refresh_with_invalid_prints_the_new_token(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """`wxtoken refresh APP --invalid TOKEN` prints the new token; 0 upstream calls if stale."""
    config, _, state = running
    old = read_token("main", state)
    result = run_cli("refresh", "main", "--invalid", old, "--config", str(config))
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip()
    assert new != old and emulator.token_status(new) == 0
    again = run_cli("refresh", "main", "--invalid", old, "--config", str(config))
    assert again.returncode == 0 and again.stdout.strip() == new
    assert emulator.calls() == 2


def test_twenty_concurrent_reports_make_exactly_one_upstream_call(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """20 threads report the same stale token at once: one upstream call, one new token."""
    config, _, state = running
    old = str(read_token("main", state))
    results: list[str] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(20)

    def report() -> None:
        barrier.wait()
        try:
            results.append(str(report_invalid("main", old, state, socket_of(config))))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and results[0] != old
    assert emulator.calls() == 2  # the start, and one passive refresh


def test_report_of_an_already_replaced_token_makes_no_call(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """A token that is no longer the file's: the current one comes back, no upstream call."""
    config, _, state = running
    current = read_token("main", state)
    answer = report_invalid("main", "an-old-token-long-gone-0123456789", state,
                            socket_of(config))
    assert answer == current and emulator.calls() == 1


def test_forced_refreshes_are_spaced_30_s_apart(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """Two refreshes in a row: the second is refused (429, rate_limited), no upstream call."""
    config, _, state = running
    first = run_cli("refresh", "main", "--config", str(config))
    assert first.returncode == 0
    second = run_cli("refresh", "main", "--config", str(config))
    assert second.returncode == 1 and "rate-limited" in second.stderr
    assert emulator.calls() == 2
    with pytest.raises(ControlError) as err:
        report_invalid("main", first.stdout.strip(), state, socket_of(config))
    assert err.value.status == 429 and err.value.error_class == "rate_limited"
    assert err.value.retry_after is not None and 0 < err.value.retry_after <= 30


def test_stable_token_passive_refresh_uses_force_and_its_daily_limit(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """stable_token: force_refresh=true only here; 20 forced a day (persisted) is the limit."""
    config = make_config({"mini": {"appid": APPID2, "secret": SECRET2, "api": "stable_token"}})
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    old = read_token("mini", str(state))
    assert emulator.state.stable[APPID2].forces_today == 0
    new = report_invalid("mini", old, str(state), socket_of(config))
    assert new != old and emulator.state.stable[APPID2].forces_today == 1
    assert d.stop() == 0
    status = json.loads((state / "mini.status.json").read_text())
    status.update(forced_today=20, last_forced_at=0, calls_day=wechat_day(time.time()))
    (state / "mini.status.json").write_text(json.dumps(status))
    d = daemons(config)
    d.wait_for("daemon.ready")
    with pytest.raises(ControlError) as err:
        report_invalid("mini", new, str(state), socket_of(config))
    assert err.value.error_class == "rate_limited" and (err.value.retry_after or 0) > 30
    assert emulator.state.stable[APPID2].forces_today == 1
    d.stop()


def test_daily_budget_and_upstream_errors_are_answered_with_their_class(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """An upstream error comes back as 502 with errcode and class; never a hang."""
    config, _, state = running
    emulator.add_fault("ip")
    started = time.monotonic()
    with pytest.raises(ControlError) as err:
        report_invalid("main", read_token("main", state), state, socket_of(config))
    assert time.monotonic() - started < 5
    assert err.value.status == 502 and err.value.error_class == "permanent"
    assert err.value.errcode == 40164 and "whitelist" in str(err.value)
    assert read_token("main", state)  # the current token is kept


def test_operator_refresh_overrides_the_quota_wait(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After 45009 the daemon waits for the daily reset; `wxtoken refresh` tries at once."""
    emulator.add_fault("quota", count=1)
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("refresh.failed")
    assert emulator.calls() == 1
    result = run_cli("refresh", "main", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert emulator.token_status(result.stdout.strip()) == 0
    assert emulator.calls() == 2
    d.stop()


def test_control_endpoint_over_curl_and_its_permissions(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """curl --unix-socket works; the socket is 0660; users outside its group are refused."""
    config, _, state = running
    sock = socket_of(config)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    apps = json.loads(curl(sock, "http://localhost/v1/apps").stdout)["apps"]
    assert apps[0]["app"] == "main" and apps[0]["healthy"] is True
    one = json.loads(curl(sock, "http://localhost/v1/apps/main").stdout)
    assert one["access_token"] == read_token("main", state) and 0 < one["expires_in"] <= 7200
    missing = curl(sock, "-w", "%{http_code}", "http://localhost/v1/apps/nope")
    assert missing.stdout.endswith("404")
    bad = curl(sock, "-w", "%{http_code}", "-X", "POST", "-d", "[1", "-H",
               "Content-Type: application/json", "http://localhost/v1/apps/main/refresh")
    assert bad.stdout.endswith("400")
    if os.geteuid() != 0:
        pytest.skip("the permission check needs root to switch users")
    group = os.stat(sock).st_gid
    refused = curl(sock, "http://localhost/v1/apps", user=65534)
    assert refused.returncode == 7  # couldn't connect
    probe = subprocess.run(  # the kernel's reason, from the system Python as that user
        ["/usr/bin/python3", "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
         "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('EACCES')", sock],
        capture_output=True, text=True, timeout=30, user=65534, group=65534)
    assert probe.stdout.strip() == "EACCES", probe.stderr
    member = curl(sock, "http://localhost/v1/apps", user=65534, groups=[group])
    assert member.returncode == 0 and json.loads(member.stdout)["apps"]


def test_tickets_are_fetched_stored_refreshed_and_printed(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """jsapi and wx_card tickets: in the file, valid, renewed with the token, `token --ticket`."""
    emulator.state.settings.token_ttl = 8
    config = make_config({"main": {"appid": APPID, "secret": SECRET,
                                   "tickets": ["jsapi", "wx_card"]}},
                         refresh_interval=60, renew_before=3)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    first = json.loads((state / "main.json").read_text())
    assert {"jsapi_ticket", "jsapi_ticket_expires_at", "wx_card_ticket",
            "wx_card_ticket_expires_at"} <= set(first)
    for kind in ("jsapi", "wx_card"):
        assert emulator.ticket_status(first[f"{kind}_ticket"]) == 0
        printed = run_cli("token", "main", "--ticket", kind, "--config", str(config))
        assert printed.returncode == 0 and printed.stdout.strip() == first[f"{kind}_ticket"]
    d.wait_for("token.refreshed", count=2, timeout=15)
    second = json.loads((state / "main.json").read_text())
    assert second["access_token"] != first["access_token"]
    assert second["jsapi_ticket"] != first["jsapi_ticket"]
    assert emulator.ticket_status(second["jsapi_ticket"]) == 0
    assert second["jsapi_ticket_expires_at"] > first["jsapi_ticket_expires_at"]
    d.stop()


def test_wecom_agent_token_is_kept_in_its_own_file(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """api = "wecom" with corpid + agentid: the agent's token in <app>.json, accepted by WeCom."""
    config = make_config({"agent1": {"api": "wecom", "corpid": CORPID, "agentid": 1000002,
                                     "secret": CORPSECRET}})
    d = daemons(config)
    d.wait_for("daemon.ready")
    data: dict[str, Any] = json.loads((config.parent / "state" / "agent1.json").read_text())
    assert data["app"] == "agent1" and data["appid"] == CORPID
    assert emulator.token_status(data["access_token"]) == 0
    assert emulator.calls(CORPID, "wecom") == 1
    d.stop()
