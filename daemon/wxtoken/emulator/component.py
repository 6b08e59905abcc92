"""The Open Platform (第三方平台) side of the emulator.

- ``POST /cgi-bin/component/api_component_token`` {component_appid, component_appsecret,
  component_verify_ticket}: a ticket pushed within ``ticket_ttl`` (12 h) is good, an older one is
  61005, an unknown one 61006; each call issues a new token (the previous one lives ``overlap``).
- ``POST /cgi-bin/component/api_query_auth?component_access_token=`` {component_appid,
  authorization_code}: the code of an ``authorized`` event, once (61009 otherwise).
- ``POST /cgi-bin/component/api_authorizer_token?component_access_token=`` {component_appid,
  authorizer_appid, authorizer_refresh_token}: rotates the refresh token on every call; the
  previous one stays valid until the new one is first used; any other is 61023.
- ``POST /cgi-bin/component/api_get_authorizer_list?component_access_token=`` {component_appid,
  offset, count (at most 500)}: every authorizer with its current refresh token.

Faults: ``api`` ``component_token`` (the component's appid), ``query_auth`` (the authorizer's
appid, when the code is known), ``authorizer_token`` (the authorizer's), ``authorizer_list``
(the component's). ``lost`` carries the request out (the code is used, the authorization
stored; the refresh token rotated) and then resets the connection: WeChat did it, the answer
never arrived. Every other mode acts before anything is done.

A component is registered with ``POST /_emu/components`` (or :meth:`Platforms.add`), with its
callback URL: a pusher thread POSTs an encrypted ``component_verify_ticket`` there every
``push_every`` seconds, and ``authorized`` / ``unauthorized`` events when
``POST /_emu/authorize`` / ``unauthorize`` simulate a merchant.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from wxtoken.component.crypto import MessageCrypto
from wxtoken.emulator.state import (
    Fault,
    Issued,
    Reply,
    State,
    apply_fault,
    check_token,
    count_call,
    err,
    issue,
    take_fault,
)

MAX_LIST = 500


def _before(state: State, fault: Fault | None) -> Fault | None:
    """A fault that acts before the request is carried out acts now; a ``lost`` one is
    returned, for ``_after``."""
    if fault is not None and fault.mode != "lost":
        apply_fault(state, fault)
    return fault


def _after(fault: Fault | None, answer: dict[str, Any]) -> dict[str, Any]:
    """The answer of a request carried out, unless a ``lost`` fault drops it (the connection
    is reset instead)."""
    if fault is not None and fault.mode == "lost":
        raise Reply(action="reset")
    return answer


@dataclass
class Authorizer:
    """One merchant's authorization of a component."""

    appid: str
    latest: str  # the refresh token last issued
    older: str | None = None  # the one used to get it: valid until ``latest`` is first used
    auth_time: int = 0
    listed: str | None = None  # what the authorizer list says instead of ``latest`` (broken)


@dataclass
class Component:
    appid: str
    secret: str
    msg_token: str
    encoding_aes_key: str
    callback: str = ""  # where tickets and events are pushed
    push_every: float = 600.0
    pushing: bool = True
    tickets: dict[str, float] = field(default_factory=dict)  # ticket -> pushed at
    authorizers: dict[str, Authorizer] = field(default_factory=dict)
    codes: dict[str, tuple[str, float]] = field(default_factory=dict)  # code -> (appid, expiry)
    pushed: int = 0
    push_failures: int = 0


def _new_refresh_token() -> str:
    return "refreshtoken@@@" + secrets.token_urlsafe(32)


