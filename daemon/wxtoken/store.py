"""Token files on disk: atomic replacement, the writers' lock, and the per-app status file.

Layout of ``state_dir`` (app names contain no dots, so these never collide):

- ``<app>.json``         the token file, the contract readers rely on;
- ``<app>.status.json``  the daemon's bookkeeping (last result, backoff, calls today);
- ``<app>.lock``         taken by writers only; readers never lock;
- ``.<app>.*.tmp``       a write in progress (or a crash's leftover, removed under the lock).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import grp
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import filelock

from wxtoken.errors import StoreError, TokenCorrupt
from wxtoken.record import TokenRecord, parse_record, token_path

LOCK_TIMEOUT = 60.0  # longer than one upstream call with its timeouts


@dataclass
class AppStatus:
    """The daemon's persisted bookkeeping for one app (``<app>.status.json``)."""

    last_result: str = "none"  # none | ok | unchanged | error | budget
    last_attempt_at: float = 0.0
    last_success_at: float = 0.0
    refreshed_at_exact: float = 0.0  # the token file's refreshed_at with its fraction
    failures: int = 0  # consecutive failed attempts (drives the backoff)
    retry_at: float = 0.0  # no upstream call before this (backoff, quota, budget)
    error_class: str | None = None
    errcode: int | None = None
    errmsg: str | None = None
    error: str | None = None  # our one-line description of the last failure
    calls_day: str = ""  # the WeChat day (Asia/Shanghai) calls_today counts
    calls_today: int = 0
    forced_today: int = 0  # forced refreshes (passive refresh) on calls_day
    last_forced_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes) -> AppStatus:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"


def status_path(state_dir: str, app: str) -> str:
    return os.path.join(state_dir, f"{app}.status.json")


def read_status(path: str) -> AppStatus:
    """The status file at ``path``; a fresh AppStatus when it is missing or damaged (it is
    bookkeeping only, and `wxtoken status` must work while the daemon rewrites it)."""
    try:
        with open(path, "rb") as fh:
            return AppStatus.from_json(fh.read())
    except (OSError, ValueError, TypeError):
        return AppStatus()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int, gid: int | None = None,
                 tmp_prefix: str | None = None) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never a part.

    temp file in the same directory → write → fsync → chmod/chown → os.replace → fsync directory.
    On any failure the temp file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(path) or "."
    prefix = tmp_prefix or f".{os.path.basename(path)}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)  # explicit: the umask must not decide who reads tokens
            if gid is not None:
                os.fchown(fh.fileno(), -1, gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _store_error(action: str, path: str, exc: OSError) -> StoreError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    return StoreError(f"cannot {action} {path}: {reason}")


class Store:
    """One app's files in the state directory."""

    def __init__(self, state_dir: str, app: str, file_mode: int = 0o640,
                 file_group: str | None = None) -> None:
        self.state_dir = state_dir
        self.app = app
        self.file_mode = file_mode
        self.file_group = file_group
        self.path = token_path(state_dir, app)
        self.status_path = status_path(state_dir, app)
        self._lock = filelock.FileLock(os.path.join(state_dir, f"{app}.lock"),
                                       timeout=LOCK_TIMEOUT, thread_local=False)
        # filelock is reentrant for every thread sharing one FileLock object: threads of this
        # process (scheduler, control endpoint) are serialised here first
        self._thread_lock = threading.Lock()

    def _gid(self) -> int | None:
        if self.file_group is None:
            return None
        try:
            return grp.getgrnam(self.file_group).gr_gid
        except KeyError:
            raise StoreError(f"file_group {self.file_group!r} does not exist") from None

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the writers' lock (between daemons, threads and CLI calls on this state dir)."""
        started = time.monotonic()
        if not self._thread_lock.acquire(timeout=timeout):
            raise StoreError(f"timed out after {timeout:.0f} s waiting for {self._lock.lock_file}")
        try:
            left = max(0.0, timeout - (time.monotonic() - started))
            with self._lock.acquire(timeout=left):
                yield
        except filelock.Timeout:
            raise StoreError(f"timed out after {timeout:.0f} s waiting for {self._lock.lock_file}"
                             ) from None
        except OSError as exc:
            raise _store_error("lock", self._lock.lock_file, exc) from None
        finally:
            self._thread_lock.release()

    def read(self) -> TokenRecord:
        """The token file's record; TokenCorrupt/FileNotFoundError when there is none usable."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except IsADirectoryError:
            raise TokenCorrupt(self.app, f"{self.path} is a directory") from None
        return parse_record(raw, self.app)

    def write(self, record: TokenRecord) -> None:
        """Atomically replace the token file (caller holds the lock)."""
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            # a directory where the token file belongs would make os.replace fail forever
            try:
                os.rmdir(self.path)
            except OSError as exc:
                raise _store_error("replace directory", self.path, exc) from None
        try:
            atomic_write(self.path, record.to_json(), self.file_mode, self._gid(),
                         tmp_prefix=f".{self.app}.")
        except OSError as exc:
            raise _store_error("write", self.path, exc) from None

    def read_status(self) -> AppStatus:
        return read_status(self.status_path)

    def write_status(self, status: AppStatus) -> None:
        try:
            atomic_write(self.status_path, status.to_json(), self.file_mode, self._gid(),
                         tmp_prefix=f".{self.app}.")
        except OSError as exc:
            raise _store_error("write", self.status_path, exc) from None

    def remove_stale_temp(self) -> list[str]:
        """Remove temp files a crashed writer left behind (caller holds the lock)."""
        removed = []
        for tmp in glob.glob(os.path.join(glob.escape(self.state_dir), f".{self.app}.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
                removed.append(tmp)
        return removed
