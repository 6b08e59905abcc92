"""Shared fixtures: the real emulator on 127.0.0.1, config files, and real daemon processes.
Helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wxtoken.emulator import Emulator

from helpers import APPID, APPID2, CORPID, CORPSECRET, SECRET, SECRET2, DaemonProcess, write_config
from redis_server import REDIS_SERVER, RedisServer

# `./dev.sh test` hands whole files to the workers (--dist loadfile) in collection order
# (--no-loadscope-reorder): the longest first, so that no long file starts last and holds the
# run up. Seconds per file on 2 cores (a --junitxml run, 2026-12-07); a file not listed goes
# after these, in its usual order. Keep it roughly current when a file grows or splits.
LONGEST_FIRST = (
    "test_daemon",          # 185
    "test_fleet_late",      # 165
    "test_fleet_outage",    # 154
    "test_torture",         # 148
    "test_fleet",           # 113
    "test_deb",             # 92
    "test_component",       # 74
    "test_fleet_order",     # 67
    "test_systemd",         # 54
    "test_faults",          # 53
    "test_demo",            # 51
    "test_quota",           # 49
    "test_fleet_sentinel",  # 44
    "test_control",         # 44
    "test_component_fleet",  # 42
)


@pytest.hookimpl(tryfirst=True)  # before --sw and --lf deselect (stepwise goes by position)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: files stay whole


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A real HTTP emulator of WeChat on 127.0.0.1, with two apps and one WeCom agent."""
    with Emulator({APPID: SECRET, APPID2: SECRET2}, {CORPID: {CORPSECRET}}) as emu:
        yield emu


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds 107 bytes; pytest's paths are long)."""
    path = Path(tempfile.mkdtemp(prefix="wxt-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_config(tmp_path: Path, emulator: Emulator, sock_dir: Path) -> Callable[..., Path]:
    """Build a config pointing at the emulator, with a state dir under tmp_path."""

    def make(apps: dict[str, dict[str, Any]] | None = None, name: str = "config.toml",
             redis: dict[str, Any] | None = None, **top: Any) -> Path:
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        settings = {"state_dir": str(state), "api_base": emulator.url, "log_format": "json",
                    "control_socket": str(sock_dir / "control.sock")}
        settings.update(top)
        if apps is None:
            apps = {"main": {"appid": APPID, "secret": SECRET}}
        return write_config(tmp_path / name, settings, apps, redis)

    return make


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Start real daemon processes; all are stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def start(config: Path, env: dict[str, str] | None = None,
              prefix: list[str] | None = None, args: list[str] | None = None) -> DaemonProcess:
        d = DaemonProcess(config, env, prefix, args)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None or not d._log.closed:
            d.stop(signal.SIGKILL)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free loopback port, no persistence."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (./dev.sh test installs it)")
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def hosts(tmp_path: Path, emulator: Emulator,
          redis_server: RedisServer) -> Iterator[Callable[..., Path]]:
    """Configs for the hosts of a fleet: each its own state dir and control socket, one Redis."""
    made: list[Path] = []
    sockets: list[Path] = []

    def make(apps: dict[str, dict[str, Any]], redis: dict[str, Any] | None = None,
             **top: Any) -> Path:
        n = len(made)
        base = tmp_path / f"host{n}"
        (base / "state").mkdir(parents=True)
        sock = Path(tempfile.mkdtemp(prefix="wxf-", dir="/tmp"))
        sockets.append(sock)
        settings = {"state_dir": str(base / "state"), "api_base": emulator.url,
                    "log_format": "json", "control_socket": str(sock / "c.sock"), **top}
        path = write_config(base / "config.toml", settings, apps,
                            {"url": redis_server.url, **(redis or {})})
        made.append(path)
        return path

    yield make
    for sock in sockets:
        shutil.rmtree(sock, ignore_errors=True)
