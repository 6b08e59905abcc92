"""sd_notify: real datagrams on real Unix sockets, abstract ones included."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from wxtoken import sdnotify


def test_notify_reaches_a_path_socket(tmp_path: Path) -> None:
    """READY=1 arrives on a filesystem NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert server.recv(100) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    """An '@' NOTIFY_SOCKET is the abstract namespace (leading NUL)."""
    name = f"wxtoken-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert sdnotify.notify("STATUS=1/1 apps fresh", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(100) == b"STATUS=1/1 apps fresh"


def test_notify_without_systemd_or_with_a_dead_socket_is_false(tmp_path: Path) -> None:
    """No NOTIFY_SOCKET, or nobody listening: False, never an exception."""
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    """WATCHDOG_USEC=60s gives 30 s pings; another process's WATCHDOG_PID gives none."""
    me = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 30
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "x"}) is None