class Platforms:
    """Every component the emulator knows, and the pusher threads."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.components: dict[str, Component] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.session = requests.Session()

    # -- setup (control endpoints and in-process helpers) -----------------------------------------
    def add(self, appid: str, secret: str, msg_token: str, encoding_aes_key: str,
            callback: str = "", push_every: float = 600.0) -> Component:
        comp = Component(appid, secret, msg_token, encoding_aes_key, callback, push_every)
        with self.state.lock:
            self.components[appid] = comp
        if callback:
            thread = threading.Thread(target=self._pusher, args=(comp,), daemon=True,
                                      name=f"emu-pusher-{appid}")
            self._threads.append(thread)
            thread.start()
        return comp

    def stop(self) -> None:
        self._stop.set()
        self.session.close()

    def new_ticket(self, comp: Component) -> str:
        ticket = "ticket@@@" + secrets.token_urlsafe(48)
        with self.state.lock:
            comp.tickets[ticket] = self.state.clock()
        return ticket

    def authorize(self, component_appid: str, authorizer_appid: str,
                  push: bool = True) -> str:
        """A merchant authorizes the component: an authorization code (pushed as an
        ``authorized`` event when the component has a callback)."""
        comp = self.components[component_appid]
        code = "queryauthcode@@@" + secrets.token_urlsafe(32)
        with self.state.lock:
            existed = authorizer_appid in comp.authorizers
            if not existed:
                comp.authorizers[authorizer_appid] = Authorizer(
                    authorizer_appid, _new_refresh_token(), auth_time=int(self.state.clock()))
            else:  # an authorization again mends whatever was broken
                comp.authorizers[authorizer_appid].listed = None
            comp.codes[code] = (authorizer_appid, self.state.clock() + 3600)
        if push and comp.callback:
            self.push(comp, {"InfoType": "updateauthorized" if existed else "authorized",
                             "AuthorizerAppid": authorizer_appid, "AuthorizationCode": code,
                             "AuthorizationCodeExpiredTime": str(int(time.time()) + 3600),
                             "PreAuthCode": "preauthcode@@@x"})
        return code

    def unauthorize(self, component_appid: str, authorizer_appid: str,
                    push: bool = True) -> None:
        comp = self.components[component_appid]
        with self.state.lock:
            comp.authorizers.pop(authorizer_appid, None)
        if push and comp.callback:
            self.push(comp, {"InfoType": "unauthorized", "AuthorizerAppid": authorizer_appid})

    def kill_refresh_tokens(self, component_appid: str, authorizer_appid: str) -> str:
        """Every refresh token of the authorizer stops working (as WeChat sometimes does);
        the authorizer list holds the new one. Returns it."""
        comp = self.components[component_appid]
        with self.state.lock:
            auth = comp.authorizers[authorizer_appid]
            auth.latest, auth.older = _new_refresh_token(), None
            return auth.latest

    def break_authorizer(self, component_appid: str, authorizer_appid: str) -> None:
        """Every refresh token the platform could know stops working, also the one the
        authorizer list gives: only a new authorization (authorize()) helps."""
        comp = self.components[component_appid]
        with self.state.lock:
            auth = comp.authorizers[authorizer_appid]
            auth.latest, auth.older = _new_refresh_token(), None
            auth.listed = _new_refresh_token()

    # -- pushing --------------------------------------------------------------------------------
    def message(self, comp: Component, fields: dict[str, str],
                created: int | str | None = None) -> str:
        """The XML of an event; ``created``: its CreateTime (now unless given: a late push, or
        one that is not a time)."""
        inner = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items())
        when = int(time.time()) if created is None else created
        return (f"<xml><AppId><![CDATA[{comp.appid}]]></AppId><CreateTime>{when}"
                f"</CreateTime>{inner}</xml>")

    def sealed(self, comp: Component, xml: str) -> tuple[dict[str, str], bytes]:
        """(query, body) of a callback POST carrying ``xml``, as WeChat sends it."""
        crypto = MessageCrypto(comp.msg_token, comp.encoding_aes_key, comp.appid)
        timestamp, nonce = str(int(time.time())), str(secrets.randbelow(10**10))
        encrypt, signature = crypto.seal(xml.encode(), timestamp, nonce)
        body = (f"<xml><AppId><![CDATA[{comp.appid}]]></AppId><Encrypt><![CDATA[{encrypt}]]>"
                "</Encrypt></xml>").encode()
        return {"timestamp": timestamp, "nonce": nonce, "encrypt_type": "aes",
                "msg_signature": signature}, body

    def push(self, comp: Component, fields: dict[str, str],
             created: int | str | None = None) -> bool:
        """POST an event to the component's callback (``created``: its CreateTime, as for
        ``message``); whether it was answered ``success``."""
        query, body = self.sealed(comp, self.message(comp, fields, created))
        try:
            resp = self.session.post(comp.callback, params=query, data=body, timeout=5,
                                     allow_redirects=False)
            ok = resp.status_code == 200 and resp.text == "success"
        except requests.RequestException:
            ok = False
        with self.state.lock:
            if ok:
                comp.pushed += 1
            else:
                comp.push_failures += 1
        return ok

    def push_ticket(self, comp: Component) -> bool:
        return self.push(comp, {"InfoType": "component_verify_ticket",
                                "ComponentVerifyTicket": self.new_ticket(comp)})

    def _pusher(self, comp: Component) -> None:
        while not self._stop.is_set():
            if comp.pushing:
                self.push_ticket(comp)
            if self._stop.wait(comp.push_every):
                return

    # -- the API --------------------------------------------------------------------------------
    def _component(self, appid: object) -> Component:
        comp = self.components.get(str(appid or ""))
        if comp is None:
            raise err(61011, "invalid component")
        return comp

    def _caller(self, query: dict[str, str], comp: Component) -> None:
        code = check_token(self.state, query.get("component_access_token", ""), count=False)
        if code:
            raise err(42001 if code == 42001 else 40001,
                      "access_token expired" if code == 42001 else
                      "invalid credential, access_token is invalid or not latest")
        with self.state.lock:
            issued = self.state.tokens[query["component_access_token"]]
            if issued.key != ("component", comp.appid):
                raise err(40001, "invalid credential, access_token is invalid or not latest")

    def component_token(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        comp = self._component(body.get("component_appid"))
        state = self.state
        with state.lock:
            count_call(state, comp.appid, "component_token")
            fault = _before(state, take_fault(state, comp.appid, "component_token"))
            if body.get("component_appsecret") != comp.secret:
                raise err(40125, "invalid appsecret")
            ticket = body.get("component_verify_ticket")
            pushed = comp.tickets.get(str(ticket or ""))
            now = state.clock()
            if pushed is None:
                raise err(61006, "component ticket is invalid")
            if now - pushed > state.settings.ticket_ttl:
                raise err(61005, "component ticket is expired")
            key = ("component", comp.appid)
            previous = state.latest.get(key)
            if previous is not None:
                previous.expires_at = min(previous.expires_at, now + state.settings.overlap)
            issued = state.latest[key] = issue(state, key, comp.appid, now)
            return _after(fault, {"component_access_token": issued.token,
                                  "expires_in": state.settings.token_ttl})

    def _authorizer_token(self, comp: Component, appid: str, now: float) -> Issued:
        key = ("authorizer", appid)
        previous = self.state.latest.get(key)
        if previous is not None:
            previous.expires_at = min(previous.expires_at, now + self.state.settings.overlap)
        issued = self.state.latest[key] = issue(self.state, key, appid, now)
        return issued

    def query_auth(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        comp = self._component(body.get("component_appid"))
        self._caller(query, comp)
        state = self.state
        with state.lock:
            count_call(state, comp.appid, "query_auth")
            code = str(body.get("authorization_code") or "")
            known = comp.codes.get(code)
            fault = _before(state, take_fault(state, known[0] if known else comp.appid,
                                              "query_auth"))
            found = comp.codes.pop(code, None)
            now = state.clock()
            if found is None or found[1] < now:
                raise err(61009, "code is invalid")
            auth = comp.authorizers.get(found[0])
            if auth is None:
                raise err(61003, "component is not authorized by this account")
            issued = self._authorizer_token(comp, auth.appid, now)
            # the current refresh token (a new authorization keeps the rotation going)
            return _after(fault, {"authorization_info": {
                "authorizer_appid": auth.appid, "authorizer_access_token": issued.token,
                "expires_in": state.settings.token_ttl, "authorizer_refresh_token": auth.latest,
                "func_info": [{"funcscope_category": {"id": 1}}]}})

    def authorizer_token(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        comp = self._component(body.get("component_appid"))
        self._caller(query, comp)
        state = self.state
        appid = str(body.get("authorizer_appid") or "")
        with state.lock:
            count_call(state, appid, "authorizer_token")
            fault = _before(state, take_fault(state, appid, "authorizer_token"))
            auth = comp.authorizers.get(appid)
            if auth is None:
                raise err(61003, "component is not authorized by this account")
            given = str(body.get("authorizer_refresh_token") or "")
            if given not in (auth.latest, auth.older):
                raise err(61023, "refresh_token is invalid")
            # every call rotates: the token used stays valid until the new one is first used
            # (using the new one retires it; using it again retires the unused new one)
            auth.older, auth.latest = given, _new_refresh_token()
            now = state.clock()
            issued = self._authorizer_token(comp, appid, now)
            return _after(fault, {"authorizer_access_token": issued.token,
                                  "expires_in": state.settings.token_ttl,
                                  "authorizer_refresh_token": auth.latest})

    def authorizer_list(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        comp = self._component(body.get("component_appid"))
        self._caller(query, comp)
        offset, count = body.get("offset", 0), body.get("count", MAX_LIST)
        if not isinstance(offset, int) or not isinstance(count, int) or offset < 0 \
                or not 0 < count <= MAX_LIST:
            raise err(40097, "invalid args")
        with self.state.lock:
            count_call(self.state, comp.appid, "authorizer_list")
            fault = _before(self.state, take_fault(self.state, comp.appid, "authorizer_list"))
            items = sorted(comp.authorizers.values(), key=lambda a: a.appid)
            page = items[offset:offset + count]
            return _after(fault, {"total_count": len(items), "list": [
                {"authorizer_appid": a.appid, "refresh_token": a.listed or a.latest,
                 "auth_time": a.auth_time} for a in page]})

    def stats(self) -> dict[str, Any]:
        with self.state.lock:
            return {appid: {"authorizers": len(c.authorizers), "pushed": c.pushed,
                            "push_failures": c.push_failures, "tickets": len(c.tickets)}
                    for appid, c in self.components.items()}


ROUTES = {
    "/cgi-bin/component/api_component_token": "component_token",
    "/cgi-bin/component/api_query_auth": "query_auth",
    "/cgi-bin/component/api_authorizer_token": "authorizer_token",
    "/cgi-bin/component/api_get_authorizer_list": "authorizer_list",
}
