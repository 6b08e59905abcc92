"""The emulator's state: settings, faults, issued tokens, and the helpers every endpoint uses
(admission checks in WeChat's order, counting calls against the daily quota, faults)."""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

FAULT_MODES = ("busy", "minute_quota", "quota", "ip", "5xx", "garbage", "reset", "hang",
               "drip", "redirect", "empty_token", "lost")
# "lost": the request is carried out (a component endpoint's: the code used, the authorization
# stored, the refresh token rotated), then the connection is reset, so its answer never arrives;
# elsewhere it is "reset" (nothing is carried out)
FAULT_ERRCODES = {
    "busy": (-1, "system error"),
    "minute_quota": (45011, "api minute-quota reach limit"),
    "quota": (45009, "reach max api daily quota limit"),
    "ip": (40164, "invalid ip 127.0.0.1, not in whitelist"),
}


@dataclass
class Settings:
    """Time constants and limits; scale them down so tests run in seconds."""

    token_ttl: int = 7200
    overlap: float = 300.0
    stable_window: float = 300.0
    force_spacing: float = 30.0
    force_per_day: int = 20
    daily_quota: int = 2000
    latency: float = 0.0
    hang_seconds: float = 30.0
    drip_interval: float = 0.5  # seconds between the bytes of a "drip" answer
    keep_alive: bool = True  # False: a connection per call (an open one is a call in flight)
    resets_per_month: int = 10  # clear_quota and clear_quota/v2 together, per appid
    ticket_ttl: float = 43200.0  # a component_verify_ticket is good this long after its push


@dataclass
class Fault:
    mode: str
    count: int = -1  # how many requests it hits; -1 = until cleared
    rate: float = 1.0  # probability it hits a matching request
    appid: str | None = None  # None = every app
    api: str | None = None  # None = every endpoint: token, stable_token, wecom, ticket_jsapi, …
    location: str = ""  # where "redirect" sends the client


@dataclass
class Issued:
    token: str
    key: tuple[str, str]  # (api, appid or corpid:secret)
    issued_at: float
    expires_at: float


@dataclass
class Stable:
    current: Issued | None = None
    last_force: float = 0.0
    forces_today: int = 0


@dataclass
class State:
    """Everything the emulator knows; guarded by ``lock``."""

    settings: Settings = field(default_factory=Settings)
    apps: dict[str, str] = field(default_factory=dict)  # appid -> secret
    corps: dict[str, set[str]] = field(default_factory=dict)  # corpid -> agent secrets
    tokens: dict[str, Issued] = field(default_factory=dict)
    tickets: dict[str, Issued] = field(default_factory=dict)
    latest: dict[tuple[str, str], Issued] = field(default_factory=dict)
    stable: dict[str, Stable] = field(default_factory=dict)
    calls: dict[str, dict[str, int]] = field(default_factory=dict)  # appid -> api -> n
    issued: dict[str, int] = field(default_factory=dict)  # appid -> tokens issued
    used: dict[str, int] = field(default_factory=dict)  # appid -> calls against today's quota
    day: int = 0  # the WeChat day (days since the epoch, Asia/Shanghai) the counts are of
    business: dict[str, dict[str, int]] = field(default_factory=dict)  # appid -> path -> n
    resets: dict[tuple[str, str], int] = field(default_factory=dict)  # (appid, month) -> n
    rids: dict[str, Any] = field(default_factory=dict)  # rid -> ops.Seen, oldest first
    ops: dict[str, int] = field(default_factory=dict)  # operations path -> calls
    inflight: int = 0  # token requests being answered right now
    max_inflight: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_tokens: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.time


class Reply(Exception):
    """Raised inside a handler to send a fault or an answer at once."""

    def __init__(self, body: Any = None, status: int = 200, raw: bytes | None = None,
                 action: str | None = None) -> None:
        super().__init__(action or str(status))
        self.body, self.status, self.raw, self.action = body, status, raw, action


