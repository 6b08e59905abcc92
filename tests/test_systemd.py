"""The real unit under a real systemd: install.sh --now in a booted throwaway container.

One container is booted for the module (tests run in order; `--dist loadfile` keeps them on one
xdist worker); the emulator
runs on the host's 127.0.0.1, which the container shares.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

import wxtoken
from wxtoken.emulator import Emulator

from helpers import APPID, APPID2, SECRET, assert_no_secret
from nspawn import Container, cannot_boot_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "wxtoken.service"

CONFIG = """\
api_base = "{url}"
ca_bundle = "/etc/wxtoken/ca.pem"
[apps.main]
appid = "{appid}"
secret_credential = "main"
"""
BAD_APP = """
[apps.bad]
appid = "{appid}"
secret_credential = "bad"
"""
DROPIN = """\
[Service]
LoadCredential=main:/etc/wxtoken/main.secret
LoadCredential=bad:/etc/wxtoken/bad.secret
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def emu(ca: trustme.CA) -> Iterator[Emulator]:
    """The emulator over HTTPS with a private CA, reached by name: the hardened service must do
    DNS (well, NSS) and TLS with its own ca_bundle, not just plain HTTP to an IP."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    with Emulator({APPID: SECRET, APPID2: "another-s3cr3t-0000"}, ssl_context=context) as e:
        yield e


def by_name(emu: Emulator) -> str:
    return emu.url.replace("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    reason = cannot_boot_reason()
    if reason:
        print(f"SKIP systemd container tests: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("nspawn")
    container = Container(tmp / "base", REPO, tmp / "console.log")
    try:
        yield container
        journal = container.run("journalctl", "--no-pager", "-o", "cat").stdout
        assert_no_secret(journal, "the container's journal")
        assert "Traceback" not in journal
    finally:
        container.stop()


def show(box: Container, prop: str) -> str:
    return box.run("systemctl", "show", "wxtoken", "-p", prop, "--value").stdout.strip()


def wait_for(box: Container, check: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if box.sh(check, check=False).returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for: {check}\n"
                         + box.sh("journalctl -u wxtoken --no-pager | tail -30").stdout)


def test_unit_scores_ok_on_security_and_verifies() -> None:
    """systemd-analyze security --offline rates the unit at most 1.2 "OK"."""
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                         capture_output=True, text=True).stdout
    match = re.search(r"Overall exposure level for wxtoken.service: ([\d.]+) (\w+)", out)
    assert match, out[-500:]
    assert float(match.group(1)) <= 1.2 and match.group(2) == "OK"


def test_install_fails_loudly_when_pip_fails(box: Container) -> None:
    """install.sh stops with a non-zero status and pip's reason when the install fails,
    instead of reporting success."""
    box.sh("rm -rf /tmp/broken && cp -r /src /tmp/broken && "
           "printf '[project]\\nname = \"wxtoken\"\\nversion = \"not a version\"\\n' "
           "> /tmp/broken/pyproject.toml")
    result = box.run("/tmp/broken/deploy/systemd/install.sh", check=False, timeout=600)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "pip install failed" in result.stderr
    assert "installed; start with" not in result.stdout
    assert box.run("test", "-e", "/etc/systemd/system/wxtoken.service",
                   check=False).returncode != 0


def test_install_now_starts_a_notify_service_that_writes_the_token(
        box: Container, emu: Emulator, ca: trustme.CA) -> None:
    """install.sh --now: active unit (TLS to the emulator by name), STATUS=, 0640 file, journal."""
    box.write("/etc/wxtoken/ca.pem", ca.cert_pem.bytes().decode(), "0644")
    box.write("/etc/wxtoken/config.toml", CONFIG.format(url=by_name(emu), appid=APPID), "0640")
    box.write("/etc/wxtoken/main.secret", SECRET + "\n", "0600")
    box.write("/etc/wxtoken/bad.secret", "wrong-s3cr3t-for-bad\n", "0600")
    box.write("/etc/systemd/system/wxtoken.service.d/credentials.conf", DROPIN)
    result = box.run("/src/deploy/systemd/install.sh", "--now", timeout=600, check=False)
    assert result.returncode == 0, result.stderr + box.sh(
        "journalctl -u wxtoken --no-pager | tail -20").stdout
    assert show(box, "ActiveState") == "active"
    assert show(box, "Type") == "notify"
    assert re.fullmatch(r"1/1 apps fresh; next: main in \d+m", show(box, "StatusText"))
    stat = box.run("stat", "-c", "%U %G %a", "/var/lib/wxtoken/main.json").stdout.split()
    assert stat == ["wxtoken", "wxtoken", "640"]
    assert box.run("stat", "-c", "%U %G %a", "/var/lib/wxtoken").stdout.split() == [
        "wxtoken", "wxtoken", "750"]
    data = json.loads(box.run("cat", "/var/lib/wxtoken/main.json").stdout)
    assert emu.token_status(data["access_token"]) == 0
    assert emu.calls(APPID) == 1
    journal = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
    assert re.search(r"^event=token.refreshed app=main ", journal, re.M), journal
    # native journal entries: fields of their own, so `journalctl -u wxtoken APP=main` selects
    entry = json.loads(box.run("journalctl", "-u", "wxtoken", "APP=main", "EVENT=token.refreshed",
                               "-o", "json", "-n", "1", "--no-pager").stdout)
    assert entry["APPID"] == APPID and entry["PRIORITY"] == "6", entry
    assert entry["SYSLOG_IDENTIFIER"] == "wxtoken", entry
    assert entry["MESSAGE"].startswith("event=token.refreshed app=main "), entry
    started = json.loads(box.run("journalctl", "-u", "wxtoken", "EVENT=daemon.starting", "-o",
                                 "json", "-n", "1", "--no-pager").stdout)
    assert started["VERSION"] == wxtoken.__version__, started
    assert box.run("journalctl", "-u", "wxtoken", "-p", "err", "--no-pager", "-o", "cat",
                   "-q").stdout.strip() == ""
    assert SECRET not in journal
    assert box.run("systemd-analyze", "verify", "wxtoken.service").returncode == 0
    assert box.run("readlink", "/usr/local/bin/wxtoken").stdout.strip() == \
        "/opt/wxtoken/bin/wxtoken"


def test_group_members_read_the_token_and_others_cannot(box: Container) -> None:
    """A user in group wxtoken reads the file (and `wxtoken token`); nobody is refused."""
    box.run("useradd", "--system", "-G", "wxtoken", "reader")
    ok = box.run("runuser", "-u", "reader", "--", "wxtoken", "token", "main", check=False)
    assert ok.returncode == 0 and len(ok.stdout.strip()) > 20, ok.stderr
    assert box.run("runuser", "-u", "reader", "--", "cat", "/var/lib/wxtoken/main.json").stdout
    denied = box.run("runuser", "-u", "nobody", "--", "cat", "/var/lib/wxtoken/main.json",
                     check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    status = box.run("runuser", "-u", "reader", "--", "wxtoken", "status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr


def test_control_socket_serves_the_group_and_refuses_others(box: Container, emu: Emulator) -> None:
    """/run/wxtoken/control.sock: a group member's passive refresh works; nobody is refused."""
    sock = box.run("stat", "-c", "%U %G %a", "/run/wxtoken/control.sock").stdout.split()
    assert sock == ["wxtoken", "wxtoken", "660"]
    calls = emu.calls()
    current = box.run("cat", "/var/lib/wxtoken/main.json").stdout
    token = json.loads(current)["access_token"]
    stale = box.run("runuser", "-u", "reader", "--", "wxtoken", "refresh", "main", "--invalid",
                    "some-replaced-token-0123456789", check=False)
    assert stale.returncode == 0 and stale.stdout.strip() == token, stale.stderr
    assert emu.calls() == calls  # already replaced: no upstream call
    fresh = box.run("runuser", "-u", "reader", "--", "wxtoken", "refresh", "main", "--invalid",
                    token, check=False)
    assert fresh.returncode == 0 and fresh.stdout.strip() != token, fresh.stderr
    assert emu.token_status(fresh.stdout.strip()) == 0 and emu.calls() == calls + 1
    denied = box.run("runuser", "-u", "nobody", "--", "wxtoken", "refresh", "main",
                     "--socket", "/run/wxtoken/control.sock", check=False)
    assert denied.returncode == 1 and "permission denied" in denied.stderr


