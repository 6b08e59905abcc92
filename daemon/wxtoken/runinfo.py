"""What the running daemon says about itself (``<state_dir>/.daemon.json``: its version and
pid), so that `wxtoken status` can tell a daemon that is not running from one that is, and the
version that runs from the one installed since. Standard library only.

The daemon writes it when it starts and removes it when it stops; a file whose pid is gone was
left by a daemon that was killed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

RUN_FILE = ".daemon.json"


@dataclass(frozen=True)
class RunInfo:
    version: str
    pid: int
    started_at: float


def run_path(state_dir: str) -> str:
    return os.path.join(state_dir, RUN_FILE)


def write_run_info(state_dir: str, version: str) -> str | None:
    """Say that this process, of ``version``, runs on ``state_dir`` (atomic, 0640). Best
    effort: a full or read-only disk must not stop the daemon from starting (it keeps the
    valid tokens it has); the reason is returned for a warning."""
    from wxtoken.store import atomic_write  # the daemon's side only
    doc = {"version": version, "pid": os.getpid(), "started_at": time.time()}
    try:
        atomic_write(run_path(state_dir), json.dumps(doc).encode() + b"\n", 0o640)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def remove_run_info(state_dir: str) -> None:
    try:
        with open(run_path(state_dir), "rb") as fh:
            if json.loads(fh.read(4096)).get("pid") != os.getpid():
                return  # another daemon's (one started on this state dir since)
        os.unlink(run_path(state_dir))
    except (OSError, ValueError, AttributeError):
        pass


def running(state_dir: str) -> RunInfo | None:
    """The daemon running on ``state_dir``, or None when none is (no file, or its process is
    gone)."""
    try:
        with open(run_path(state_dir), "rb") as fh:
            doc = json.loads(fh.read(4096))
        info = RunInfo(str(doc["version"]), int(doc["pid"]), float(doc["started_at"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    try:  # a killed daemon's pid taken by another program since
        with open(f"/proc/{info.pid}/cmdline", "rb") as fh:
            if b"wxtoken" not in fh.read(4096):
                return None
    except OSError:
        pass  # no /proc, or hidden from this user: the pid is all there is to go by
    return info
