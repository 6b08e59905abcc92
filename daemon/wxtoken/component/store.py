"""A component's files, under ``<state_dir>/components/<NAME>/``:

    <component_appid>.json        the component_access_token (the usual contract, group-readable)
    <authorizer_appid>.json       each authorizer's token (the usual contract, group-readable)
    <appid>.status.json           the refreshers' bookkeeping, as for apps
    .locks/                       the writers' locks (the daemon's alone), as for apps
    .platform.json                what `wxtoken status` shows: when the last ticket came, the last
                                  reconcile, authorizers that need re-authorization; and work
                                  that must survive a restart: cancellations not yet decided,
                                  authorizations to take from the authorizer list (no secret)
    .private/                     0700, the daemon's alone:
        ticket.json               the newest ticket and the last one that yielded a token
        refresh/<appid>.json      each authorizer's refresh token(s): durable state, never logged;
                                  with the authorization's times (``authorized_at``, and
                                  ``wechat_at``: its event's CreateTime)

Every write is atomic (temp file, fsync, rename); the refresh tokens and the ticket are written
durably before anything that depends on them is published.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any

from wxtoken.component.ticket_file import TICKET_LIFE, TicketFile
from wxtoken.errors import StoreError
from wxtoken.record import APP_NAME_RE
from wxtoken.store import (
    atomic_write,
    held_temp_file,
    json_number,
    read_json_object,
    remove_if_unheld,
    store_error,
)

COMPONENTS_DIR = "components"
PRIVATE = ".private"
PLATFORM_FILE = ".platform.json"


def component_dir(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, COMPONENTS_DIR, name)


def _reader_dir(path: str) -> None:
    """A directory the readers' group traverses: created 0750 whatever the umask; one the
    group cannot traverse (made under umask 077 by an earlier run) is opened to it, a wider
    one is left as the operator made it."""
    try:
        os.makedirs(path, mode=0o750)
    except FileExistsError:
        mode = os.stat(path).st_mode & 0o7777
        if os.path.isdir(path) and mode & 0o050 != 0o050:
            with contextlib.suppress(PermissionError):  # another user's: as it was before
                os.chmod(path, mode | 0o050)  # noqa: S103 - the readers' group traverses it
    else:
        os.chmod(path, 0o750)  # noqa: S103 - the readers' group traverses it


class ComponentFiles:
    """The files of one component."""

    def __init__(self, state_dir: str, name: str, component_appid: str,
                 ticket_life: float = TICKET_LIFE) -> None:
        self.name = name
        self.component_appid = component_appid
        self.dir = component_dir(state_dir, name)
        self.private = os.path.join(self.dir, PRIVATE)
        self.refresh_dir = os.path.join(self.private, "refresh")
        self.platform_path = os.path.join(self.dir, PLATFORM_FILE)
        self._lock = threading.Lock()  # .platform.json's read-modify-writes
        self.ticket = TicketFile(os.path.join(self.private, "ticket.json"), ticket_life, self)
        self._refresh_lock = threading.RLock()  # the refresh-token files' read-modify-writes

    def ensure(self) -> None:
        """Create the directories (the component's readable by the group, .private not), with
        explicit modes: the umask must not decide who reads tokens."""
        _reader_dir(os.path.dirname(self.dir))
        _reader_dir(self.dir)
        os.makedirs(self.refresh_dir, mode=0o700, exist_ok=True)
        os.chmod(self.private, 0o700)
        os.chmod(self.refresh_dir, 0o700)

    # -- refresh tokens --------------------------------------------------------------------------
    def refresh_path(self, appid: str) -> str:
        if not APP_NAME_RE.match(appid):
            raise ValueError(f"{appid!r} is not an appid")
        return os.path.join(self.refresh_dir, f"{appid}.json")

    def refresh(self, appid: str) -> dict[str, Any] | None:
        """The authorizer's stored refresh tokens: {"refresh_token", "previous", "listed",
        "updated_at"}; None when there are none. ValueError when the file is damaged."""
        return read_json_object(self.refresh_path(appid))

    def refresh_candidates(self, appid: str) -> list[tuple[str, str]]:
        """The refresh tokens to try, best first, as (where it came from, token): the current
        one, the one before it (WeChat keeps it valid until the new one is first used), this
        host's own that the fleet's replaced (the fleet mode), the one the authorizer list
        gave."""
        try:
            doc = self.refresh(appid) or {}
        except ValueError:
            return []
        out: list[tuple[str, str]] = []
        for key in ("refresh_token", "previous", "spare", "listed"):
            value = doc.get(key)
            if isinstance(value, str) and value and value not in (v for _, v in out):
                out.append((key, value))
        return out

    def _write_refresh(self, appid: str, doc: dict[str, Any], durable: bool = True) -> None:
        """Write an authorizer's refresh-token file; StoreError when the disk refuses (the
        refreshers back off on it, as for a token file)."""
        path = self.refresh_path(appid)
        try:
            atomic_write(path, json.dumps(doc).encode() + b"\n", 0o600, durable=durable)
        except OSError as exc:
            raise store_error("write", path, exc) from None

    def check_refresh_writable(self, appid: str) -> None:
        """Before a call that rotates the authorizer's refresh token: StoreError unless a
        file the size of its refresh-token file can be written durably in the refresh
        directory now (a refresh token WeChat returns that cannot be kept must not be asked
        for: every call retires the token readers hold)."""
        path = self.refresh_path(appid)
        try:
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = 0
            fd, tmp = held_temp_file(self.refresh_dir, f".{appid}.json.probe.")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(b"\0" * (2 * size + 1024))  # the new one may hold one token more
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        except OSError as exc:
            raise store_error("write", path, exc) from None

    @property
    def refresh_lock(self) -> threading.RLock:
        """Held around a read-modify-write of the refresh-token files (re-entrant)."""
        return self._refresh_lock

    def store_refresh(self, appid: str, refresh_token: str, now: float,
                      previous: str | None = None, listed: str | None = None,
                      authorized_at: float | None = None,
                      wechat_at: float | None = None) -> dict[str, Any]:
        """Persist the authorizer's refresh token, durably, before the token it came with is
        published. An empty or missing one never overwrites a stored one. ``authorized_at``:
        the time of the authorization (or import) it came from; kept through rotations.
        ``wechat_at``: that authorization's time on WeChat's clock (its event's CreateTime),
        only with ``authorized_at``; an authorization without one (an import, the authorizer
        list) has none. Kept through rotations, like ``authorized_at``: an ``unauthorized``
        event is compared with it. Returns what was stored; StoreError when it could not be
        written."""
        if not refresh_token:
            raise ValueError("an empty refresh token is never stored")
        with self._refresh_lock:
            try:
                doc = self.refresh(appid) or {}
            except ValueError:
                doc = {}
            if previous is None and doc.get("refresh_token") != refresh_token:
                previous = doc.get("refresh_token")
            new: dict[str, Any] = {"appid": appid, "refresh_token": refresh_token,
                                   "updated_at": now}
            if previous and previous != refresh_token:
                new["previous"] = previous
            kept_listed = listed if listed is not None else doc.get("listed")
            if kept_listed and kept_listed not in (refresh_token, previous):
                new["listed"] = kept_listed
            at = authorized_at if authorized_at is not None else doc.get("authorized_at")
            if isinstance(at, (int, float)):
                new["authorized_at"] = at
            wechat = wechat_at if authorized_at is not None else doc.get("wechat_at")
            if isinstance(wechat, (int, float)) and not isinstance(wechat, bool):
                new["wechat_at"] = wechat
            base = doc.get("fleet")  # the fleet mode: its current when last in step with it
            if isinstance(base, str) and base and authorized_at is None:
                new["fleet"] = base
            self._write_refresh(appid, new)
            return new

    def in_step(self, appid: str, fleets: str) -> None:
        """The fleet mode: the fleet's current refresh token is now ``fleets`` (this host's
        was stored there, or taken from there): what this host's next ones follow from."""
        with self._refresh_lock:
            try:
                doc = self.refresh(appid)
            except ValueError:
                return
            if doc is None or doc.get("fleet") == fleets:
                return
            doc["fleet"] = fleets
            # not durable, and not written on a disk that refuses it: a lost one only makes
            # the next push or take less exact
            with contextlib.suppress(StoreError):
                self._write_refresh(appid, doc, durable=False)

    def adopt_refresh(self, appid: str, theirs: dict[str, Any]) -> bool:
        """Take the fleet's refresh tokens for ``appid`` unless this host's are the same, or
        follow from them (rotated here while Redis could not be written: they go to Redis
        instead), or come from a later authorization. This host's current one is kept as a
        spare to try. True when adopted."""
        current, previous = theirs.get("refresh_token"), theirs.get("previous")
        if not isinstance(current, str) or not current:
            return False
        with self._refresh_lock:
            try:
                mine = self.refresh(appid) or {}
            except ValueError:
                mine = {}
            if current in (mine.get("refresh_token"), mine.get("previous"), mine.get("fleet")):
                return False
            if json_number(mine.get("authorized_at")) > json_number(theirs.get("authorized_at")):
                return False  # authorized (or imported) here since: this host's is the chain
            new: dict[str, Any] = {"appid": appid, "refresh_token": current,
                                   "updated_at": json_number(theirs.get("updated_at")),
                                   "fleet": current}
            if isinstance(previous, str) and previous and previous != current:
                new["previous"] = previous
            spare = mine.get("refresh_token")
            if isinstance(spare, str) and spare and spare not in (current, previous):
                new["spare"] = spare
            listed = mine.get("listed")
            if isinstance(listed, str) and listed not in (current, previous, spare):
                new["listed"] = listed
            for key in ("authorized_at", "wechat_at"):  # the fleet's chain's authorization
                at = theirs.get(key)
                if isinstance(at, (int, float)) and not isinstance(at, bool):
                    new[key] = at
            self._write_refresh(appid, new)
            return True

    def authorization(self, appid: str) -> tuple[float, float | None] | None:
        """The authorization this host holds for ``appid``: (when it was made, on whatever
        clock stamped it; its time on WeChat's clock, None when unknown: an import, the
        authorizer list, an authorization from before this was kept). None when no refresh
        token is stored (a damaged file counts as none)."""
        try:
            doc = self.refresh(appid)
        except ValueError:
            return None
        if doc is None:
            return None
        wechat = doc.get("wechat_at")
        return (json_number(doc.get("authorized_at")),
                float(wechat) if isinstance(wechat, (int, float))
                and not isinstance(wechat, bool) else None)

    def note_listed(self, appid: str, listed: str, now: float) -> bool:
        """Remember the refresh token the authorizer list gave, as a fallback; True when it is
        new to us."""
        with self._refresh_lock:
            try:
                doc = self.refresh(appid) or {}
            except ValueError:
                doc = {}
            if listed in (doc.get("refresh_token"), doc.get("previous"), doc.get("listed")):
                return False
            if not doc.get("refresh_token"):
                self.store_refresh(appid, listed, now)
                return True
            doc["listed"] = listed
            self._write_refresh(appid, doc)
            return True

    def authorizers(self) -> list[str]:
        """Every authorizer with a stored refresh token (they define who is served)."""
        try:
            names = os.listdir(self.refresh_dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json")
                      and APP_NAME_RE.match(n[:-5]))

    def clean_private(self) -> list[str]:
        """At start: remove the temp files a killed writer left in ``.private/`` and
        ``.private/refresh/`` (``.<file>.*.tmp``: a ticket or a refresh token cut short), as
        ``store.clean_state_dir`` does in the token directories. Returns what was done."""
        done: list[str] = []
        for directory in (self.private, self.refresh_dir):
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp") \
                        and entry.is_file(follow_symlinks=False) \
                        and remove_if_unheld(entry.path):
                    done.append(f"removed {entry.path}")
        return done

    def remove_authorizer(self, appid: str) -> list[str]:
        """Delete an authorizer's files (it cancelled the authorization); what was removed."""
        removed = []
        for path in (os.path.join(self.dir, f"{appid}.json"),
                     os.path.join(self.dir, f"{appid}.status.json"),
                     self.refresh_path(appid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed

    # -- what `wxtoken status` shows -------------------------------------------------------------
    def platform(self) -> dict[str, Any]:
        try:
            return read_json_object(self.platform_path) or {}
        except ValueError:
            return {}

    def note(self, durable: bool = False, **changes: Any) -> None:
        """Update .platform.json (no secret in it: times, counts, appids and reasons)."""
        with self._lock:
            doc = self.platform()
            for key, value in changes.items():
                if value is None:
                    doc.pop(key, None)
                else:
                    doc[key] = value
            self._write_platform(doc, durable)

    def note_entry(self, key: str, appid: str, value: Any) -> None:
        """Set (``value`` None: drop) one authorizer's entry of a table in .platform.json,
        durably: work that must survive a restart (a cancellation to decide, an authorization
        to take from the authorizer list). OSError when it cannot be written."""
        with self._lock:
            doc = self.platform()
            found = doc.get(key)
            entries = dict(found) if isinstance(found, dict) else {}
            if value is None:
                if appid not in entries:
                    return
                entries.pop(appid)
            else:
                entries[appid] = value
            if entries:
                doc[key] = entries
            else:
                doc.pop(key, None)
            self._write_platform(doc, True)

    def entries(self, key: str) -> dict[str, Any]:
        """A table of .platform.json (``note_entry``'s), by authorizer."""
        found = self.platform().get(key)
        return {k: v for k, v in found.items() if APP_NAME_RE.match(k)} \
            if isinstance(found, dict) else {}

    def _write_platform(self, doc: dict[str, Any], durable: bool) -> None:
        atomic_write(self.platform_path, json.dumps(doc, sort_keys=True).encode() + b"\n",
                     0o640, durable=durable)
