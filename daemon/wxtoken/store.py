"""Where one app's token record, bookkeeping and writers' lock live: the interface the
Refresher decides against (:class:`TokenStore`), and its implementation on local files
(:class:`FileStore`).

Layout of ``state_dir`` (app names contain no dots, so these never collide):

- ``<app>.json``         the token file, the contract readers rely on;
- ``<app>.status.json``  the daemon's bookkeeping (last result, backoff, calls today);
- ``.locks/<app>.lock``  taken by writers only, in a directory only the daemon's user can
                         enter (a reader that could open a lock file could flock() it and stop
                         every refresh); readers never lock;
- ``.<app>.*.tmp``       a write in progress, flock()ed by its writer (or a crash's leftover,
                         removed at start once no writer holds it).

Earlier versions kept ``<app>.lock`` (mode 0640) beside the token file; the daemon removes those
at start, so a descriptor a reader opened on one before the upgrade locks nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import filelock

from wxtoken.errors import StoreError, TokenMissing
from wxtoken.record import TokenRecord, load_record, token_path
from wxtoken.status import AppStatus, read_status, status_path

if TYPE_CHECKING:
    from wxtoken.config import AppConfig
    from wxtoken.schedule import Outcome

LOCK_MODE = 0o600
STALE_TEMP = 60.0  # a temp file this user cannot open is a crash's leftover after this long
LOCKS_DIR = ".locks"


class Checks(Protocol):
    """What a shared store adds to the refresh decision (the fleet's: fleet/checks.py)."""

    def due(self, now: float) -> bool:
        """Whether a check is due: the run must then take the lock."""

    def reschedule(self, outcome: Outcome, now: float) -> Outcome:
        """The run's outcome, its next time moved earlier when a check comes first."""

    def settle(self, status: AppStatus) -> None:
        """Under the lock, first: what the store's state makes obsolete is cleared."""

    def verify(self, app: AppConfig, client: object, record: TokenRecord | None,
               status: AppStatus, now: float) -> None:
        """Under the lock, when due(): a check of the record (it may mark it refused)."""

    def before_fetch(self, app: AppConfig, client: object, record: TokenRecord | None,
                     status: AppStatus, now: float) -> Outcome | None:
        """Just before a scheduled fetch: an Outcome instead of it, or None to go ahead."""


class TokenStore(Protocol):
    """One app's token record, its bookkeeping and the writers' lock. Every decision to call
    WeChat is taken while holding the lock, from what ``read()`` returns."""

    @property
    def checks(self) -> Checks | None:
        """What the store adds to the refresh decision (None: nothing)."""

    @property
    def extra_wait(self) -> float:
        """How much longer than one holder's work a wait for the lock may take."""

    @property
    def degraded(self) -> bool:
        """Whether the shared part of the store is unreachable (local files only)."""

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Hold the writers' lock; StoreError when it cannot be had within ``timeout``."""

    def holding(self) -> bool:
        """Just before an upstream call: whether the lock is still held (a shared lock can run
        out while its holder was paused)."""

    def read(self) -> TokenRecord | None:
        """The current record, under the lock (a shared store brings the local file and the
        shared record in step here); None when there is none; TokenCorrupt when unusable."""

    def look(self) -> TokenRecord | None:
        """The current record as it stands, without the lock and with no side effect: enough
        to decide *not* to act; whatever needs doing is done under the lock, from read()."""

    def retired(self, record: TokenRecord) -> bool:
        """Whether ``record`` (as last read) may have been retired by a fetch made elsewhere
        after its lease ran out: the caller replaces it."""

    def fetched(self, retires: bool) -> None:
        """Right after a token call WeChat may have answered (``retires``: one that issues a
        new token, retiring the last one after WeChat's overlap)."""

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


def held_temp_file(directory: str, prefix: str) -> tuple[int, str]:
    """A new temp file for a write, flock()ed until its writer closes it: a start's clean-up
    removes only temp files nobody holds (daemons may share a state dir, and one starting must
    not pull the file from under another's rename). The clean-up can win the race between
    mkstemp() and flock(): the file is then unlinked, and another is made."""
    for _ in range(8):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd, tmp
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, f"temp files in {directory} keep being removed")


