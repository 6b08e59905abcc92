"""WeChat's quota tools, run by the daemon (asked over the control socket, or on a schedule).

- :meth:`Operations.quota`: ``openapi/quota/get`` with the app's current token: the daily_limit,
  used and remain of one API path.
- :meth:`Operations.rid`: ``openapi/rid/get``: what WeChat saw of a failed call (WeChat keeps
  rids 7 days). Secrets, tokens and tickets in the answer are masked before anyone sees it.
- :meth:`Operations.clear_quota`: ``clear_quota/v2`` with the appid and the secret, so it works
  when no token can be fetched any more; for a privileged peer only (the control endpoint checks
  it), at most :data:`RESETS_PER_MONTH` a month per appid. The count is kept in
  ``<state_dir>/.quota_resets.json`` (and in Redis on a fleet, fleet-wide); resets made elsewhere
  (the console, the v1 ``clear_quota`` call, another tool) are seen only when WeChat answers
  48006, which sets the month's count to the limit.
- :meth:`Operations.watch`: every ``quota_watch`` path of an app, polled every
  :func:`watch_interval` seconds; the last figures go to the metrics file.

A token WeChat refuses (40001/42001) is reported as invalid (a passive refresh), and the call is
made once more with the new one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from wxtoken.clock import SHANGHAI, next_wechat_month, wechat_day, wechat_month
from wxtoken.config import AppConfig, Config
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import TokenUnavailable, UpstreamError, WxtokenError
from wxtoken.logs import get_logger, mask, scrub
from wxtoken.record import load_record, token_path
from wxtoken.status import LastResult, read_status, status_path
from wxtoken.store import atomic_write

if TYPE_CHECKING:
    from wxtoken.fleet.shared import Fleet
    from wxtoken.passive import Forced
    from wxtoken.upstream import WeChatClient

RESETS_PER_MONTH = 10  # clear_quota and clear_quota/v2 together, per account (WeChat's rule)
RESETS_FILE = ".quota_resets.json"  # app names have no dots: never an app's file
QUOTA_GET = "/cgi-bin/openapi/quota/get"
RID_GET = "/cgi-bin/openapi/rid/get"
CLEAR_QUOTA = "/cgi-bin/clear_quota/v2"
ASKS_PER_MINUTE = 20  # quota and rid lookups asked over the socket, per app
RID_RE = re.compile(r"[0-9A-Za-z-]{6,64}")  # fullmatch
# values masked in what rid/get returns: the call it describes may have carried them
_HIDDEN = (r"secret|password|session_key|encoding_aes_key|signature|js_code|auth_code|"
           r"authorization_code")
_MASKED = r"token|ticket"
_SECRET_KEY = re.compile(rf"(?i)([\"']?[a-z_]*(?:{_HIDDEN})[a-z_]*[\"']?\s*[=:]\s*[\"']?)"
                         r"([^&\"'\s,}]+)")
_TOKEN_KEY = re.compile(rf"(?i)([\"']?[a-z_]*(?:{_MASKED})[a-z_]*[\"']?\s*[=:]\s*[\"']?)"
                        r"([^&\"'\s,}]+)")
_SECRET_NAME = re.compile(rf"(?i)(?:{_HIDDEN})")
_TOKEN_NAME = re.compile(rf"(?i)(?:{_MASKED})")

Force = Callable[[str, str | None, bool], "Forced | None"]


def watch_interval(config: Config) -> float:
    """How often quota_watch paths are polled: 15 minutes, or a quarter of refresh_interval when
    that is shorter (scaled-down tests)."""
    return max(1.0, min(900.0, config.refresh_interval / 4))


def redact(value: Any, key: str = "") -> Any:
    """``value`` with every secret-like value (and one-time login codes) replaced by ***, and
    every token or ticket by its masked prefix: in query strings, in JSON (also JSON inside a
    string, as in a response body) and in nested objects; the daemon's own secrets are removed
    whatever their key."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if not isinstance(value, str):
        return value
    if key and _SECRET_NAME.search(key):
        return "***"
    if key and _TOKEN_NAME.search(key):
        return mask(value)
    stripped = value.strip()
    if stripped[:1] in ("{", "["):
        try:
            doc = json.loads(stripped)
        except ValueError:
            pass
        else:
            return json.dumps(redact(doc), ensure_ascii=False)
    text = _SECRET_KEY.sub(lambda m: m.group(1) + "***", value)
    text = _TOKEN_KEY.sub(lambda m: m.group(1) + mask(m.group(2)), text)
    return scrub(text)


