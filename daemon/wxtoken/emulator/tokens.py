"""The token endpoints: cgi-bin/token, cgi-bin/stable_token, WeCom's gettoken and getticket."""

from __future__ import annotations

import secrets
from typing import Any

from wxtoken.emulator.state import (
    Issued,
    Stable,
    State,
    admit,
    apply_fault,
    check_token,
    count_call,
    err,
    issue,
    take_fault,
)


def token(state: State, query: dict[str, str]) -> dict[str, Any]:
    appid = query.get("appid", "")
    with state.lock:
        admit(state, "token", query.get("grant_type"), appid, query.get("secret", ""),
               (40001, "invalid credential, access_token is invalid or not latest"))
        now = state.clock()
        key = ("token", appid)
        previous = state.latest.get(key)
        if previous is not None:
            previous.expires_at = min(previous.expires_at, now + state.settings.overlap)
        issued = state.latest[key] = issue(state, key, appid, now)
        return {"access_token": issued.token, "expires_in": state.settings.token_ttl}


def stable_token(state: State, body: dict[str, Any]) -> dict[str, Any]:
    appid = str(body.get("appid", ""))
    force = body.get("force_refresh") is True
    with state.lock:
        admit(state, "stable_token", body.get("grant_type"), appid,
               str(body.get("secret", "")), (40125, "invalid appsecret"))
        now = state.clock()
        st = state.stable.setdefault(appid, Stable())
        cur = st.current
        s = state.settings
        if force:
            if now - st.last_force < s.force_spacing:
                raise err(45011, "api minute-quota reach limit (force_refresh spacing)")
            if st.forces_today >= s.force_per_day:
                raise err(45009, "reach max api daily quota limit (force_refresh)")
            st.last_force, st.forces_today = now, st.forces_today + 1
            if cur is not None:
                cur.expires_at = min(cur.expires_at, now + s.overlap)
        elif cur is not None and now < cur.expires_at - s.stable_window:
            return {"access_token": cur.token, "expires_in": int(cur.expires_at - now)}
        # no token yet, inside the last window (old one stays valid to its end), or forced
        st.current = issue(state, ("stable_token", appid), appid, now)
        return {"access_token": st.current.token, "expires_in": s.token_ttl}


def ticket(state: State, query: dict[str, str]) -> dict[str, Any]:
    kind = query.get("type", "")
    code = check_token(state, query.get("access_token", ""), count=False)
    if code:
        raise err(code, "access_token expired" if code == 42001 else
                   "invalid credential, access_token is invalid or not latest")
    if kind not in ("jsapi", "wx_card"):
        raise err(40097, "invalid args")
    with state.lock:
        appid = state.tokens[query["access_token"]].key[1]
        count_call(state, appid, f"ticket_{kind}")
        if fault := take_fault(state, appid, f"ticket_{kind}"):
            apply_fault(state, fault)
        now = state.clock()
        key = (f"ticket_{kind}", appid)
        previous = state.latest.get(key)
        if previous is not None:
            previous.expires_at = min(previous.expires_at, now + state.settings.overlap)
        ticket = f"tk_{secrets.token_urlsafe(64)}"
        issued = state.latest[key] = Issued(ticket, key, now, now + state.settings.token_ttl)
        state.tickets[ticket] = issued
        return {"errcode": 0, "errmsg": "ok", "ticket": ticket,
                "expires_in": state.settings.token_ttl}


def wecom(state: State, query: dict[str, str]) -> dict[str, Any]:
    corpid, secret = query.get("corpid", ""), query.get("corpsecret", "")
    if not corpid:
        raise err(41002, "corpid missing")
    if not secret:
        raise err(41004, "corpsecret missing")
    with state.lock:
        count_call(state, corpid, "wecom")
        if corpid not in state.corps:
            raise err(40013, "invalid corpid")
        if fault := take_fault(state, corpid, "wecom"):
            if fault.mode == "ip":
                raise err(60020, "not allow to access from your ip")
            apply_fault(state, fault)
        if secret not in state.corps[corpid]:
            raise err(40001, "invalid secret")
        now = state.clock()
        key = ("wecom", f"{corpid}:{secret}")
        cur = state.latest.get(key)
        if cur is None or now >= cur.expires_at:
            cur = state.latest[key] = issue(state, key, corpid, now)
        return {"errcode": 0, "errmsg": "ok", "access_token": cur.token,
                "expires_in": int(cur.expires_at - now)}