def remove_if_unheld(path: str, now: float | None = None) -> bool:
    """Remove a temp file no writer holds (its writer died); False when one still does, or
    when it is gone already. One this user cannot open (a crashed run as root by hand left
    it) is removed once it is older than STALE_TEMP: no write takes that long."""
    try:
        # read-write: NFS emulates flock() with POSIX locks, which refuse an exclusive lock
        # on a descriptor opened read-only
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        try:
            if (now if now is not None else time.time()) - os.lstat(path).st_mtime \
                    < STALE_TEMP:
                return False
            os.unlink(path)  # the directory is this user's: its entries are
        except OSError:
            return False
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer's, between its write and its rename
        os.unlink(path)  # unlinked while held: a writer that flock()s it later sees nlink 0
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int, gid: int | None = None,
                 tmp_prefix: str | None = None, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never a part.

    temp file in the same directory (held: see held_temp_file) → write → fsync → chmod/chown →
    close → os.replace → fsync directory. On any failure the temp file is removed and ``path``
    is untouched.
    """
    directory = os.path.dirname(path) or "."
    prefix = tmp_prefix or f".{os.path.basename(path)}."
    fd, tmp = held_temp_file(directory, prefix)
    # the flock belongs to the open file, not the descriptor: a duplicate keeps it past the
    # close (which reports a write NFS could not flush, before anything is published) until
    # the rename is done
    held = os.dup(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)  # explicit: the umask must not decide who reads tokens
            if gid is not None:
                os.fchown(fh.fileno(), -1, gid)
        os.replace(tmp, path)  # still held: the clean-up cannot take it meanwhile
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(held)
    if durable:
        _fsync_dir(directory)


def read_json_object(path: str) -> dict[str, Any] | None:
    """A small JSON object file (1 MiB at most); None when missing; ValueError when damaged."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(1 << 20))
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def json_number(value: Any) -> float:
    """A number of such a file (a time, a count); 0.0 for anything else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else 0.0


def store_error(action: str, path: str, exc: OSError) -> StoreError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    return StoreError(f"cannot {action} {path}: {reason}")


def locks_dir(state_dir: str) -> tuple[str, list[str]]:
    """The directory of the writers' lock files, made usable by this user alone: created 0700
    if missing, made 0700 if wider, moved aside if another user owns it (a run as root by hand:
    this user owns the state dir, so it may). Returns its path and what was done."""
    path = os.path.join(state_dir, LOCKS_DIR)
    done: list[str] = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISDIR(st.st_mode) or (
            st.st_uid != os.geteuid() and os.geteuid() != 0)):
        aside = f"{path}.{st.st_uid}.{time.time_ns()}"
        os.rename(path, aside)
        done.append(f"moved {path} (owned by uid {st.st_uid}) to {aside}")
        st = None
    if st is None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    elif stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
        done.append(f"made {path} 0700")
    return path, done


def clean_state_dir(state_dir: str) -> list[str]:
    """At start, in one scan of the directory: remove the temp files crashed writers left
    (``.<app>.*.tmp`` no live writer holds: another daemon may share the directory) and the
    lock files of earlier versions (``<app>.lock``, 0640), and make the lock directory this
    user's alone. Returns what was done."""
    done: list[str] = []
    try:
        entries = list(os.scandir(state_dir))
        done += locks_dir(state_dir)[1]
    except OSError:
        return done  # the first write will say what is wrong
    for entry in entries:
        name = entry.name
        try:
            if name.startswith(".") and name.endswith(".tmp") and entry.is_file(
                    follow_symlinks=False) and remove_if_unheld(entry.path):
                done.append(f"removed {entry.path}")
            elif name.endswith(".lock") and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                done.append(f"removed {entry.path} (locks now live in {LOCKS_DIR}/)")
        except OSError:
            continue
    return done


class FileStore:
    """One app's files in the state directory (the single-host store)."""

    extra_wait = 0.0
    degraded = False
    checks = None

    def holding(self) -> bool:
        return True  # a file lock does not run out

    def retired(self, record: TokenRecord) -> bool:
        return False  # one host: a fetch is always made under the lock, then written

    def fetched(self, retires: bool) -> None:
        pass

    def __init__(self, state_dir: str, app: str, file_mode: int = 0o640,
                 file_group: str | None = None) -> None:
        self.state_dir = state_dir
        self.app = app
        self.file_mode = file_mode
        self.file_group = file_group
        self.path = token_path(state_dir, app)
        self.status_path = status_path(state_dir, app)
        self.lock_path = os.path.join(state_dir, LOCKS_DIR, f"{app}.lock")
        self._lock = filelock.FileLock(self.lock_path, mode=LOCK_MODE, thread_local=False)
        self._locks_ready = False
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
            if not self._locks_ready:
                locks_dir(self.state_dir)
                self._locks_ready = True
            try:
                lock = self._lock.acquire(timeout=timeout)
            except PermissionError:
                # left by a run as another user (root by hand): this user owns the state dir,
                # so it can move the lock directory aside and start a new one
                locks_dir(self.state_dir)
                with contextlib.suppress(FileNotFoundError):
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

    look = read  # a file has nothing to bring in step

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