def test_check_config_as_root_reads_the_units_credentials(box: Container) -> None:
    """The README's own `wxtoken check-config --config /etc/wxtoken/config.toml` passes on the
    installed system: the secret_credential is read from the unit's LoadCredential=."""
    out = box.run("wxtoken", "check-config", "--config", "/etc/wxtoken/config.toml",
                  check=False)
    assert out.returncode == 0, out.stderr
    assert "LoadCredential=main:/etc/wxtoken/main.secret" in out.stdout


def test_install_again_with_a_config_the_new_version_refuses_keeps_the_service(
        box: Container) -> None:
    """install.sh --now with a config the (new) version refuses: the running service is not
    restarted (it would stay down with exit 78); the refusal and what to do are printed, the
    script succeeds, and `wxtoken status` says what runs and what is refused."""
    config = box.run("cat", "/etc/wxtoken/config.toml").stdout
    pid = show(box, "MainPID")
    box.run("sed", "-i", "1i refresh_intervall = 60", "/etc/wxtoken/config.toml")
    try:
        result = box.run("/src/deploy/systemd/install.sh", "--now", timeout=600, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "installed, not restarted: the new version refuses the config: " \
            "/etc/wxtoken/config.toml: refresh_intervall" in result.stdout, result.stdout
        assert "then: systemctl restart wxtoken" in result.stdout
        assert show(box, "ActiveState") == "active" and show(box, "MainPID") == pid
        status = box.run("wxtoken", "status", check=False)
        assert status.returncode == 1
        assert f"(pid {pid}) on the config it last loaded; installed {wxtoken.__version__} " \
            "refuses the config" in status.stdout, status.stdout + status.stderr
    finally:
        box.write("/etc/wxtoken/config.toml", config, "0640")
        box.run("chgrp", "wxtoken", "/etc/wxtoken/config.toml")


def test_install_again_keeps_the_configs_owner_and_mode(box: Container) -> None:
    """install.sh sets the config's owner and mode on the first install only: a wxtoken-owned
    0600 config (which may hold an inline secret) stays as it is."""
    box.run("chown", "wxtoken:wxtoken", "/etc/wxtoken/config.toml")
    box.run("chmod", "0600", "/etc/wxtoken/config.toml")
    try:
        box.run("/src/deploy/systemd/install.sh", timeout=600)
        assert box.run("stat", "-c", "%U %G %a", "/etc/wxtoken/config.toml").stdout.split() \
            == ["wxtoken", "wxtoken", "600"]
    finally:
        box.run("chown", "root:wxtoken", "/etc/wxtoken/config.toml")
        box.run("chmod", "0640", "/etc/wxtoken/config.toml")


def test_restart_reuses_the_token_and_stop_is_clean(box: Container, emu: Emulator) -> None:
    """systemctl restart makes no upstream call; systemctl stop exits cleanly."""
    calls = emu.calls()
    box.run("systemctl", "restart", "wxtoken")
    assert show(box, "ActiveState") == "active"
    assert emu.calls() == calls
    journal = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
    assert "event=token.reused app=main" in journal
    box.run("systemctl", "stop", "wxtoken")
    assert show(box, "ActiveState") == "inactive"
    assert show(box, "Result") == "success" and show(box, "ExecMainStatus") == "0"
    journal = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
    assert journal.count("event=daemon.stopped") == 2  # the restart's stop, and this one


def test_systemctl_reload_applies_a_good_config_and_refuses_a_broken_one(
        box: Container, emu: Emulator) -> None:
    """systemctl reload: a new app (its secret in a file the service can read) starts with no
    call for the unchanged one; a broken config makes the reload fail and the service keeps
    running on the old one."""
    box.run("systemctl", "start", "wxtoken")
    calls = emu.calls(APPID)
    box.write("/etc/wxtoken/mini.secret", "another-s3cr3t-0000\n", "0400")
    box.run("chown", "wxtoken", "/etc/wxtoken/mini.secret")
    good = CONFIG.format(url=by_name(emu), appid=APPID) + (
        f'[apps.mini]\nappid = "{APPID2}"\nsecret_file = "/etc/wxtoken/mini.secret"\n')
    box.write("/etc/wxtoken/config.toml", good, "0640")
    box.run("chgrp", "wxtoken", "/etc/wxtoken/config.toml")
    box.run("systemctl", "reload", "wxtoken")
    wait_for(box, "test -f /var/lib/wxtoken/mini.json")
    assert emu.calls(APPID) == calls and emu.calls(APPID2) == 1
    box.write("/etc/wxtoken/config.toml", good + "refresh_interval = \"soon\"\n", "0640")
    box.run("chgrp", "wxtoken", "/etc/wxtoken/config.toml")
    refused = box.run("systemctl", "reload", "wxtoken", check=False)
    assert refused.returncode != 0
    assert show(box, "ActiveState") == "active"
    errors = box.run("journalctl", "-u", "wxtoken", "-p", "err", "--no-pager", "-o",
                     "cat").stdout
    assert "event=config.reload_refused" in errors and "refresh_interval" in errors
    box.write("/etc/wxtoken/config.toml", CONFIG.format(url=by_name(emu), appid=APPID), "0640")
    box.run("chgrp", "wxtoken", "/etc/wxtoken/config.toml")
    box.run("systemctl", "reload", "wxtoken")  # mini removed: it stops, its file stays
    reloaded = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat",
                       "--grep", "config.reloaded").stdout.splitlines()
    assert "added mini" in reloaded[0] and "removed mini" in reloaded[-1]
    box.run("test", "-f", "/var/lib/wxtoken/mini.json")
    assert emu.calls(APPID) == calls and emu.calls(APPID2) == 1
    box.run("systemctl", "stop", "wxtoken")