def err(code: int, msg: str) -> Reply:
    return Reply({"errcode": code, "errmsg": msg})


def stats(state: State) -> dict[str, Any]:
    with state.lock:
        return {"calls": {a: dict(per) for a, per in state.calls.items()},
                "resets": {f"{a}/{m}": n for (a, m), n in state.resets.items()},
                "ops": dict(state.ops),
                "total_calls": sum(sum(per.values()) for per in state.calls.values()),
                "issued": dict(state.issued), "accepted": state.accepted,
                "rejected": state.rejected, "max_inflight": state.max_inflight,
                "settings": asdict(state.settings),
                "faults": [asdict(f) for f in state.faults]}


def check_token(state: State, token: str, count: bool = True) -> int:
    with state.lock:
        issued = state.tokens.get(token)
        now = state.clock()
        code = 40001 if issued is None else (42001 if now >= issued.expires_at else 0)
        if count:
            if code:
                state.rejected += 1
                state.rejected_tokens.append(token[:8])
            else:
                state.accepted += 1
        return code


def take_fault(state: State, appid: str, api: str) -> Fault | None:
    for fault in state.faults:
        if fault.appid not in (None, appid) or fault.api not in (None, api) or fault.count == 0:
            continue
        if state.rng.random() >= fault.rate:
            continue
        if fault.count > 0:
            fault.count -= 1
        return fault
    return None


def apply_fault(state: State, fault: Fault) -> None:
    mode = fault.mode
    if mode in FAULT_ERRCODES:
        raise err(*FAULT_ERRCODES[mode])
    if mode.startswith("errcode:"):
        raise err(int(mode.split(":", 1)[1]), "injected error")
    if mode == "5xx":
        raise Reply(status=502, raw=b"<html>502 Bad Gateway</html>")
    if mode == "garbage":
        raise Reply(raw=b"<html>not json</html>")
    if mode == "empty_token":
        raise Reply({"access_token": "", "expires_in": state.settings.token_ttl})
    if mode == "redirect":
        raise Reply(status=307, raw=b"", action="redirect:" + fault.location)
    if mode == "lost":  # an endpoint that does not carry the request out first
        raise Reply(action="reset")
    raise Reply(action=mode)  # reset / hang / drip


def issue(state: State, key: tuple[str, str], appid: str, now: float) -> Issued:
    token = f"{len(state.tokens) % 100:02d}_{secrets.token_urlsafe(96)}"
    issued = Issued(token, key, now, now + state.settings.token_ttl)
    state.tokens[token] = issued
    state.issued[appid] = state.issued.get(appid, 0) + 1
    return issued


def roll_day(state: State) -> None:
    """At 00:00 Asia/Shanghai WeChat's daily counts start again (caller holds state.lock)."""
    day = int((state.clock() + 8 * 3600) // 86400)
    if day != state.day:
        state.day = day
        state.used.clear()
        state.business.clear()


def count_call(state: State, appid: str, api: str) -> None:
    roll_day(state)
    per = state.calls.setdefault(appid, {})
    if state.used.get(appid, 0) >= state.settings.daily_quota:
        raise err(45009, "reach max api daily quota limit")
    per[api] = per.get(api, 0) + 1
    state.used[appid] = state.used.get(appid, 0) + 1


def admit(state: State, api: str, grant_type: object, appid: str, secret: str,
           wrong_secret: tuple[int, str]) -> None:
    """WeChat's checks before handing out a token, in its order (caller holds state.lock)."""
    if grant_type != "client_credential":
        raise err(40002, "invalid grant_type")
    if not appid:
        raise err(41002, "appid missing")
    if not secret:
        raise err(41004, "appsecret missing")
    count_call(state, appid, api)
    if appid not in state.apps:
        raise err(40013, "invalid appid")
    if fault := take_fault(state, appid, api):
        apply_fault(state, fault)
    if state.apps[appid] != secret:
        raise err(*wrong_secret)


