"""The operations endpoints: openapi/quota/get, clear_quota (v1, with a token) and clear_quota/v2
(with the AppSecret), openapi/rid/get; and the rids every error answer carries.

WeChat appends `` rid: <id>`` to the errmsg of a failed call and keeps what it saw for 7 days;
``rid/get`` answers with the request and the response for a rid of the caller's own account.
Both clear_quota calls share one count of 10 resets a month (Asia/Shanghai) per appid, and a
reset empties the account's daily counts.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from wxtoken.emulator.state import (
    State,
    apply_fault,
    check_token,
    err,
    roll_day,
    take_fault,
)

SHANGHAI = timezone(timedelta(hours=8))
RID_DAYS = 7
MAX_RIDS = 20_000
TOKEN_PATHS = {"/cgi-bin/token": "token", "/cgi-bin/stable_token": "stable_token",
               "/cgi-bin/ticket/getticket": "ticket"}
# business APIs the emulator knows the quota of (WeChat answers 76021 for a path it does not
# have); each has its own daily limit and count
BUSINESS_PATHS = {"/cgi-bin/get_api_domain_ip": 10_000, "/cgi-bin/getcallbackip": 10_000,
                  "/cgi-bin/message/custom/send": 500_000,
                  "/cgi-bin/message/template/send": 100_000,
                  "/cgi-bin/user/info": 500_000, "/cgi-bin/menu/create": 1_000,
                  "/wxa/getwxacodeunlimit": 5_000_000}
RID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}$")


@dataclass
class Seen:
    """What WeChat keeps of one failed call, for rid/get."""

    appid: str
    invoke_time: int
    cost_in_ms: int
    request_url: str
    request_body: str
    response_body: str


def month(ts: float) -> str:
    return datetime.fromtimestamp(ts, SHANGHAI).strftime("%Y-%m")


def new_rid(state: State) -> str:
    return f"{int(state.clock()) & 0xFFFFFFFF:08x}-{secrets.token_hex(4)}-{secrets.token_hex(4)}"


def remember(state: State, appid: str, query: str, body: bytes, answer: dict[str, Any],
             took_ms: int) -> None:
    """Give a failed answer its rid (in errmsg, as WeChat does) and keep the call for rid/get;
    ``appid`` is empty when the call named no account (nobody may look it up then)."""
    rid = new_rid(state)
    answer["errmsg"] = f"{answer.get('errmsg', '')} rid: {rid}"
    with state.lock:
        state.rids[rid] = Seen(appid, int(state.clock()), took_ms, query,
                               body.decode(errors="replace"), json.dumps(answer))
        while len(state.rids) > MAX_RIDS:
            del state.rids[next(iter(state.rids))]


def _caller(state: State, token: str, api: str) -> str:
    """The appid of a valid token (40001/42001 otherwise); faults for ``api`` apply."""
    code = check_token(state, token, count=False)
    if code == 42001:
        raise err(42001, "access_token expired")
    if code:
        raise err(40001, "invalid credential, access_token is invalid or not latest")
    with state.lock:
        appid = state.tokens[token].key[1]
        if fault := take_fault(state, appid, api):
            apply_fault(state, fault)
        return appid


def quota_get(state: State, query: dict[str, str], body: Any) -> dict[str, Any]:
    appid = _caller(state, query.get("access_token", ""), "quota_get")
    path = body.get("cgi_path") if isinstance(body, dict) else None
    if not isinstance(path, str) or not path:
        raise err(41001, "cgi_path missing")
    with state.lock:
        roll_day(state)
        if path in TOKEN_PATHS:
            limit = state.settings.daily_quota
            used = state.used.get(appid, 0)
        elif path in BUSINESS_PATHS:
            limit = BUSINESS_PATHS[path]
            used = state.business.get(appid, {}).get(path, 0)
        else:
            raise err(76021, "cgi_path not found, please check")
        return {"errcode": 0, "errmsg": "ok",
                "quota": {"daily_limit": limit, "used": used, "remain": max(0, limit - used)}}


def _reset(state: State, appid: str) -> dict[str, Any]:
    """One quota reset of ``appid`` (caller holds state.lock)."""
    key = (appid, month(state.clock()))
    if state.resets.get(key, 0) >= state.settings.resets_per_month:
        raise err(48006, "forbid to clear quota because of reaching the limit")
    state.resets[key] = state.resets.get(key, 0) + 1
    state.used.pop(appid, None)  # the calls made stay in the emulator's stats
    state.business.pop(appid, None)
    return {"errcode": 0, "errmsg": "ok"}


def clear_quota_v1(state: State, query: dict[str, str], body: Any) -> dict[str, Any]:
    caller = _caller(state, query.get("access_token", ""), "clear_quota")
    appid = body.get("appid") if isinstance(body, dict) else None
    if not isinstance(appid, str) or not appid:
        raise err(41002, "appid missing")
    if appid != caller:
        raise err(40013, "invalid appid")
    with state.lock:
        return _reset(state, appid)


def clear_quota_v2(state: State, query: dict[str, str], body: Any) -> dict[str, Any]:
    """The documented call has appid and appsecret as URL parameters; newer pages show them in
    the body: either is accepted."""
    fields = body if isinstance(body, dict) else {}
    appid = str(query.get("appid") or fields.get("appid") or "")
    secret = str(query.get("appsecret") or fields.get("appsecret") or "")
    if not appid:
        raise err(41002, "appid missing")
    if not secret:
        raise err(41004, "appsecret missing")
    with state.lock:
        if appid not in state.apps:
            raise err(40013, "invalid appid")
        if fault := take_fault(state, appid, "clear_quota"):
            apply_fault(state, fault)
        if state.apps[appid] != secret:
            raise err(40125, "invalid appsecret")
        return _reset(state, appid)


def rid_get(state: State, query: dict[str, str], body: Any) -> dict[str, Any]:
    appid = _caller(state, query.get("access_token", ""), "rid_get")
    rid = body.get("rid") if isinstance(body, dict) else None
    if not isinstance(rid, str) or not RID_RE.match(rid):
        raise err(76002, "rid is error")
    with state.lock:
        seen = state.rids.get(rid)
        if seen is None or state.clock() - seen.invoke_time > RID_DAYS * 86400:
            raise err(76001, "rid not found")
        if seen.appid != appid:
            raise err(76003, "could not query this rid,no permission")
        return {"errcode": 0, "errmsg": "ok", "request": {
            "invoke_time": seen.invoke_time, "cost_in_ms": seen.cost_in_ms,
            "request_url": seen.request_url, "request_body": seen.request_body,
            "response_body": seen.response_body, "client_ip": "127.0.0.1"}}


def count_business(state: State, appid: str, path: str) -> None:
    """A business API call that the token was good for, counted for quota/get."""
    with state.lock:
        roll_day(state)
        per = state.business.setdefault(appid, {})
        per[path] = per.get(path, 0) + 1
