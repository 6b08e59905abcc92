"""The token file's format: the contract other programs read. Standard library only."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from wxtoken.errors import TokenCorrupt

APP_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TICKET_TYPES = ("jsapi", "wx_card")
MAX_TOKEN_LEN = 2048  # WeChat promises <= 512; leave headroom, but refuse nonsense


@dataclass(frozen=True)
class TokenRecord:
    """One app's token as stored in ``<state_dir>/<app>.json``."""

    app: str
    appid: str
    access_token: str
    expires_at: int
    refreshed_at: int
    # ticket type -> (ticket, expires_at)
    tickets: dict[str, tuple[str, int]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
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


def _int_field(data: dict[str, Any], key: str, app: str) -> int:
    value = data.get(key)
    if type(value) is not int or value <= 0:
        raise TokenCorrupt(app, f"field {key!r} is missing or not a positive integer")
    return value


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
