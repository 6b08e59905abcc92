"""The Debian package: deploy/debian/build.sh builds it (twice, the second with a higher
version), lintian checks it, and a booted throwaway container installs, configures, starts,
reloads, upgrades, removes, reinstalls and purges it with apt, as an operator would."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import Marker

from wxtoken.emulator import Emulator

from helpers import APPID, SECRET, assert_no_secret
from nspawn import Container, cannot_boot_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
V1, V2, V3 = "0.1.0", "0.1.0+1", "0.1.0+2"
CONFIG = """\
api_base = "{url}"
[apps.main]
appid = "{appid}"
secret_credential = "main"
"""
DROPIN = "[Service]\nLoadCredential=main:/etc/wxtoken/main.secret\n"


def build(version: str, out: Path) -> Path:
    result = subprocess.run([str(REPO / "deploy" / "debian" / "build.sh"), "--version", version,
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    deb = Path(result.stdout.strip().splitlines()[-1])
    assert deb.name.startswith(f"wxtoken_{version}_") and deb.exists()
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    reason = cannot_boot_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("debs")
    # the checkout beside them (/src/repo in the container), for install.sh
    shutil.copytree(REPO, out / "repo", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "dist", "__pycache__", ".*_cache", ".hypothesis"))
    return build(V1, out), build(V2, out), build(V3, out)


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator({APPID: SECRET}) as e:
        yield e


@pytest.fixture(scope="module")
def box(debs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Container]:
    tmp = tmp_path_factory.mktemp("nspawn-deb")
    container = Container(tmp / "base", debs[0].parent, tmp / "console.log")
    try:
        # a container image's policy-rc.d (exit 101) forbids maintainer scripts to start or
        # restart services; a Debian machine has none
        container.run("rm", "-f", "/usr/sbin/policy-rc.d")
        yield container
        journal = container.run("journalctl", "--no-pager", "-o", "cat").stdout
        assert_no_secret(journal, "the container's journal")
        assert "Traceback" not in journal
    finally:
        container.stop()


def apt(box: Container, *args: str) -> str:
    result = box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q",
                     "-o", "Dpkg::Use-Pty=0", *args, timeout=600)
    return result.stdout + result.stderr


def active(box: Container) -> str:
    return box.run("systemctl", "is-active", "wxtoken", check=False).stdout.strip()


def main_pid(box: Container) -> str:
    return box.run("systemctl", "show", "wxtoken", "-p", "MainPID", "--value").stdout.strip()


def test_lintian_finds_nothing(debs: tuple[Path, Path, Path]) -> None:
    """The package is lintian-clean (the venv's own findings are overridden, with reasons)."""
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (./dev.sh test installs it)")
    result = subprocess.run(["lintian", "--tag-display-limit", "0", str(debs[0])],
                            capture_output=True, text=True, timeout=600)
    findings = [line for line in (result.stdout + result.stderr).splitlines()
                if line[:2] in ("E:", "W:")]
    assert findings == [], "\n".join(findings)


def test_the_package_holds_the_locked_versions(debs: tuple[Path, Path, Path]) -> None:
    """Both packages hold exactly requirements/runtime.lock's versions of every dependency
    (a .deb built twice from one commit holds the same code), and no pip or setuptools."""
    # the markers as Debian's /usr/bin/python3, which the package's venv runs, sees them
    debian_python = subprocess.run(["/usr/bin/python3", "-c", "import platform; "
                                    "print(platform.python_version())"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    env = {"python_full_version": debian_python,
           "python_version": ".".join(debian_python.split(".")[:2])}
    lock = {name: version for name, version, marker in re.findall(
                r"^([a-z0-9._-]+)==([^ ;\\\n]+)(?: ; ([^\\\n]+))?",
                (REPO / "requirements" / "runtime.lock").read_text(), re.M)
            if not marker or Marker(marker).evaluate(env)}
    for deb in debs:
        listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                                 check=True).stdout
        held = {m[0].lower().replace("_", "-"): m[1] for m in re.findall(
            r"site-packages/([A-Za-z0-9_.]+)-([^-/]+)\.dist-info/\n", listing)}
        held.pop("wxtoken")
        wanted = {name: version for name, version in lock.items()
                  if name not in ("pip", "setuptools")}
        assert held == wanted, deb.name


def test_the_package_refuses_to_install_over_install_sh(
        box: Container, debs: tuple[Path, Path, Path]) -> None:
    """A machine where deploy/systemd/install.sh installed wxtoken: its unit in /etc/systemd
    would shadow the package's, so apt refuses, naming the command that removes it."""
    box.run("install", "-D", "-m", "0644", "/src/repo/deploy/systemd/wxtoken.service",
            "/etc/systemd/system/wxtoken.service")
    try:
        out = box.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "install",
                      f"/src/{debs[0].name}", check=False, timeout=600)
        assert out.returncode != 0
        assert "deploy/systemd/install.sh --uninstall" in out.stdout + out.stderr
        assert box.run("test", "-e", "/usr/bin/wxtoken", check=False).returncode != 0
    finally:
        box.run("rm", "-f", "/etc/systemd/system/wxtoken.service")


def test_install_enables_but_starts_only_once_configured(
        box: Container, debs: tuple[Path, Path, Path], emu: Emulator) -> None:
    """apt install: user, directories and modes in place, the unit enabled but not started
    (the example config's secrets do not exist), and says so; once configured, it starts."""
    out = apt(box, "install", f"/src/{debs[0].name}")
    assert "wxtoken: enabled, not started: /etc/wxtoken/config.toml is still the example" in out
    assert box.run("systemctl", "is-enabled", "wxtoken").stdout.strip() == "enabled"
    assert active(box) == "inactive"
    modes = box.sh("stat -c '%n %U:%G %a' /etc/wxtoken /etc/wxtoken/config.toml "
                   "/var/lib/wxtoken").stdout.splitlines()
    assert modes == ["/etc/wxtoken root:wxtoken 750", "/etc/wxtoken/config.toml root:wxtoken 640",
                     "/var/lib/wxtoken wxtoken:wxtoken 750"]
    assert box.run("wxtoken", "--version").stdout.strip() == "wxtoken 0.1.0"
    assert box.sh("find /usr/lib/wxtoken/lib -name '*.pyc' | head -n 1").stdout  # compiled
    assert box.run("readlink", "-f", "/usr/bin/wxtoken").stdout.strip() == \
        "/usr/lib/wxtoken/bin/wxtoken"
    box.write("/etc/wxtoken/main.secret", SECRET + "\n", "0600")
    box.write("/etc/systemd/system/wxtoken.service.d/credentials.conf", DROPIN)
    box.write("/etc/wxtoken/config.toml", CONFIG.format(url=emu.url, appid=APPID), "0640")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "wxtoken")
    assert active(box) == "active"
    assert box.run("wxtoken", "token", "main").stdout.strip() == \
        box.sh("python3 -c \"import json; print(json.load(open('/var/lib/wxtoken/main.json'))"
               "['access_token'])\"").stdout.strip()
    assert emu.calls(APPID) == 1
    box.run("systemctl", "reload", "wxtoken")
    assert active(box) == "active" and emu.calls(APPID) == 1


