"""The daemon's bookkeeping for one app (``<app>.status.json``): last result, backoff, calls
counted against the daily budget. Standard library only: `wxtoken status` reads it."""

from __future__ import annotations

import enum
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from wxtoken.errcodes import ErrorClass


class LastResult(enum.StrEnum):
    """The last attempt's result, as `wxtoken status` shows it."""

    NONE = "none"
    OK = "ok"
    UNCHANGED = "unchanged"
    ERROR = "error"
    BUDGET = "budget"


class Role(enum.StrEnum):
    """What a token is to this host, as `wxtoken status` and the metrics show it."""

    LEADER = "leader"  # a fleet's app: this host refreshes it now
    CANDIDATE = "candidate"  # a fleet's app: this host has the secret and may take over
    FOLLOWER = "follower"  # a fleet's app (or component) this host only reads
    COMPONENT = "component"  # an Open Platform's component token
    AUTHORIZER = "authorizer"  # an authorizer's token, refreshed with its refresh token


FLEET_ROLES = (Role.LEADER, Role.CANDIDATE, Role.FOLLOWER)


@dataclass
class AppStatus:
    """One app's persisted bookkeeping. Unknown or damaged fields read as their defaults."""

    last_result: LastResult = LastResult.NONE
    last_attempt_at: float = 0.0
    last_success_at: float = 0.0
    refreshed_at_exact: float = 0.0  # the token file's refreshed_at with its fraction
    failures: int = 0  # consecutive failed attempts (drives the backoff)
    retry_at: float = 0.0  # no upstream call before this (backoff, quota, budget)
    error_class: ErrorClass | None = None
    errcode: int | None = None
    errmsg: str | None = None
    error: str | None = None  # our one-line description of the last failure
    rid: str | None = None  # WeChat's request id of the last failure (for `wxtoken rid`)
    calls_day: str = ""  # the WeChat day (Asia/Shanghai) calls_today counts
    calls_today: int = 0
    forced_today: int = 0  # forced refreshes (passive refresh) on calls_day
    last_forced_at: float = 0.0
    forced_streak: int = 0  # forced refreshes in a row of freshly issued tokens (the spacing)
    ticket_replaced_at: float = 0.0  # last time a refused ticket made us replace the token
    # fingerprint of the file's token when a reader reported it invalid and it could not be
    # replaced then (the forced refresh failed or was refused): the next run replaces it
    refused_token: str = ""
    # fleet mode, Redis unreachable: when WeChat refused this host's token before it would
    # have fetched on its own (another host holds a newer one); 0 when not partitioned
    partitioned_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def succeeded(self, at: float) -> None:
        """A token was had at ``at``: the failures, waits and errors before it are over (the
        one place a success is recorded: a refresh, an authorization, an import)."""
        self.failures, self.retry_at = 0, 0.0
        self.error_class = self.errcode = self.errmsg = self.error = self.rid = None
        self.refused_token = ""
        self.last_success_at = at

    @classmethod
    def from_json(cls, raw: bytes) -> AppStatus:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        status = cls()
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            try:
                if f.name == "last_result":
                    value = LastResult(value)
                elif f.name == "error_class":
                    value = None if value is None else ErrorClass(value)
                elif isinstance(getattr(status, f.name), float):
                    value = float(value)
            except (ValueError, TypeError):
                continue  # a value another version wrote: keep the default
            setattr(status, f.name, value)
        return status

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"


def status_path(state_dir: str, app: str) -> str:
    return os.path.join(state_dir, f"{app}.status.json")


def read_status(path: str) -> AppStatus:
    """The status file at ``path``; a fresh AppStatus when it is missing, unreadable or damaged
    (it is bookkeeping only, and `wxtoken status` must work while the daemon rewrites it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return AppStatus()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return AppStatus()
        return AppStatus.from_json(os.read(fd, 65536))
    except (OSError, ValueError, TypeError):
        return AppStatus()
    finally:
        os.close(fd)


def fingerprint(token: str) -> str:
    """A short digest of a token: the status file may say which token was refused without
    holding it."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]
