"""The token file's format and where it lives: the contract other programs read.

Standard library only: ``read_token`` imports it. :func:`load_record` is the one loader of a
token file; it raises only ``TokenMissing`` and ``TokenCorrupt``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat

from wxtoken.errors import TokenCorrupt, TokenMissing

DEFAULT_STATE_DIR = "/var/lib/wxtoken"
DEFAULT_SOCKET = "/run/wxtoken/control.sock"
DEFAULT_CONFIG = "/etc/wxtoken/config.toml"
APP_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TICKET_TYPES = ("jsapi", "wx_card")
MAX_TOKEN_LEN = 2048  # WeChat promises <= 512; leave headroom, but refuse nonsense
MAX_FILE_BYTES = 65536  # a token file is a few hundred bytes


class TokenRecord:
    """One app's token as stored in ``<state_dir>/<app>.json`` (immutable by convention).

    A plain class rather than a dataclass: readers import this module, and dataclasses (with
    inspect) would double what `from wxtoken import read_token` costs.
    """

    __slots__ = ("access_token", "app", "appid", "expires_at", "refreshed_at", "tickets")

    def __init__(self, app: str, appid: str, access_token: str, expires_at: int,
                 refreshed_at: int, tickets: dict[str, tuple[str, int]] | None = None) -> None:
        self.app = app
        self.appid = appid
        self.access_token = access_token
        self.expires_at = expires_at
        self.refreshed_at = refreshed_at
        self.tickets: dict[str, tuple[str, int]] = tickets or {}  # type -> (ticket, expires_at)

    def _key(self) -> tuple[object, ...]:
        return (self.app, self.appid, self.access_token, self.expires_at, self.refreshed_at,
                sorted(self.tickets.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenRecord) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # never the whole token
        return (f"TokenRecord(app={self.app!r}, token={self.access_token[:6]!r}…, "
                f"expires_at={self.expires_at}, refreshed_at={self.refreshed_at})")

    def replace(self, **changes: object) -> TokenRecord:
        """A copy with some fields changed."""
        fields: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return TokenRecord(**fields)  # type: ignore[arg-type]

    def to_json(self) -> bytes:
        data: dict[str, object] = {
            "app": self.app,
            "appid": self.appid,
            "access_token": self.access_token,
            "expires_at": self.expires_at,
            "refreshed_at": self.refreshed_at,
        }
        for kind, (ticket, expires_at) in sorted(self.tickets.items()):
            data[f"{kind}_ticket"] = ticket
            data[f"{kind}_ticket_expires_at"] = expires_at
        return json.dumps(data, separators=(", ", ": ")).encode() + b"\n"


def token_path(state_dir: str | os.PathLike[str], app: str) -> str:
    return os.path.join(os.fspath(state_dir), f"{app}.json")


def _int_field(data: dict[str, object], key: str, app: str) -> int:
    value = data.get(key)
    if type(value) is not int or value <= 0:
        raise TokenCorrupt(app, f"field {key!r} is missing or not a positive integer")
    return value


def load_record(path: str, app: str) -> tuple[TokenRecord, os.stat_result]:
    """Read and validate the token file at ``path``; return the record and the file's stat.

    Raises TokenMissing when there is no such file, TokenCorrupt for anything there that cannot
    be used (not JSON, another app's, not a regular file, permission denied, …). The open never
    blocks (a FIFO in its place is refused, not waited on).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TokenMissing(app, f"no token file {path} (is the wxtoken daemon running?)") from None
    except NotADirectoryError:
        raise TokenMissing(app, f"{os.path.dirname(path)} is not a directory") from None
    except PermissionError:
        raise TokenCorrupt(app, f"permission denied reading {path} "
                                "(add this user to the wxtoken group)") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise TokenCorrupt(app, f"cannot open {path}: {reason}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise TokenCorrupt(app, f"{path} is {kind}")
        raw = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenCorrupt(app, f"cannot read {path}: {os.strerror(exc.errno or errno.EIO)}"
                           ) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise TokenCorrupt(app, f"{path} is too large to be a token file")
    return parse_record(raw, app), st


def parse_record(raw: bytes, app: str) -> TokenRecord:
    """Parse and validate a token file's bytes; raise TokenCorrupt with the reason."""
    if not raw.strip():
        raise TokenCorrupt(app, "token file is empty")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TokenCorrupt(app, "token file is not valid JSON") from None
    if not isinstance(data, dict):
        raise TokenCorrupt(app, "token file is not a JSON object")
    if data.get("app") != app:
        raise TokenCorrupt(app, f"token file belongs to app {data.get('app')!r}")
    token = data.get("access_token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN:
        raise TokenCorrupt(app, "field 'access_token' is missing or not a token")
    appid = data.get("appid")
    if not isinstance(appid, str):
        raise TokenCorrupt(app, "field 'appid' is missing")
    tickets: dict[str, tuple[str, int]] = {}
    for kind in TICKET_TYPES:
        ticket = data.get(f"{kind}_ticket")
        if ticket is not None:
            if not isinstance(ticket, str) or not ticket:
                raise TokenCorrupt(app, f"field '{kind}_ticket' is not a string")
            tickets[kind] = (ticket, _int_field(data, f"{kind}_ticket_expires_at", app))
    return TokenRecord(
        app=app,
        appid=appid,
        access_token=token,
        expires_at=_int_field(data, "expires_at", app),
        refreshed_at=_int_field(data, "refreshed_at", app),
        tickets=tickets,
    )
