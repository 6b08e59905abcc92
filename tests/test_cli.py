"""The command line as a user runs it: token, status, check-config (the shipped example config
included). `wxtoken demo` has tests/test_demo.py."""

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
    DaemonProcess,
    read_json,
    run_cli,
)

REPO = Path(__file__).resolve().parent.parent


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


def example_copy(tmp_path: Path, **top: object) -> Path:
    """config.example.toml as shipped, with ``top`` settings put in front of it (the example
    leaves every top-level setting commented out, so none is set twice)."""
    path = tmp_path / "config.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in top.items())
                    + (REPO / "config.example.toml").read_text())
    return path


def credentials(tmp_path: Path, secret: str | None) -> dict[str, str]:
    """A $CREDENTIALS_DIRECTORY as systemd fills it from LoadCredential=main:… (0600, ours)."""
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    if secret is not None:
        (directory / "main").write_text(secret + "\n")
        (directory / "main").chmod(0o600)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def test_the_example_config_is_one_official_account_and_lacks_only_its_secret(
        tmp_path: Path) -> None:
    """config.example.toml as shipped: one uncommented app table, main (stable_token, its
    secret from the systemd credential "main"); check-config refuses it for that missing
    secret alone, naming the key."""
    import tomllib
    shipped = tomllib.loads((REPO / "config.example.toml").read_text())
    assert shipped == {"apps": {"main": {"appid": "wx0123456789abcdef", "api": "stable_token",
                                         "secret_credential": "main"}}}
    result = run_cli("check-config", "--config", str(REPO / "config.example.toml"),
                     env=credentials(tmp_path, None))
    assert result.returncode == 78, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines()
              if not line.startswith("wxtoken: warning: ")]
    assert len(errors) == 1 and "apps.main.secret_credential: cannot read" in errors[0], errors


def test_the_example_config_passes_once_its_secret_is_there_and_fetches_a_token(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """With its secret handed over as the example recommends (a credential, 0600) and the
    paths of a test, the example passes check-config and a daemon run on it keeps main's
    token, fetched with stable_token."""
    config = example_copy(tmp_path, state_dir=str(tmp_path / "state"), api_base=emulator.url,
                          control_socket=str(sock_dir / "control.sock"), log_format="json")
    text = config.read_text().replace('appid = "wx0123456789abcdef"', f'appid = "{APPID}"')
    config.write_text(text)
    (tmp_path / "state").mkdir()
    env = credentials(tmp_path, SECRET)
    checked = run_cli("check-config", "--config", str(config), env=env)
    assert checked.returncode == 0, checked.stderr
    assert '[apps.main]\napi = "stable_token"' in checked.stdout
    assert 'secret = "***"  # from secret_credential=main' in checked.stdout
    d = daemons(config, env)
    d.wait_for("daemon.ready", timeout=15)
    token = run_cli("token", "main", "--config", str(config))
    assert token.returncode == 0 and emulator.token_status(token.stdout.strip()) == 0
    assert read_json(tmp_path / "state" / "main.json")["appid"] == APPID
    assert d.stop() == 0
    assert emulator.calls(APPID, "stable_token") == 1