def test_wrong_secret_keeps_the_service_up_and_reports_the_errcode(
        box: Container, emu: Emulator) -> None:
    """An app with a wrong secret: service stays active, -p err has errcode, status fails."""
    box.write("/etc/wxtoken/config.toml", CONFIG.format(url=by_name(emu), appid=APPID)
              + BAD_APP.format(appid=APPID2), "0640")
    box.run("systemctl", "start", "wxtoken")
    assert show(box, "ActiveState") == "active"
    errors = box.run("journalctl", "-u", "wxtoken", "-p", "err", "--no-pager", "-o",
                     "cat").stdout
    assert "event=refresh.failed app=bad" in errors and "errcode=40001" in errors
    assert "the secret is wrong" in errors
    assert "main" not in errors.replace("domain", "")
    status = box.run("wxtoken", "status", check=False)
    assert status.returncode == 1 and "bad" in status.stdout
    assert "wrong-s3cr3t-for-bad" not in errors + status.stdout
    time.sleep(2)  # a failing app must not make systemd restart the service meanwhile
    assert show(box, "ActiveState") == "active" and show(box, "NRestarts") == "0"
    assert re.match(r"1/2 apps fresh; failing: bad", show(box, "StatusText"))
    box.run("systemctl", "stop", "wxtoken")


