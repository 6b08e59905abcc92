"""An upgrade replaces the program's files under a running daemon: the daemon never loads a
module of the new version, and `wxtoken status` (the new version) says what runs and whether
the installed version accepts the config."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from wxtoken import __version__

from helpers import APPID, SECRET, DaemonProcess, read_json, run_cli

REPO = Path(__file__).resolve().parent.parent
MAIN = {"main": {"appid": APPID, "secret": SECRET}}
BROKEN = 'raise ImportError("a module of the newly installed version was loaded")\n'


def _old_version(dest: Path, version: str = "0.0.9") -> Path:
    """A copy of the package that says it is ``version``: the program a running daemon was
    started from."""
    shutil.copytree(REPO / "daemon" / "wxtoken", dest / "wxtoken",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = dest / "wxtoken" / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{__version__}"', f'__version__ = "{version}"'))
    return dest


def _replace_files(package: Path) -> None:
    """What dpkg does to the running daemon: every module file replaced by another version's."""
    for path in package.rglob("*.py"):
        path.write_text(BROKEN)
    for cache in package.rglob("__pycache__"):
        shutil.rmtree(cache)


def test_a_daemon_whose_files_were_replaced_reloads_refreshes_and_stops(
        tmp_path: Path, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """Every module the daemon may need is imported before READY: after its files are replaced
    it still reloads (SIGHUP and `wxtoken reload`), serves a passive refresh and stops cleanly."""
    old = _old_version(tmp_path / "old")
    config = make_config(MAIN)
    d = daemons(config, env={"PYTHONPATH": str(old)})
    d.wait_for("daemon.ready", timeout=15)
    _replace_files(old / "wxtoken")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("config.reloaded", timeout=15)
    assert run_cli("reload", "--config", str(config)).returncode == 0
    refreshed = run_cli("refresh", "main", "--config", str(config))
    assert refreshed.returncode == 0, refreshed.stderr
    assert d.stop() == 0
    log = d.log_path.read_text()
    assert "Traceback" not in log and "newly installed version" not in log


def test_commands_that_read_the_config_leniently_take_a_bom(
        make_config: Callable[..., Path], sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A config saved with a UTF-8 BOM (Notepad) is read by the daemon and by `wxtoken reload`,
    which finds the control socket the config names (not the default)."""
    config = make_config(MAIN, control_socket=str(sock_dir / "other.sock"))
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    d = daemons(config)
    d.wait_for("daemon.ready", timeout=15)
    reloaded = run_cli("reload", "--config", str(config))
    assert reloaded.returncode == 0, reloaded.stderr
    assert d.stop() == 0


def test_status_says_which_version_runs_and_that_the_installed_one_refuses_the_config(
        tmp_path: Path, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After an upgrade: `wxtoken status` names the running and the installed version; when
    the installed version refuses the config, it says so (the running daemon keeps going)."""
    old = _old_version(tmp_path / "old")
    config = make_config(MAIN)
    d = daemons(config, env={"PYTHONPATH": str(old)})
    d.wait_for("daemon.ready", timeout=15)
    info = read_json(config.parent / "state" / ".daemon.json")
    assert info["version"] == "0.0.9" and info["pid"] == d.proc.pid
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running 0.0.9; installed {__version__}: restart to run it " \
           "(systemctl restart wxtoken)" in status.stdout
    config.write_text(config.read_text() + "refresh_intervall = 60\n")
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 1
    assert f"running 0.0.9 (pid {d.proc.pid}) on the config it last loaded; installed " \
           f"{__version__} refuses the config: " in status.stdout + status.stderr
    assert "refresh_intervall" in status.stdout + status.stderr
    as_json = run_cli("status", "--json", "--config", str(config))
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)  # monitoring parses it even now
    assert doc["healthy"] is False and doc["daemon"]["pid"] == d.proc.pid
    assert any("refresh_intervall" in p for p in doc["config_problems"])
    assert d.stop() == 0
    assert not (config.parent / "state" / ".daemon.json").exists()
