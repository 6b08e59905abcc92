"""One component's callback events and authorizations: the dispatch of a decrypted message
(``on_event``: a ticket, an authorization, a cancellation), and an authorization's code
exchanged with ``api_query_auth`` (``on_authorized``) here, or in the fleet mode by one
candidate (a follower hands it over). When the exchange's answer was lost after WeChat may have
used the code, the authorization is taken from the authorizer list (``adopting`` in
``.platform.json``, for a restart).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

from wxtoken.component.authorizer_list import AuthorizerList, ListRead
from wxtoken.component.authorizers import Authorizers
from wxtoken.component.cancel import Cancellations
from wxtoken.component.parts import Part, Parts, number
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import StoreError, UpstreamError, WxtokenError
from wxtoken.logs import mask
from wxtoken.record import APP_NAME_RE, TokenRecord

# .platform.json's table of authorizations whose api_query_auth answer was lost (appid ->
# {"at": WeChat's time})
ADOPTING = "adopting"
CODE_SPENT = frozenset({61009, 61010})  # the authorization code was used, or has expired
# reads of the authorizer list (a window apart) that look for an authorization whose
# api_query_auth answer was lost, before the daily reconcile is left to find it
ADOPT_TRIES = 4


class Authorizations(Part):
    """One platform's events and the authorizations they bring."""

    def __init__(self, parts: Parts, authorizers: Authorizers, lists: AuthorizerList,
                 cancels: Cancellations, on_ticket: Callable[[str, str], bool]) -> None:
        super().__init__(parts)
        self.authorizers = authorizers
        self.lists = lists
        self.cancels = cancels
        self._on_ticket = on_ticket  # the platform's (a ticket is the component token's)
        # appid -> (its authorization's WeChat time, time.monotonic() before the exchange whose
        # answer was lost): taken from a read of the authorizer list started since
        self._adopting: dict[str, tuple[float | None, float]] = {}

    def resume(self, now: float) -> None:
        """At start: the lost authorizations the last run had not taken from the list
        (.platform.json) are looked for again (``now``: time.monotonic())."""
        for appid, entry in self.files.entries(ADOPTING).items():
            at = entry.get("at") if isinstance(entry, dict) else None
            with self._lock:
                self._adopting[appid] = (number(at), now)
            self._adopt_later(appid, 0.0, 0)

    # -- the callback's events ------------------------------------------------------------------
    def _event_time(self, fields: dict[str, str]) -> float | None:
        """When WeChat sent the event (its CreateTime, whole seconds on WeChat's clock), when
        plausible (within a day of this host's clock); None otherwise: an authorization and a
        cancellation are ordered by it, and without it WeChat is asked."""
        raw = fields.get("CreateTime", "").strip()
        if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
            return None
        at = float(int(raw))
        return at if abs(at - self.clock()) < 86400 else None

    def on_event(self, fields: dict[str, str]) -> str:
        """One decrypted callback message; what was done (for the log)."""
        info = fields.get("InfoType", "")
        if info == "component_verify_ticket":
            ticket = fields.get("ComponentVerifyTicket", "")
            self._on_ticket(ticket, "callback")
            return "ticket"
        if info in ("authorized", "updateauthorized"):
            appid, code = fields.get("AuthorizerAppid", ""), fields.get("AuthorizationCode", "")
            if not APP_NAME_RE.match(appid) or not code:
                raise WxtokenError(f"{info} without an AuthorizerAppid or AuthorizationCode")
            at = self._event_time(fields)
            # off the callback's thread: WeChat wants its answer within 5 s, Redis may be slow
            self.host.later(lambda: self._authorization(appid, code, at), 0,
                            f"authorize:{self.comp.name}/{appid}")
            return info
        if info == "unauthorized":
            appid = fields.get("AuthorizerAppid", "")
            if not APP_NAME_RE.match(appid):
                raise WxtokenError("unauthorized without an AuthorizerAppid")
            if appid == self.comp.component_appid:
                raise WxtokenError("unauthorized naming the component itself")
            self.cancels.on_unauthorized(appid, self._event_time(fields))
            return info
        return "ignored"

    def _authorization(self, appid: str, code: str, at: float | None) -> None:
        """An authorization event: exchanged here, or (the fleet mode) by one candidate."""
        if self.fleet is not None:
            if self.parts.following:
                if not self.fleet.hand_over(appid, code, at):
                    self.log.error("authorizer.not_handed_over", app=appid,
                                   reason="no host with the component's secret is listening: "
                                   "the next reconcile finds the authorizer")
                return
            if not self.fleet.claim(code):
                self.log.info("authorizer.authorization_elsewhere", app=appid,
                              reason="another host of the fleet exchanges this code")
                return
        self.on_authorized(appid, code, at=at)

    def handed_over(self, data: str) -> None:
        """An authorization that reached a follower: one candidate exchanges the code."""
        assert self.fleet is not None
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and "unauthorized" in doc:
                self.cancels.handed_over(doc)
                return
            appid, code = doc["authorized"], doc["code"]
        except (ValueError, KeyError, TypeError):
            return
        when = number(doc.get("at"))
        if isinstance(appid, str) and APP_NAME_RE.match(appid) and isinstance(code, str) \
                and code and self.fleet.claim(code):
            self.host.later(lambda: self.on_authorized(appid, code, at=when), 0,
                            f"authorize:{self.comp.name}/{appid}")

    # -- an authorization ------------------------------------------------------------------------
    def on_authorized(self, appid: str, code: str, attempt: int = 0,
                      at: float | None = None, reached: bool = False) -> None:
        """An authorization (new or updated; sent at ``at``, its CreateTime): exchange the
        code, store the refresh token, write the token, start refreshing. Retried while no
        component token is there yet. When WeChat may have used the code but its answer was
        lost (no answer came, or the code is spent after an earlier try ``reached`` WeChat),
        the authorization is taken from the authorizer list instead."""
        token = self.parts.component_token()
        asked = self.clock()
        started = time.monotonic()  # a list read started since may show what this call did
        lost = False
        try:
            if token is None:
                raise UpstreamError(ErrorClass.TRANSIENT, "no valid component_access_token yet")
            try:
                info = self.host.client.query_auth(self.comp.component_appid, token, code)
            except UpstreamError as exc:
                lost = exc.called and exc.errcode is None  # sent, and no answer came back
                reached = reached or exc.called
                raise
            got = str(info.get("authorizer_appid") or "")
            if got != appid or not APP_NAME_RE.match(got):
                raise UpstreamError(ErrorClass.PERMANENT, f"api_query_auth answered for "
                                    f"{got!r}, not {appid}")
            access = info.get("authorizer_access_token")
            expires_in = info.get("expires_in")
            refresh_token = info.get("authorizer_refresh_token")
            if not isinstance(refresh_token, str) or not refresh_token \
                    or not isinstance(access, str) or not access \
                    or not isinstance(expires_in, int) or expires_in <= 0:
                raise UpstreamError(ErrorClass.TRANSIENT, "api_query_auth answered without "
                                    "the tokens")
        except UpstreamError as exc:
            retry = exc.kind is ErrorClass.TRANSIENT and attempt < 8
            # WeChat may hold the authorization (and the code is used): its refresh token is
            # in the authorizer list
            adopt = lost or (exc.errcode in CODE_SPENT and attempt > 0 and reached)
            self.log.warning("authorizer.authorization_failed", app=appid, error=str(exc),
                             errcode=exc.errcode, retry=retry,
                             from_list=True if adopt else None)
            if adopt:
                self._adopt_soon(appid, at, started)
            if retry:
                self.host.later(lambda: self.on_authorized(appid, code, attempt + 1, at,
                                                           reached),
                                min(60.0, 2.0 ** attempt), f"authorize:{self.comp.name}/{appid}")
            return
        self._adopted(appid)  # the exchange answered after all: nothing to take from the list
        now = self.clock()
        record = TokenRecord(app=appid, appid=appid, access_token=access,
                             expires_at=int(now) + expires_in, refreshed_at=int(now))
        if self.authorizers.publish(appid, record, refresh_token=refresh_token,
                                    authorized_at=at if at is not None else asked, since=asked,
                                    wechat_at=at):
            self.authorizers.authorizer_ok(appid)
            self.log.info("authorizer.authorized", app=appid, token=mask(access),
                          expires_in=expires_in)

    # -- an authorization whose api_query_auth answer was lost ------------------------------------
    def _adopt_soon(self, appid: str, at: float | None, since: float) -> None:
        """Take the authorization from a read of the authorizer list started after ``since``
        (kept in .platform.json: a restart takes it up again)."""
        with self._lock:
            before = self._adopting.get(appid)
            self._adopting[appid] = (at, min(since, before[1]) if before else since)
        try:
            self.files.note_entry(ADOPTING, appid, {"at": at})
        except OSError as exc:
            self.log.warning("authorizer.adoption_unstored", app=appid, error=str(exc))
        self._adopt_later(appid, 0.0, 0)

    def _adopt_later(self, appid: str, delay: float, attempt: int) -> None:
        self.host.later(lambda: self._adopt(appid, attempt), delay,
                        f"adopt:{self.comp.name}/{appid}")

    def _adopted(self, appid: str) -> None:
        """Nothing (more) to take from the list for ``appid``."""
        with self._lock:
            if self._adopting.pop(appid, None) is None:
                return
        with contextlib.suppress(OSError):
            self.files.note_entry(ADOPTING, appid, None)

    def _adopt(self, appid: str, attempt: int) -> None:
        """One look for the authorization in the authorizer list (the read the 61023 repairs
        share): its refresh token is stored as a new authorization's and the authorizer
        refreshed with it. Not listed (yet), or the list unreadable: looked for again, a read
        later, ADOPT_TRIES times in all."""
        with self._lock:
            pending = self._adopting.get(appid)
        if pending is None:
            return  # the exchange answered after all, or a newer authorization came
        at, since = pending
        token = self.parts.component_token()
        read: ListRead | None = None
        problem = "no valid component_access_token"
        if token is not None:
            try:
                read = self.lists.read(token, newer_than=since)
            except UpstreamError as exc:
                problem = f"the authorizer list could not be read: {exc}"
            else:
                if read is None:  # the last read predates the exchange: the next one tells
                    self._adopt_later(appid, self.lists.due(), attempt)
                    return
        listed = read.entries.get(appid) if read is not None else None
        if read is not None and listed is None:
            problem = "not in api_get_authorizer_list (yet)"
            with self._lock:  # the next look needs a new read
                if self._adopting.get(appid) == pending:
                    self._adopting[appid] = (at, read.started + 1e-6)
        if listed is None:
            if attempt + 1 < ADOPT_TRIES:
                self._adopt_later(appid, max(self.lists.due(), 5.0), attempt + 1)
                return
            self._adopted(appid)
            self.log.warning("authorizer.adoption_failed", app=appid, error=problem,
                             reason="the answer of api_query_auth was lost and the "
                             "authorization is not in the authorizer list: the daily reconcile "
                             "(or the next authorization) finds it")
            return
        with self._lock:
            current = self._adopting.get(appid)
        if current is None:
            return  # the exchange answered meanwhile
        at = current[0]  # a later lost authorization's, if one came meanwhile
        known = [rt for _, rt in self.files.refresh_candidates(appid)]
        if listed not in known:
            now = self.clock()
            try:
                self.authorizers.store_refresh(appid, listed, now,
                                               authorized_at=at if at is not None else now,
                                               wechat_at=at)
            except StoreError as exc:
                self.log.error("authorizer.store_failed", app=appid, error=str(exc), next_in=60)
                self._adopt_later(appid, 60.0, attempt)
                return
        self._adopted(appid)
        self.log.warning("authorizer.adopted", app=appid, reason="the answer of "
                         "api_query_auth was lost (WeChat used the code): the authorization "
                         "is taken from api_get_authorizer_list")
        refresher = self.authorizers.add(appid)  # a new one fetches its token at once
        if refresher is not None:  # known already: it fetches now if a failure held it
            refresher.end_wait(lambda s: s.error_class is not None,
                               "a new authorization (from the authorizer list)")
            self.host.wake(self.parts.key(appid))