def test_watchdog_is_fed_by_the_scheduler_and_a_hung_daemon_is_restarted(
        box: Container, emu: Emulator) -> None:
    """With WatchdogSec=2 the daemon stays up; frozen with SIGSTOP, systemd restarts it."""
    box.write("/etc/systemd/system/wxtoken.service.d/watchdog.conf",
              "[Service]\nWatchdogSec=2\nRestartSec=1\n")
    emu.add_fault("5xx")  # an upstream outage must not fail the start either
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "wxtoken")
    pid = show(box, "MainPID")
    time.sleep(5)  # two watchdog periods and more: a daemon that misses its pings is killed
    assert show(box, "ActiveState") == "active" and show(box, "MainPID") == pid
    assert show(box, "NRestarts") == "0"
    box.run("kill", "-STOP", pid)
    wait_for(box, f'[ "$(systemctl show wxtoken -p NRestarts --value)" -ge 1 ] && '
                  f'[ "$(systemctl show wxtoken -p MainPID --value)" != {pid} ] && '
                  'systemctl is-active -q wxtoken', timeout=30)
    journal = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal
    emu.clear_faults()
    box.run("systemctl", "stop", "wxtoken")
    box.run("rm", "/etc/systemd/system/wxtoken.service.d/watchdog.conf")
    box.run("systemctl", "daemon-reload")


