"""The WeChat token endpoints (cgi-bin/token, cgi-bin/stable_token, WeCom's gettoken, getticket)
and the operations' (openapi/quota/get, clear_quota/v2, openapi/rid/get).

requests' exceptions are translated here. Their messages carry the full URL, and the token URL's
query string carries the secret, so they are replaced by our own message and never chained.

Two rules protect the secret and the schedule:

- **No redirects.** A 3xx is an error: following it would send the request (the stable_token
  body holds the secret) to wherever the answer points.
- **An overall deadline per call** (deadline.py). requests' timeouts bound each read, not the
  call: a server that drips a byte every few seconds would keep it open for good. A timer
  shuts the call's socket down when its deadline passes, so the blocked read returns and the
  call fails as a transient error.

Whether a failed call reached WeChat decides whether it counts against ``daily_budget``: a
call counts once its connection was up (TCP, the proxy's CONNECT and the TLS handshake done),
since from then on WeChat may have received, counted and answered it (a read timeout, a reset
after sending, an HTTP 5xx or a gateway's answer). A name that does not resolve, a refused or
timed-out connection, a failed TLS handshake or proxy CONNECT send no request byte: they are
``UpstreamError(called=False)``, and a night-long egress outage spends none of the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests

from wxtoken import __version__
from wxtoken.config import AppConfig
from wxtoken.deadline import Call, DeadlineAdapter, deadline
from wxtoken.errcodes import (
    FETCH_ERRCODES,
    OPS_ERRCODES,
    ErrorClass,
    business_token_invalid,
    classify,
    rid_of,
)
from wxtoken.errors import UpstreamError
from wxtoken.netcause import describe, where
from wxtoken.record import MAX_TOKEN_LEN
from wxtoken.schedule import RefreshModel, model_of

WECHAT_BASE = "https://api.weixin.qq.com"
WECOM_BASE = "https://qyapi.weixin.qq.com"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
DEFAULT_DEADLINE = 20.0


@dataclass(frozen=True)
class Fetched:
    """A token WeChat handed out."""

    access_token: str
    expires_in: int
    took_ms: int


# -- the client --------------------------------------------------------------------------------
class WeChatClient:
    """Fetches tokens over one pooled, TLS-verifying HTTP session."""

    def __init__(self, api_base: str | None = None, ca_bundle: str | None = None,
                 session: requests.Session | None = None,
                 timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.api_base = api_base
        self.deadline = deadline
        # no single read may outlast the whole call
        self.timeout = (min(timeout[0], deadline), min(timeout[1], deadline))
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"wxtoken/{__version__}"
        adapter = DeadlineAdapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # TLS is always verified; ca_bundle only changes which CAs are trusted. It is passed on
        # every request: a session-level value loses to $REQUESTS_CA_BUNDLE (requests#3829).
        self.verify: str | bool = ca_bundle or True
        self.session.verify = self.verify
        self.session.trust_env = True  # honour HTTPS_PROXY for egress gateways

    def close(self) -> None:
        self.session.close()

    def _base(self, app: AppConfig) -> str:
        if self.api_base:
            return self.api_base
        return WECOM_BASE if app.api == "wecom" else WECHAT_BASE

    def unpublished(self, appid: str) -> bool:
        return False  # an app's token carries no credential to save

    def waiting_for(self, app: AppConfig) -> str | None:
        return None  # an app's token is fetched with its secret alone

    def model(self, app: AppConfig) -> RefreshModel:
        return model_of(app.api)  # token, stable_token or WeCom's gettoken

    def fetch(self, app: AppConfig, force_refresh: bool = False) -> Fetched:
        """Ask WeChat for the app's token; raise UpstreamError (classified) on any failure."""
        base = self._base(app)
        if app.api == "token":
            path = "/cgi-bin/token"
            kwargs: dict[str, Any] = {"params": {
                "grant_type": "client_credential", "appid": app.appid, "secret": app.secret}}
            method = "GET"
        elif app.api == "stable_token":
            path = "/cgi-bin/stable_token"
            kwargs = {"json": {"grant_type": "client_credential", "appid": app.appid,
                               "secret": app.secret, "force_refresh": force_refresh}}
            method = "POST"
        else:
            path = "/cgi-bin/gettoken"
            kwargs = {"params": {"corpid": app.appid, "corpsecret": app.secret}}
            method = "GET"
        started = time.monotonic()
        body = self._request(method, base + path, path, kwargs)
        took_ms = int((time.monotonic() - started) * 1000)
        return _parse_token_body(body, path, took_ms)

    def fetch_ticket(self, app: AppConfig, access_token: str, kind: str) -> Fetched:
        """A jsapi or wx_card ticket, fetched with the app's current token."""
        path = "/cgi-bin/ticket/getticket"
        started = time.monotonic()
        body = self._request("GET", self._base(app) + path, path,
                             {"params": {"access_token": access_token, "type": kind}})
        code = body.get("errcode") if isinstance(body, dict) else None
        if isinstance(code, int) and business_token_invalid(code):
            raise UpstreamError(ErrorClass.TOKEN_INVALID,
                                f"{path} refused the access_token (errcode {code})",
                                errcode=code, errmsg=str(body.get("errmsg"))[:200],
                                rid=rid_of(body.get("errmsg")))
        took_ms = int((time.monotonic() - started) * 1000)
        if isinstance(body, dict) and body.get("errcode") == 0 and "ticket" in body:
            body = {"access_token": body["ticket"], "expires_in": body.get("expires_in")}
        return _parse_token_body(body, path, took_ms)

    # -- the Open Platform ------------------------------------------------------------------------
    def _component_call(self, path: str, body: dict[str, Any],
                        component_token: str | None = None) -> dict[str, Any]:
        """POST to a component endpoint; the answer, or UpstreamError (classified) when it
        carries an errcode."""
        params = {"component_access_token": component_token} if component_token else {}
        answer, code = self._post_json((self.api_base or WECHAT_BASE) + path, path, params,
                                       body)
        if code is None:
            return answer
        errmsg = str(answer.get("errmsg", ""))[:200]
        if business_token_invalid(code) and component_token:
            raise UpstreamError(ErrorClass.TOKEN_INVALID, f"{path} refused the "
                                f"component_access_token (errcode {code})", errcode=code,
                                errmsg=errmsg, rid=rid_of(answer.get("errmsg")))
        kind, hint = classify(code)
        raise UpstreamError(kind, f"{path} returned errcode {code}: {hint}", errcode=code,
                            errmsg=errmsg, rid=rid_of(answer.get("errmsg")))

    def component_token(self, component_appid: str, secret: str, ticket: str) -> Fetched:
        path = "/cgi-bin/component/api_component_token"
        started = time.monotonic()
        answer = self._component_call(path, {"component_appid": component_appid,
                                             "component_appsecret": secret,
                                             "component_verify_ticket": ticket})
        took_ms = int((time.monotonic() - started) * 1000)
        return _parse_token_body({"access_token": answer.get("component_access_token"),
                                  "expires_in": answer.get("expires_in")}, path, took_ms)

    def authorizer_token(self, component_appid: str, component_token: str,
                         authorizer_appid: str, refresh_token: str) -> tuple[Fetched, str | None]:
        """A new authorizer_access_token, and the refresh token WeChat returned with it (None
        when it returned none: the caller keeps the one it has)."""
        path = "/cgi-bin/component/api_authorizer_token"
        started = time.monotonic()
        answer = self._component_call(path, {
            "component_appid": component_appid, "authorizer_appid": authorizer_appid,
            "authorizer_refresh_token": refresh_token}, component_token)
        took_ms = int((time.monotonic() - started) * 1000)
        fetched = _parse_token_body({"access_token": answer.get("authorizer_access_token"),
                                     "expires_in": answer.get("expires_in")}, path, took_ms)
        new = answer.get("authorizer_refresh_token")
        return fetched, new if isinstance(new, str) and new.strip() else None

    def query_auth(self, component_appid: str, component_token: str,
                   code: str) -> dict[str, Any]:
        """api_query_auth: the authorization_info of an authorization code."""
        path = "/cgi-bin/component/api_query_auth"
        answer = self._component_call(path, {"component_appid": component_appid,
                                             "authorization_code": code}, component_token)
        info = answer.get("authorization_info")
        if not isinstance(info, dict):
            raise UpstreamError(ErrorClass.TRANSIENT, f"{path} answered without "
                                "authorization_info")
        return info

    def authorizer_list(self, component_appid: str, component_token: str, offset: int,
                        count: int) -> dict[str, Any]:
        path = "/cgi-bin/component/api_get_authorizer_list"
        return self._component_call(path, {"component_appid": component_appid,
                                           "offset": offset, "count": count}, component_token)

    def openapi(self, app: AppConfig, path: str, body: dict[str, Any],
                access_token: str | None = None,
                params: dict[str, str] | None = None) -> dict[str, Any]:
        """One POST to an operations endpoint (openapi/quota/get, clear_quota/v2,
        openapi/rid/get): the answer when its errcode is 0, else UpstreamError with the errcode,
        the errmsg and WeChat's rid. The token and the secret travel in the query string, which
        no message of ours ever repeats."""
        query = dict(params or {})
        if access_token is not None:
            query["access_token"] = access_token
        answer, code = self._post_json(self._base(app) + path, path, query, body)
        if code is None:
            return answer
        if business_token_invalid(code):
            kind = ErrorClass.TOKEN_INVALID
        elif code in (-1, 45011):
            kind = ErrorClass.TRANSIENT
        elif code == 45009:
            kind = ErrorClass.QUOTA_EXHAUSTED
        else:
            kind = ErrorClass.PERMANENT
        # the token endpoints' hints hold for the same errcode here (40164: the IP whitelist)
        hint = OPS_ERRCODES.get(code) or (classify(code)[1] if code in FETCH_ERRCODES
                                          else "see WeChat's global error codes")
        raise UpstreamError(kind, f"{path} returned errcode {code}: {hint}", errcode=code,
                            errmsg=str(answer.get("errmsg", ""))[:200],
                            rid=rid_of(answer.get("errmsg")))

    def token_accepted(self, app: AppConfig, access_token: str) -> bool:
        """Whether WeChat still accepts ``access_token``: one GET of cgi-bin/getcallbackip, a
        business API with its own daily quota (10,000 calls for an Official Account), which costs
        none of cgi-bin/token's. False for 40001/42001/40014 (refused, or retired by a newer
        fetch); UpstreamError for any other answer (nothing is known then)."""
        path = "/cgi-bin/getcallbackip"
        answer = self._request("GET", self._base(app) + path, path,
                               {"params": {"access_token": access_token}})
        if not isinstance(answer, dict):
            raise UpstreamError(ErrorClass.TRANSIENT, f"unexpected response from {path}")
        code = answer.get("errcode", 0)
        if code in (0, None) and not isinstance(code, bool):
            return True
        if isinstance(code, int) and not isinstance(code, bool) and business_token_invalid(code):
            return False
        raise UpstreamError(ErrorClass.TRANSIENT, f"{path} returned errcode {code}",
                            errcode=code if isinstance(code, int) else None,
                            errmsg=str(answer.get("errmsg", ""))[:200])

    def _post_json(self, url: str, path: str, params: dict[str, str], body: dict[str, Any]
                   ) -> tuple[dict[str, Any], int | None]:
        """POST a JSON body: the answer object and its errcode (None for success); a transient
        UpstreamError when the answer is not an object or its errcode not a number."""
        answer = self._request("POST", url, path, {"params": params, "json": body})
        if not isinstance(answer, dict):
            raise UpstreamError(ErrorClass.TRANSIENT, f"unexpected response from {path}")
        code = answer.get("errcode", 0)
        if code is None or (code == 0 and not isinstance(code, bool)):
            return answer, None
        if not isinstance(code, int) or isinstance(code, bool):
            raise UpstreamError(ErrorClass.TRANSIENT, f"unexpected errcode from {path}")
        return answer, code

    def _request(self, method: str, url: str, path: str, kwargs: dict[str, Any]) -> Any:
        with deadline(self.deadline) as call:
            try:
                return self._send(method, url, path, kwargs, call)
            except UpstreamError as exc:
                if call.expired:
                    raise UpstreamError(ErrorClass.TRANSIENT,
                                        f"no complete answer from {path} within "
                                        f"{self.deadline:g} s ({where(url)})",
                                        called=call.connected) from None
                raise UpstreamError(exc.kind, str(exc), exc.errcode, exc.errmsg, exc.rid,
                                    called=call.connected) from None

    def _send(self, method: str, url: str, path: str, kwargs: dict[str, Any],
              call: Call) -> Any:
        try:
            resp = self.session.request(method, url, timeout=self.timeout, verify=self.verify,
                                        allow_redirects=False, **kwargs)
        except requests.exceptions.RequestException as exc:
            # requests' messages carry the URL (and the secret in its query): ours instead
            raise UpstreamError(ErrorClass.TRANSIENT,
                                f"calling {path}: {describe(exc, url, call.connected)}") from None
        with resp:
            if resp.is_redirect or 300 <= resp.status_code < 400:
                raise UpstreamError(ErrorClass.PERMANENT,
                                    f"HTTP {resp.status_code} redirect from {path} refused: "
                                    "token endpoints never follow redirects (check api_base)")
            if resp.status_code >= 500:
                raise UpstreamError(ErrorClass.TRANSIENT, f"HTTP {resp.status_code} from {path}")
            if resp.status_code != 200:
                raise UpstreamError(ErrorClass.PERMANENT,
                                    f"HTTP {resp.status_code} from {path} (check api_base)")
            try:
                return resp.json()
            except (ValueError, requests.exceptions.RequestException):
                raise UpstreamError(ErrorClass.TRANSIENT,
                                    f"non-JSON response from {path}") from None


def _parse_token_body(body: Any, path: str, took_ms: int) -> Fetched:
    if not isinstance(body, dict):
        raise UpstreamError(ErrorClass.TRANSIENT, f"unexpected response from {path}")
    errcode = body.get("errcode", 0)
    if errcode not in (0, None):
        errmsg = str(body.get("errmsg", ""))[:200]
        if not isinstance(errcode, int):
            raise UpstreamError(ErrorClass.TRANSIENT, f"unexpected errcode from {path}")
        kind, hint = classify(errcode)
        raise UpstreamError(kind, f"{path} returned errcode {errcode}: {hint}",
                            errcode=errcode, errmsg=errmsg, rid=rid_of(body.get("errmsg")))
    token = body.get("access_token")
    expires_in = body.get("expires_in")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN:
        raise UpstreamError(ErrorClass.TRANSIENT, f"{path} returned no usable access_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise UpstreamError(ErrorClass.TRANSIENT, f"{path} returned no usable expires_in")
    return Fetched(access_token=token, expires_in=expires_in, took_ms=took_ms)