def test_install_sh_refuses_while_the_package_is_installed(box: Container) -> None:
    """install.sh on a machine with the package: refused before it changes anything, naming
    the command that removes the package."""
    out = box.run("/src/repo/deploy/systemd/install.sh", "--now", check=False)
    assert out.returncode != 0 and "apt purge wxtoken" in out.stderr, out.stderr
    assert box.run("test", "-e", "/opt/wxtoken", check=False).returncode != 0
    assert box.run("test", "-e", "/etc/systemd/system/wxtoken.service",
                   check=False).returncode != 0
    # its --uninstall removes only what install.sh installed: never the package's files
    box.run("/src/repo/deploy/systemd/install.sh", "--uninstall")
    for path in ("/usr/lib/sysusers.d/wxtoken.conf", "/usr/bin/wxtoken",
                 "/lib/systemd/system/wxtoken.service"):
        assert box.run("test", "-e", path, check=False).returncode == 0, path
    changed = box.run("dpkg", "--verify", "wxtoken", check=False).stdout.splitlines()
    assert [line for line in changed if " c /etc/" not in line] == []  # the config is edited
    assert active(box) == "active"


def test_an_upgrade_whose_version_refuses_the_config_keeps_the_running_service(
        box: Container, debs: tuple[Path, Path, Path], emu: Emulator) -> None:
    """apt install of a version that refuses the config: apt succeeds, the running service is
    not restarted (it would stay down: exit 78 is not retried), the refused key and what to do
    are printed, and `wxtoken status` says what runs and what is refused."""
    config = box.run("cat", "/etc/wxtoken/config.toml").stdout
    pid = main_pid(box)
    box.run("sed", "-i", "1i refresh_intervall = 60", "/etc/wxtoken/config.toml")
    out = apt(box, "install", f"/src/{debs[1].name}")
    assert box.run("dpkg-query", "-W", "-f", "${Version}", "wxtoken").stdout == V2
    assert "wxtoken: not restarted: the new version refuses the config: " \
        "/etc/wxtoken/config.toml: refresh_intervall: unknown key" in out, out
    assert "then: systemctl restart wxtoken" in out
    assert active(box) == "active" and main_pid(box) == pid
    status = box.run("wxtoken", "status", check=False)
    assert status.returncode == 1 and f"(pid {pid}) on the config it last loaded; " \
        "installed 0.1.0 refuses the config" in status.stdout, status.stdout + status.stderr
    # the old daemon goes on: its files were replaced, it loaded what it needs before READY
    box.run("systemctl", "reload", "wxtoken", check=False)  # refused: the config is broken
    assert active(box) == "active" and main_pid(box) == pid
    box.write("/etc/wxtoken/config.toml", config, "0640")
    box.run("chgrp", "wxtoken", "/etc/wxtoken/config.toml")
    box.run("systemctl", "restart", "wxtoken")
    assert active(box) == "active" and main_pid(box) != pid
    assert emu.calls(APPID) == 1
    journal = box.run("journalctl", "-u", "wxtoken", "--no-pager", "-o", "cat").stdout
    assert "Traceback" not in journal