class OpError(WxtokenError):
    """An operation refused or failed: the control endpoint's status, class and answer."""

    def __init__(self, status: int, error_class: str, message: str, **extra: Any) -> None:
        self.status = status
        self.error_class = error_class
        self.extra = extra
        super().__init__(message)

    def answer(self) -> dict[str, Any]:
        return {"error": str(self), "error_class": self.error_class,
                **{k: v for k, v in self.extra.items() if v is not None}}


def _upstream(exc: UpstreamError) -> OpError:
    return OpError(502, "upstream", str(exc), errcode=exc.errcode, errmsg=exc.errmsg,
                   rid=exc.rid)


class Operations:
    """The quota tools of one daemon; ``config`` and ``client`` are read on every use (a reload
    replaces them)."""

    def __init__(self, config: Callable[[], Config], client: Callable[[], WeChatClient],
                 force: Force, fleet: Fleet | None = None,
                 on_cleared: Callable[[str], None] = lambda appid: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock  # which month it is (Asia/Shanghai)
        self.client = client
        self.force = force
        self.fleet = fleet
        self.on_cleared = on_cleared  # the account's 45009 waits end
        self.log = get_logger()
        self._resets_lock = threading.Lock()
        self._asks: dict[str, deque[float]] = {}
        self._asks_lock = threading.Lock()
        # (app, path) -> (daily_limit, used, remain, when); read by the metrics
        self._figures: dict[tuple[str, str], tuple[int, int, int, float]] = {}
        self._watch_failed: set[tuple[str, str]] = set()

    # -- helpers --------------------------------------------------------------------------------
    def _app(self, name: str) -> AppConfig:
        app = self.config().app(name)
        if app.api == "wecom":
            raise OpError(409, "unsupported", f"{name} is a WeCom app: WeChat's quota tools "
                          "(openapi/quota/get, clear_quota, rid/get) do not cover WeCom")
        return app

    def _token(self, name: str) -> str:
        config = self.config()
        try:
            record = load_record(token_path(config.state_dir, name), name)[0]
        except TokenUnavailable as exc:
            raise OpError(503, "unavailable", f"no valid token for {name}: {exc.reason}") \
                from None
        if record.expires_at <= time.time():
            raise OpError(503, "unavailable", f"the token of {name} has expired")
        return record.access_token

    def _with_token(self, app: AppConfig, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A call with the app's token; once more if WeChat refused it and a passive refresh
        replaced it."""
        token = self._token(app.name)
        try:
            return self.client().openapi(app, path, body, access_token=token)
        except UpstreamError as exc:
            if exc.kind is not ErrorClass.TOKEN_INVALID:
                raise _upstream(exc) from None
            refused = exc
        self.log.warning("quota.token_refused", app=app.name, token=mask(token),
                         reason="reported as invalid (passive refresh)")
        self.force(app.name, token, False)
        new = self._token(app.name)
        if new == token:  # the refresh was refused or failed: the same call would fail again
            raise _upstream(refused)
        try:
            return self.client().openapi(app, path, body, access_token=new)
        except UpstreamError as exc:
            raise _upstream(exc) from None

    def ask(self, name: str) -> None:
        """Count one lookup asked over the socket; 429 past ASKS_PER_MINUTE for the app (each
        one is an upstream call, and the socket is open to every token reader)."""
        now = time.monotonic()
        with self._asks_lock:
            asks = self._asks.setdefault(name, deque())
            while asks and now - asks[0] >= 60:
                asks.popleft()
            if len(asks) >= ASKS_PER_MINUTE:
                raise OpError(429, "rate_limited", f"at most {ASKS_PER_MINUTE} quota and rid "
                              f"lookups a minute for {name}",
                              retry_after=round(60 - (now - asks[0]), 1))
            asks.append(now)

    # -- quota ----------------------------------------------------------------------------------
    def quota(self, name: str, path: str, resets: bool = True) -> dict[str, Any]:
        """daily_limit, used and remain of one API path of the app, from WeChat (and this
        month's resets as counted, unless ``resets`` is False)."""
        app = self._app(name)
        answer = self._with_token(app, QUOTA_GET, {"cgi_path": path})
        quota = answer.get("quota")
        if not isinstance(quota, dict) or not all(
                isinstance(quota.get(k), int) and not isinstance(quota.get(k), bool)
                for k in ("daily_limit", "used", "remain")):
            raise OpError(502, "upstream", f"{QUOTA_GET} answered without a quota")
        out = {"app": name, "appid": app.appid, "path": path,
               "daily_limit": quota["daily_limit"], "used": quota["used"],
               "remain": quota["remain"]}
        if resets:
            try:
                out["resets"] = self.resets_info(app.appid)
            except OpError:
                out["resets"] = None  # the ledger is unreadable (logged); the quota is fine
        return out

    # -- rid ------------------------------------------------------------------------------------
    def rid(self, name: str, rid: str) -> dict[str, Any]:
        """What WeChat saw of the call with this rid, secrets and tokens masked."""
        if not RID_RE.fullmatch(rid):
            raise OpError(400, "bad_request", f"{rid!r} is not a rid (it looks like "
                          "617682e1-09059ac5-34a8e2ea, the end of an errmsg)")
        answer = self._with_token(self._app(name), RID_GET, {"rid": rid})
        request = answer.get("request")
        if not isinstance(request, dict):
            raise OpError(502, "upstream", f"{RID_GET} answered without a request")
        shown = {k: redact(v) if k in ("request_url", "request_body", "response_body")
                 else redact(v, k) for k, v in request.items()}
        return {"app": name, "rid": rid, "request": shown}

    # -- clear_quota ----------------------------------------------------------------------------
    def _resets_path(self) -> str:
        return os.path.join(self.config().state_dir, RESETS_FILE)

    def _read_resets(self) -> dict[str, Any]:
        """The ledger; OpError when it exists but cannot be read (counting from zero could
        spend resets WeChat has already granted)."""
        path = self._resets_path()
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read(1 << 20))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.log.error("quota.resets_unreadable", path=path, error=reason)
            raise OpError(500, "store", f"cannot read {path} ({reason}): fix or delete it "
                          "(it counts this month's quota resets); nothing was reset") from None
        return doc

    def _local_count(self, doc: dict[str, Any], appid: str, month: str) -> int:
        entry = doc.get(appid)
        if isinstance(entry, dict) and entry.get("month") == month \
                and isinstance(entry.get("count"), int):
            return int(entry["count"])
        return 0

    def resets_info(self, appid: str) -> dict[str, Any]:
        """This month's resets of ``appid`` as counted (no change)."""
        month = wechat_month(self.clock())
        used = self._local_count(self._read_resets(), appid, month)
        if self.fleet is not None:
            shared = self.fleet.resets(appid, month)
            used = max(used, shared or 0)
        return {"month": month, "used": used, "left": max(0, RESETS_PER_MONTH - used),
                "limit": RESETS_PER_MONTH}

    def _count(self, appid: str, month: str, add: int, at_least: int = 0) -> int:
        """Add to this month's count (local file, and the fleet's); the new count."""
        doc = self._read_resets()
        count = max(self._local_count(doc, appid, month) + add, at_least)
        if self.fleet is not None:
            shared = self.fleet.resets(appid, month, add, at_least)
            count = max(count, shared or 0)
        doc = {k: v for k, v in doc.items()
               if isinstance(v, dict) and v.get("month") == month}  # older months go
        doc[appid] = {"month": month, "count": count, "last_at": int(self.clock())}
        try:
            atomic_write(self._resets_path(), json.dumps(doc, sort_keys=True).encode() + b"\n",
                         0o600)
        except OSError as exc:
            self.log.error("quota.resets_write_failed", path=self._resets_path(),
                           error=exc.strerror or str(exc))
        return count

    def clear_quota(self, name: str) -> dict[str, Any]:
        """Reset the daily quota of the app's account with clear_quota/v2 (appid + secret)."""
        app = self._app(name)
        if not app.secret:
            raise OpError(409, "no_secret", f"this host has no secret for {name} (it follows "
                          "the app in the fleet): run clear-quota on a host that has it")
        self._not_waiting_for_budget(app)
        with self._resets_lock:
            now = self.clock()
            month = wechat_month(now)
            info = self.resets_info(app.appid)
            if info["used"] >= RESETS_PER_MONTH:
                next_month = datetime.fromtimestamp(next_wechat_month(now), SHANGHAI)
                raise OpError(429, "limit", f"{info['used']} of WeChat's {RESETS_PER_MONTH} "
                              f"quota resets of {app.appid} are used in {month} (Asia/Shanghai"
                              "): none is made before "
                              f"{next_month:%Y-%m-%d %H:%M} Asia/Shanghai",
                              resets_used=info["used"], resets_left=0)
            params = {"appid": app.appid, "appsecret": app.secret}
            try:
                # the documented call has them as URL parameters, newer pages in the body
                self.client().openapi(app, CLEAR_QUOTA, params, params=params)
            except UpstreamError as exc:
                error = _upstream(exc)
                if exc.errcode == 48006:
                    used = self._count(app.appid, month, 0, RESETS_PER_MONTH)
                    error.extra.update(resets_used=used, resets_left=0)
                self.log.error("quota.clear_failed", app=name, appid=app.appid,
                               error=str(exc), errcode=exc.errcode, errmsg=exc.errmsg,
                               **({"rid": exc.rid} if exc.rid else {}))
                raise error from None
            used = self._count(app.appid, month, 1)
        self.log.warning("quota.cleared", app=name, appid=app.appid, resets_used=used,
                         resets_left=max(0, RESETS_PER_MONTH - used), month=month)
        self.on_cleared(app.appid)
        return {"app": name, "appid": app.appid, "cleared": True, "month": month,
                "resets_used": used, "resets_left": max(0, RESETS_PER_MONTH - used)}

    def _not_waiting_for_budget(self, app: AppConfig) -> None:
        """An app held back by its own daily_budget gains nothing from a reset of WeChat's
        quota: refuse before one of the month's 10 resets is spent."""
        config = self.config()
        status = read_status(status_path(config.state_dir, app.name))
        now = self.clock()
        used = status.calls_today if status.calls_day == wechat_day(now) else 0
        if status.last_result is LastResult.BUDGET and \
                used + 1 + len(app.tickets) > config.daily_budget:
            raise OpError(409, "budget", f"{app.name} waits for its own daily_budget ({used} of "
                          f"{config.daily_budget} calls counted today), not for WeChat's quota "
                          "(45009): a reset would not help, and no reset was spent; raise "
                          "daily_budget and run `wxtoken reload`")

    # -- quota_watch ----------------------------------------------------------------------------
    def watch(self, name: str) -> None:
        """Poll every quota_watch path of the app once (a scheduled job)."""
        try:
            app = self.config().app(name)
        except WxtokenError:
            return  # removed by a reload
        for path in app.quota_watch:
            key = (name, path)
            try:
                got = self.quota(name, path, resets=False)
            except OpError as exc:
                if key not in self._watch_failed:  # once per failure, not every poll
                    self._watch_failed.add(key)
                    self.log.warning("quota.watch_failed", app=name, path=path,
                                     error=str(exc), **{k: v for k, v in exc.extra.items()
                                                        if v is not None})
                continue
            if key in self._watch_failed:
                self._watch_failed.discard(key)
                self.log.info("quota.watch_recovered", app=name, path=path)
            self._figures[key] = (got["daily_limit"], got["used"], got["remain"], time.time())

    def figures(self) -> list[tuple[str, str, int, int, int]]:
        """(app, path, daily_limit, used, remain) of every watched path with a recent answer
        (younger than three polls)."""
        config = self.config()
        watched = {(a.name, p) for a in config.apps for p in a.quota_watch}
        fresh = time.time() - 3 * watch_interval(config)
        return [(app, path, limit, used, remain)
                for (app, path), (limit, used, remain, at) in sorted(self._figures.items())
                if (app, path) in watched and at >= fresh]
