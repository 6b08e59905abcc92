"""The command line as a user runs it: token, status, check-config, demo."""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wxtoken.emulator import Emulator

from helpers import (
    APPID,
    APPID2,
    NOBODY,
    SECRET,
    SECRET2,
    TEST_SECRETS,
    DaemonProcess,
    run_cli,
)


def test_token_prints_the_valid_token_and_status_is_healthy(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After the daemon ran: `token` prints the file's token, `status` exits 0 with details."""
    config = make_config({"main": {"appid": APPID, "secret": SECRET},
                          "mini": {"appid": APPID2, "secret": SECRET2, "api": "stable_token"}})
    d = daemons(config)
    d.wait_for("daemon.ready")
    result = run_cli("token", "main", "--config", str(config))
    assert result.returncode == 0, result.stderr
    tok = result.stdout.strip()
    assert emulator.token_status(tok) == 0
    by_dir = run_cli("token", "main", "--state-dir", str(config.parent / "state"))
    assert by_dir.stdout.strip() == tok
    status = run_cli("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stdout
    data = json.loads(status.stdout)
    assert data["healthy"] is True
    apps = {a["app"]: a for a in data["apps"]}
    assert set(apps) == {"main", "mini"}
    assert apps["main"]["calls_today"] == 1 and apps["main"]["last_result"] == "ok"
    assert 7100 < apps["main"]["expires_in"] <= 7200 and apps["main"]["token_age"] < 60
    table = run_cli("status", "--config", str(config))
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == [
        "APP", "API", "ROLE", "AGE", "EXPIRES", "IN", "LAST", "CALLS", "TODAY", "HEALTH"]
    assert table.stdout.splitlines()[1].split()[2] == "standalone"
    assert apps["main"]["role"] == "standalone"
    assert "1/1000" in table.stdout
    assert tok not in status.stdout + table.stdout
    d.stop()


def test_status_fails_with_the_errcode_when_the_secret_is_wrong(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A wrong secret: the daemon stays up, status exits 1 and shows errcode 40001."""
    config = make_config({"main": {"appid": APPID, "secret": "wrong-s3cr3t-abcdef"}})
    d = daemons(config)
    d.wait_for("refresh.failed")
    status = run_cli("status", "--json", "--config", str(config))
    assert status.returncode == 1
    app = json.loads(status.stdout)["apps"][0]
    assert app["healthy"] is False and app["last_error"]["errcode"] == 40001
    assert any("no token file" in p for p in app["problems"])
    assert d.proc.poll() is None
    table = run_cli("status", "--config", str(config))
    assert table.returncode == 1 and "errcode 40001" in table.stdout
    assert "wrong-s3cr3t-abcdef" not in status.stdout + table.stdout
    d.stop()
    assert "wrong-s3cr3t-abcdef" not in d.log_path.read_text()


def test_token_errors_are_one_line_with_exit_1(make_config: Callable[..., Path]) -> None:
    """No file yet, or an app that is not configured: one line on stderr, exit 1."""
    config = make_config()
    missing = run_cli("token", "main", "--config", str(config))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "no token file" in missing.stderr
    unknown = run_cli("token", "nope", "--config", str(config))
    assert unknown.returncode == 1 and "no app named 'nope'" in unknown.stderr
    expired = config.parent / "state" / "main.json"
    now = int(time.time())
    expired.write_text(json.dumps({"app": "main", "appid": APPID, "access_token": "x" * 40,
                                   "expires_at": now - 5, "refreshed_at": now - 7205}))
    result = run_cli("token", "main", "--config", str(config))
    assert result.returncode == 1 and "expired" in result.stderr
    assert run_cli("status", "--config", str(config)).returncode == 1


def test_reader_commands_need_no_secret(tmp_path: Path) -> None:
    """token and status work for a user who cannot resolve the secrets (e.g. a credential)."""
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[apps.main]\nappid = "{APPID}"\n'
                      'secret_credential = "main"\n')
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 1 and "no token file yet" in result.stdout


def test_demo_runs_emulator_and_daemon_and_every_token_is_accepted() -> None:
    """`wxtoken demo` refreshes both demo apps and its reader's tokens all work."""
    result = run_cli("demo", "--duration", "13", timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stderr + result.stdout
    assert "token.refreshed" in out and "app=main" in out and "app=mini" in out
    assert "wechat_accepts=yes" in out and "unresolved=0" in out
    assert "demo.wechat_drops_token" in out and "action=report_invalid" in out
    assert "refresh.forced" in out and "passive_refreshes=1" in out
    for secret in ("demo-secret-main-0001", "demo-secret-mini-0002", *TEST_SECRETS):
        assert secret not in out


def test_status_reports_a_stale_token_when_refreshes_stop(make_config: Callable[..., Path]) -> None:
    """A still-valid token whose refresh is long overdue (daemon not running) is unhealthy."""
    config = make_config(refresh_interval=60)
    now = int(time.time())
    (config.parent / "state" / "main.json").write_text(json.dumps({
        "app": "main", "appid": APPID, "access_token": "t" * 40, "expires_at": now + 3000,
        "refreshed_at": now - 4200}))
    status = run_cli("status", "--json", "--config", str(config))
    app = json.loads(status.stdout)["apps"][0]
    assert status.returncode == 1 and app["healthy"] is False
    assert any(p.startswith("stale: refresh overdue by") and p.endswith(
        "(is the daemon running?)") for p in app["problems"])


def test_secret_is_not_in_the_daemon_command_line_or_title(
        make_config: Callable[..., Path], daemons: Callable[..., DaemonProcess]) -> None:
    """The running daemon's argv (ps, /proc/PID/cmdline) carries no secret."""
    config = make_config()
    d = daemons(config)
    d.wait_for("daemon.ready")
    cmdline = Path(f"/proc/{d.proc.pid}/cmdline").read_bytes().decode()
    comm = Path(f"/proc/{d.proc.pid}/comm").read_text()
    assert SECRET not in cmdline + comm and "--config" in cmdline
    d.stop()


def test_refresh_of_a_name_that_is_not_ascii_is_one_line(sock_dir: Path) -> None:
    """`wxtoken refresh 'é' --socket S` is a one-line error, not a traceback."""
    result = run_cli("refresh", "é", "--socket", str(sock_dir / "none.sock"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "not a valid app name" in result.stderr


def test_run_refuses_a_state_dir_owned_by_another_user(
        make_config: Callable[..., Path], daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken run` as a user who does not own the state dir (root by hand, say) would leave
    files the service cannot read: it refuses with one line unless --allow-other-owner."""
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root (CI runs as root)")
    config = make_config()
    state = config.parent / "state"
    os.chown(state, NOBODY, NOBODY)
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 78
    assert result.stderr.strip() == (
        f"wxtoken: {config}: state_dir: {state} belongs to user {pwd.getpwuid(NOBODY).pw_name},"
        f" not {pwd.getpwuid(0).pw_name}: run wxtoken as that user (systemctl start wxtoken), "
        "or pass --allow-other-owner")
    assert not (state / "main.json").exists()
    d = daemons(config, args=["--allow-other-owner"])
    d.wait_for("daemon.ready")
    assert d.stop() == 0


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path, command: str) -> None:
    """state_dir naming a file: exit 78 with one line naming file, key and problem, in
    check-config as in run; the file is left as it was."""
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{state}"\n[apps.main]\nappid = "{APPID}"\n'
                      f'secret = "{SECRET}"\n')
    config.chmod(0o600)
    result = run_cli(command, "--config", str(config))
    assert result.returncode == 78
    assert result.stderr.strip() == f"wxtoken: {config}: state_dir: {state} is not a directory"
    assert state.read_text() == "not a directory\n"