def test_upgrade_restarts_the_running_service_and_keeps_the_config(
        box: Container, debs: tuple[Path, Path, Path], emu: Emulator) -> None:
    """apt install of a higher version: the running service restarts on the new package (the
    token in the file is reused: no call), the edited config stays as it is."""
    config = box.run("cat", "/etc/wxtoken/config.toml").stdout
    before = main_pid(box)
    apt(box, "install", f"/src/{debs[2].name}")
    assert box.run("dpkg-query", "-W", "-f", "${Version}", "wxtoken").stdout == V3
    assert active(box) == "active" and main_pid(box) != before
    assert box.run("cat", "/etc/wxtoken/config.toml").stdout == config
    assert emu.calls(APPID) == 1


def test_remove_stops_and_keeps_config_and_state_reinstall_starts(
        box: Container, debs: tuple[Path, Path, Path], emu: Emulator) -> None:
    """apt remove stops the service and keeps /etc/wxtoken and /var/lib/wxtoken; installing
    again finds the config ready (check-config passes with the unit's credentials) and
    starts the service by itself."""
    apt(box, "remove", "wxtoken")
    assert active(box) != "active"
    assert box.run("test", "-e", "/usr/bin/wxtoken", check=False).returncode != 0
    box.run("test", "-f", "/etc/wxtoken/config.toml")
    box.run("test", "-f", "/var/lib/wxtoken/main.json")
    # removed, not purged: a later purge would delete the config under install.sh's service
    refused = box.run("/src/repo/deploy/systemd/install.sh", check=False)
    assert refused.returncode != 0 and "removed but not purged" in refused.stderr
    out = apt(box, "install", f"/src/{debs[2].name}")
    assert "wxtoken: started" in out, out
    assert active(box) == "active"
    assert emu.calls(APPID) == 1  # the kept token file is reused


def test_purge_removes_the_config_and_says_what_it_keeps(
        box: Container, debs: tuple[Path, Path, Path]) -> None:
    """apt purge: the config goes, the directory with the operator's secret stays (named), the
    state dir stays with the tokens (said, with how to delete it)."""
    out = apt(box, "purge", "wxtoken")
    assert active(box) != "active"
    assert box.run("test", "-e", "/etc/wxtoken/config.toml", check=False).returncode != 0
    assert "wxtoken: kept /etc/wxtoken: it holds files the package did not install: " \
        "main.secret" in out
    assert "wxtoken: kept /var/lib/wxtoken (token files, this month's quota-reset counts); " \
        "delete it with: rm -rf /var/lib/wxtoken" in out
    box.run("test", "-f", "/var/lib/wxtoken/main.json")
