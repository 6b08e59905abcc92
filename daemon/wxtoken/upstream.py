"""The WeChat token endpoints: cgi-bin/token, cgi-bin/stable_token and WeCom's gettoken.

requests' exceptions are translated here. Their messages carry the full URL, and the token URL's
query string carries the secret, so they are replaced by our own message and never chained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests

from wxtoken import __version__
from wxtoken.config import AppConfig
from wxtoken.errcodes import ErrorClass, business_token_invalid, classify
from wxtoken.errors import UpstreamError
from wxtoken.record import MAX_TOKEN_LEN

WECHAT_BASE = "https://api.weixin.qq.com"
WECOM_BASE = "https://qyapi.weixin.qq.com"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class Fetched:
    """A token WeChat handed out."""

    access_token: str
    expires_in: int
    took_ms: int


class WeChatClient:
    """Fetches tokens over one pooled, TLS-verifying HTTP session."""

    def __init__(self, api_base: str | None = None, ca_bundle: str | None = None,
                 session: requests.Session | None = None,
                 timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT)) -> None:
        self.api_base = api_base
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"wxtoken/{__version__}"
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
                                errcode=code, errmsg=str(body.get("errmsg"))[:200])
        took_ms = int((time.monotonic() - started) * 1000)
        if isinstance(body, dict) and body.get("errcode") == 0 and "ticket" in body:
            body = {"access_token": body["ticket"], "expires_in": body.get("expires_in")}
        return _parse_token_body(body, path, took_ms)

    def _request(self, method: str, url: str, path: str, kwargs: dict[str, Any]) -> Any:
        try:
            resp = self.session.request(method, url, timeout=self.timeout, verify=self.verify,
                                        **kwargs)
        except requests.exceptions.SSLError:
            raise UpstreamError(ErrorClass.TRANSIENT,
                                f"TLS verification failed for {path} (check ca_bundle)") from None
        except requests.exceptions.Timeout:
            raise UpstreamError(ErrorClass.TRANSIENT, f"timeout calling {path}") from None
        except requests.exceptions.ConnectionError:
            raise UpstreamError(ErrorClass.TRANSIENT,
                                f"connection failed or reset calling {path}") from None
        except requests.exceptions.RequestException as exc:
            raise UpstreamError(ErrorClass.TRANSIENT,
                                f"{type(exc).__name__} calling {path}") from None
        with resp:
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
                            errcode=errcode, errmsg=errmsg)
    token = body.get("access_token")
    expires_in = body.get("expires_in")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LEN:
        raise UpstreamError(ErrorClass.TRANSIENT, f"{path} returned no usable access_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise UpstreamError(ErrorClass.TRANSIENT, f"{path} returned no usable expires_in")
    return Fetched(access_token=token, expires_in=expires_in, took_ms=took_ms)
