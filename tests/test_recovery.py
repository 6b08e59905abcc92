"""Recovery after an outage, as an operator runs it: the budget and the waits end when what
caused them is gone (a raised daily_budget, the operator's refresh), and nothing says or spends
more than it should (status, clear-quota)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

from wxtoken.emulator import Emulator

from helpers import APPID, SECRET, DaemonProcess, read_json, run_cli, wait_until

MAIN = {"main": {"appid": APPID, "secret": SECRET}}


def _spend_the_budget(emulator: Emulator, make_config: Callable[..., Path],
                      daemons: Callable[..., DaemonProcess]) -> tuple[Path, DaemonProcess]:
    """A daemon whose daily_budget of 3 is spent by WeChat answering -1 (calls that count)."""
    emulator.add_fault("busy")
    config = make_config(MAIN, daily_budget=3, renew_before=4)
    d = daemons(config)
    d.wait_for("budget.exhausted", timeout=30)
    emulator.clear_faults()
    return config, d


def _raise_budget(config: Path, budget: int) -> None:
    text = config.read_text().replace("daily_budget = 3", f"daily_budget = {budget}")
    assert f"daily_budget = {budget}" in text
    config.write_text(text)


def test_a_reload_that_raises_daily_budget_ends_the_wait_at_once(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After the outage: daily_budget raised, `wxtoken reload`: the app refreshes at once and
    `wxtoken status` no longer says the budget is reached."""
    config, d = _spend_the_budget(emulator, make_config, daemons)
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 1 and "daily budget of 3 calls reached" in status.stdout
    assert "is the daemon running" not in status.stdout  # it is: the budget is the cause
    _raise_budget(config, 100)
    assert run_cli("reload", "--config", str(config)).returncode == 0
    token = config.parent / "state" / "main.json"
    wait_until(token.exists, timeout=10)
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 0, status.stdout
    assert "budget" not in status.stdout.split("\n", 1)[1]
    assert d.stop() == 0
    assert emulator.calls() == 4


def test_a_restart_with_a_raised_daily_budget_refreshes_at_once(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """The wait the status file holds is not trusted: a restart with a higher daily_budget
    refreshes in its first pass."""
    config, d = _spend_the_budget(emulator, make_config, daemons)
    assert d.stop() == 0
    _raise_budget(config, 100)
    again = daemons(config)
    again.wait_for("daemon.ready", timeout=15)
    assert (config.parent / "state" / "main.json").exists()
    assert again.stop() == 0
    assert emulator.calls() == 4


def test_the_operators_refresh_ends_a_budget_wait_the_budget_now_allows(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken refresh APP` as root: once the budget allows a call (raised without a reload
    taking effect yet, or the operator's reserve), one attempt now; when the budget really is
    spent it says so and names daily_budget."""
    config, d = _spend_the_budget(emulator, make_config, daemons)
    spent = run_cli("refresh", "main", "--config", str(config))
    assert spent.returncode == 1
    assert "daily_budget is spent: 3 of 3 calls counted today" in spent.stderr, spent.stderr
    assert "share of daily_budget" not in spent.stderr
    assert d.stop() == 0
    _raise_budget(config, 100)
    # the status file still holds the budget wait: a daemon started now is asked at once
    again = daemons(config)
    again.wait_for("daemon.ready", timeout=15)
    done = run_cli("refresh", "main", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == read_json(config.parent / "state" / "main.json")[
        "access_token"]
    assert again.stop() == 0


def test_the_operators_refresh_ends_a_hard_error_wait_and_a_failure_backs_off(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A hard error (40164, IP not whitelisted) waits; the operator fixed the whitelist:
    `wxtoken refresh` makes one attempt now. A failed attempt prints WeChat's errmsg (it names
    the IP) and is followed by the usual backoff, not by another call."""
    emulator.add_fault("ip")
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("refresh.failed", timeout=15)
    failed = run_cli("refresh", "main", "--config", str(config))
    assert failed.returncode == 1 and "40164" in failed.stderr
    assert "not in whitelist" in failed.stderr, failed.stderr  # WeChat's errmsg, with the IP
    emulator.clear_faults()
    again = run_cli("refresh", "main", "--config", str(config))  # the 30 s spacing holds
    assert again.returncode == 1 and "rate-limited: one forced refresh per 30 s" in again.stderr
    assert d.stop() == 0
    assert emulator.calls() == 2


def test_clear_quota_spends_no_reset_on_an_app_waiting_for_its_own_budget(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """clear-quota resets WeChat's quota; an app that waits for its own daily_budget gains
    nothing from it: it says so, and no reset is spent."""
    config, d = _spend_the_budget(emulator, make_config, daemons)
    out = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert out.returncode == 1
    assert "daily_budget" in out.stderr and "no reset was spent" in out.stderr, out.stderr
    assert d.stop() == 0
    assert emulator.state.resets == {}
    resets = config.parent / "state" / ".quota_resets.json"
    assert not resets.exists() or json.loads(resets.read_text()).get(APPID, {}) in ({}, None)


def test_an_egress_outage_spends_no_budget(
        make_config: Callable[..., Path], daemons: Callable[..., DaemonProcess]) -> None:
    """WeChat unreachable (connection refused) for many attempts: the day's count stays 0,
    `status` names the host and port and the cause."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = make_config(MAIN, daily_budget=3, renew_before=4,
                         api_base=f"http://127.0.0.1:{port}")
    d = daemons(config)
    d.wait_for("refresh.failed", timeout=30, count=6)
    assert d.stop() == 0
    status = read_json(config.parent / "state" / "main.status.json")
    assert status["calls_today"] == 0 and status["failures"] >= 6
    assert f"connection refused by 127.0.0.1:{port}" in status["error"]
    assert not any(e["event"] == "budget.exhausted" for e in d.events())