def test_a_root_run_by_hand_does_not_lock_the_service_out(box: Container, emu: Emulator) -> None:
    """`wxtoken run` by hand as root is refused (one line, exit 78); forced with
    --allow-other-owner it leaves root-owned files, which the service then replaces."""
    box.write("/etc/wxtoken/config.toml", CONFIG.format(url=by_name(emu), appid=APPID), "0640")
    box.sh("mkdir -p /run/creds && cp /etc/wxtoken/main.secret /run/creds/main && "
           "rm -rf /var/lib/wxtoken/main.json /var/lib/wxtoken/.locks")
    env = "CREDENTIALS_DIRECTORY=/run/creds"
    refused = box.sh(f"{env} timeout -s TERM 20 wxtoken run", check=False)
    assert refused.returncode == 78
    assert "/var/lib/wxtoken belongs to user wxtoken, not root" in refused.stderr
    box.sh(f"{env} timeout -s TERM 8 wxtoken run --allow-other-owner", check=False)
    owners = box.sh("stat -c '%U %n' /var/lib/wxtoken/main.* /var/lib/wxtoken/.locks").stdout
    assert "root /var/lib/wxtoken/main.json" in owners, owners
    assert "root /var/lib/wxtoken/.locks" in owners, owners
    box.run("systemctl", "start", "wxtoken")
    assert re.match(r"1/1 apps fresh", show(box, "StatusText")), show(box, "StatusText")
    owners = box.sh("stat -c '%U %n' /var/lib/wxtoken/main.* /var/lib/wxtoken/.locks").stdout
    assert "root" not in owners, owners
    box.run("systemctl", "stop", "wxtoken")


def test_a_file_group_the_unit_cannot_map_is_refused_at_start(
        box: Container, emu: Emulator) -> None:
    """file_group under PrivateUsers=yes (no other group is mapped): exit 78 with one line
    naming the key, no restart loop."""
    box.run("usermod", "-aG", "www-data", "wxtoken")
    box.write("/etc/wxtoken/config.toml", CONFIG.format(url=by_name(emu), appid=APPID)
              + 'file_group = "www-data"\n', "0640")
    try:
        assert box.run("systemctl", "start", "wxtoken", check=False).returncode != 0
        time.sleep(7)  # longer than RestartSec=5
        assert show(box, "ExecMainStatus") == "78" and show(box, "NRestarts") == "0"
        journal = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
        assert "apps.main.file_group: the daemon cannot give files to group 'www-data'" \
            in journal
    finally:
        box.run("systemctl", "stop", "wxtoken", check=False)
        box.run("systemctl", "reset-failed", "wxtoken", check=False)
        box.run("gpasswd", "-d", "wxtoken", "www-data", check=False)


def test_config_error_exits_78_without_a_restart_loop(box: Container) -> None:
    """A broken config: the start fails with status 78, one journal line, no restarts."""
    box.write("/etc/wxtoken/config.toml", "refresh_interval = \"soon\"\n[apps.main]\n"
              f"appid = \"{APPID}\"\nsecret_credential = \"main\"\n", "0640")
    assert box.run("systemctl", "start", "wxtoken", check=False).returncode != 0
    time.sleep(7)  # longer than RestartSec=5
    assert show(box, "ExecMainStatus") == "78"
    assert show(box, "NRestarts") == "0"
    assert show(box, "ActiveState") == "failed"
    errors = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
    assert "/etc/wxtoken/config.toml: refresh_interval: must be a number" in errors
    assert "Traceback" not in errors


def test_uninstall_keeps_state_and_config(box: Container) -> None:
    """install.sh --uninstall removes the program and unit, keeps the state and the config."""
    box.run("/src/deploy/systemd/install.sh", "--uninstall")
    assert box.run("test", "-e", "/opt/wxtoken", check=False).returncode != 0
    assert box.run("test", "-e", "/etc/systemd/system/wxtoken.service",
                   check=False).returncode != 0
    assert box.run("test", "-f", "/var/lib/wxtoken/main.json").returncode == 0
    assert box.run("test", "-f", "/etc/wxtoken/config.toml").returncode == 0
