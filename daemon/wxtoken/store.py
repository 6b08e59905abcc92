"""Where one app's token record, bookkeeping and writers' lock live: the interface the
Refresher decides against (:class:`TokenStore`), and its implementation on local files
(:class:`FileStore`).

Layout of ``state_dir`` (app names contain no dots, so these never collide):

- ``<app>.json``         the token file, the contract readers rely on;
- ``<app>.status.json``  the daemon's bookkeeping (last result, backoff, calls today);
- ``<app>.lock``         taken by writers only, mode 0600 (a reader that could open it could
                         flock() it and stop every refresh); readers never lock;
- ``.<app>.*.tmp``       a write in progress (or a crash's leftover, removed at start).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import filelock

from wxtoken.errors import StoreError, TokenMissing
from wxtoken.record import TokenRecord, load_record, token_path
from wxtoken.status import AppStatus, read_status, status_path

LOCK_MODE = 0o600


class TokenStore(Protocol):
    """One app's token record, its bookkeeping and the writers' lock. Every decision to call
    WeChat is taken while holding the lock, from what ``read()`` returns."""

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Hold the writers' lock; StoreError when it cannot be had within ``timeout``."""

    def read(self) -> TokenRecord | None:
        """The current record; None when there is none; TokenCorrupt when it is unusable."""

    def write(self, record: TokenRecord) -> None:
        """Replace the record (caller holds the lock); StoreError leaves the old one."""

    def read_status(self) -> AppStatus:
        """The bookkeeping; a fresh AppStatus when there is none."""

    def write_status(self, status: AppStatus, durable: bool = True) -> None:
        """Replace the bookkeeping. ``durable=False`` skips fsync: the write survives the
        process (killed or crashed), not the machine; for counts taken before a call."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int, gid: int | None = None,
                 tmp_prefix: str | None = None, durable: bool = True) -> None:
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
            if durable:
                os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)  # explicit: the umask must not decide who reads tokens
            if gid is not None:
                os.fchown(fh.fileno(), -1, gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def store_error(action: str, path: str, exc: OSError) -> StoreError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    return StoreError(f"cannot {action} {path}: {reason}")


def clean_state_dir(state_dir: str) -> list[str]:
    """At start, in one scan of the directory: remove the temp files crashed writers left
    (``.<app>.*.tmp``) and make this user's lock files 0600; lock files this user cannot open
    (left by a run as another user) are removed, to be created anew. Returns what was done."""
    done: list[str] = []
    try:
        entries = list(os.scandir(state_dir))
    except OSError:
        return done  # the first write will say what is wrong
    for entry in entries:
        name = entry.name
        try:
            if name.startswith(".") and name.endswith(".tmp") and entry.is_file():
                os.unlink(entry.path)
                done.append(f"removed {entry.path}")
            elif name.endswith(".lock") and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != os.geteuid() and os.geteuid() != 0:
                    os.unlink(entry.path)
                    done.append(f"removed {entry.path} (owned by uid {st.st_uid})")
                elif stat.S_IMODE(st.st_mode) != LOCK_MODE:
                    os.chmod(entry.path, LOCK_MODE)
                    done.append(f"made {entry.path} 0600")
        except OSError:
            continue
    return done


class FileStore:
    """One app's files in the state directory (the single-host store)."""

    def __init__(self, state_dir: str, app: str, file_mode: int = 0o640,
                 file_group: str | None = None) -> None:
        self.state_dir = state_dir
        self.app = app
        self.file_mode = file_mode
        self.file_group = file_group
        self.path = token_path(state_dir, app)
        self.status_path = status_path(state_dir, app)
        self.lock_path = os.path.join(state_dir, f"{app}.lock")
        self._lock = filelock.FileLock(self.lock_path, mode=LOCK_MODE, thread_local=False)
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
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Hold the writers' lock (between daemons, threads and CLI calls on this state dir)."""
        started = time.monotonic()
        if not self._thread_lock.acquire(timeout=timeout):
            raise StoreError(f"timed out after {timeout:.0f} s waiting for {self.lock_path}")
        try:
            left = max(0.0, timeout - (time.monotonic() - started))
            with self._acquire(left):
                yield
        finally:
            self._thread_lock.release()

    @contextlib.contextmanager
    def _acquire(self, timeout: float) -> Iterator[None]:
        try:
            try:
                lock = self._lock.acquire(timeout=timeout)
            except PermissionError:
                # left by a run as another user (root by hand): this user owns the directory,
                # so it can replace a lock file it cannot open
                os.unlink(self.lock_path)
                lock = self._lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise StoreError(f"timed out after {timeout:.0f} s waiting for {self.lock_path}"
                             ) from None
        except OSError as exc:
            raise store_error("lock", self.lock_path, exc) from None
        with lock:
            yield

    def read(self) -> TokenRecord | None:
        try:
            return load_record(self.path, self.app)[0]
        except TokenMissing:
            return None

    def write(self, record: TokenRecord) -> None:
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            # a directory where the token file belongs would make os.replace fail forever
            try:
                os.rmdir(self.path)
            except OSError as exc:
                raise store_error("replace directory", self.path, exc) from None
        try:
            atomic_write(self.path, record.to_json(), self.file_mode, self._gid(),
                         tmp_prefix=f".{self.app}.")
        except OSError as exc:
            raise store_error("write", self.path, exc) from None

    def read_status(self) -> AppStatus:
        return read_status(self.status_path)

    def write_status(self, status: AppStatus, durable: bool = True) -> None:
        try:
            atomic_write(self.status_path, status.to_json(), self.file_mode, self._gid(),
                         tmp_prefix=f".{self.app}.", durable=durable)
        except OSError as exc:
            raise store_error("write", self.status_path, exc) from None


