"""The token sources of one Open Platform component: what a refresher calls instead of
WeChat's ``/cgi-bin/token``.

- ``ComponentFetcher``: the component token with the newest ``component_verify_ticket`` younger
  than 12 h, and if WeChat refuses it (61005/61006), with the last ticket that worked;
- ``AuthorizerFetcher``: an authorizer's token with its refresh token, which WeChat may rotate:
  the new one is persisted durably *before* the token is published (one that cannot be written
  is kept in memory with its token, ``Unwritten``); when every stored one is refused (61023),
  the authorizer list repairs it, else the authorizer is marked as needing a new authorization,
  or is gone.

Each is given the platform's parts and, through a small Protocol, the few operations of the
platform it uses (Platform implements them).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from wxtoken.component.authorizer_list import LIST_WINDOW, AuthorizerList
from wxtoken.component.fleet import Pushed
from wxtoken.component.parts import Parts
from wxtoken.config import AppConfig
from wxtoken.errcodes import TICKET_ERRCODES, ErrorClass
from wxtoken.errors import StoreError, UpstreamError
from wxtoken.logs import mask
from wxtoken.schedule import RefreshModel
from wxtoken.upstream import Fetched


class ComponentSide(Protocol):
    """What the component's fetcher tells the platform (Platform implements it)."""

    def ticket_worked(self, ticket: str, now: float) -> None: ...

    def component_ready(self) -> None: ...


class AuthorizerSide(Protocol):
    """What an authorizer's fetcher needs of the platform (Platform implements it)."""

    def store_refresh(self, appid: str, refresh_token: str, now: float,
                      previous: str | None = None, authorized_at: float | None = None,
                      after: tuple[str, ...] = (), wechat_at: float | None = None) -> int: ...

    def later_remove(self, appid: str) -> None: ...

    def authorizer_ok(self, appid: str) -> None: ...

    def needs_reauth(self, appid: str, reason: str) -> None: ...

    def gone(self, appid: str, reason: str, at: float | None = None) -> None: ...

    def component_refused(self, token: str) -> None: ...


class ComponentFetcher:
    """The component token's "client": api_component_token with the best ticket."""

    def __init__(self, parts: Parts, side: ComponentSide) -> None:
        self.parts = parts
        self.side = side

    def unpublished(self, appid: str) -> bool:
        return False  # the component token carries no credential to save

    def waiting_for(self, app: AppConfig) -> str | None:
        return None  # fetched with the ticket (a missing one: refresh.waiting, on its own)

    def model(self, app: AppConfig) -> RefreshModel:
        return RefreshModel.NEW_EACH_CALL  # api_component_token: a new token every call

    def fetch(self, app: AppConfig, force_refresh: bool = False) -> Fetched:
        p = self.parts
        if p.fleet is not None:  # a ticket another host received
            p.fleet.pull_tickets(p.files)
        now = p.clock()
        tickets = p.files.ticket.usable(now)
        if not tickets and p.files.ticket.newest_at() is None:
            # a platform just set up: nothing is wrong yet, the first push ends the wait
            raise UpstreamError(ErrorClass.PERMANENT, "waiting for the first "
                                "component_verify_ticket: WeChat pushes one every 10 minutes "
                                "to the authorization event URL (callback_listen), or hand "
                                "one over with `wxtoken component ticket`", called=False,
                                waiting=True)
        if not tickets:
            raise UpstreamError(ErrorClass.PERMANENT, "no component_verify_ticket younger "
                                "than 12 h: WeChat pushes one every 10 minutes to the "
                                "authorization event URL (callback_listen), or hand one over "
                                "with `wxtoken component ticket`", called=False)
        failure: UpstreamError | None = None
        for ticket in tickets:
            try:
                fetched = p.host.client.component_token(p.comp.component_appid,
                                                        p.comp.secret, ticket)
            except UpstreamError as exc:
                if exc.errcode in TICKET_ERRCODES:
                    p.log.warning("component.ticket_refused", ticket=mask(ticket),
                                  errcode=exc.errcode, errmsg=exc.errmsg)
                    failure = exc
                    continue
                raise
            self.side.ticket_worked(ticket, now)
            self.side.component_ready()
            return fetched
        assert failure is not None
        raise failure

    def fetch_ticket(self, app: AppConfig, access_token: str, kind: str) -> Fetched:
        raise UpstreamError(ErrorClass.PERMANENT, "a component token has no tickets")

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Unwritten:
    """A token WeChat handed out whose rotated refresh token could not be written: both are
    kept (in memory) until the refresh token can be made durable, then the token is
    published, unless the file was written by another writer since."""

    refresh_token: str  # the one WeChat returned (or the one used, when it returned none)
    used: str
    refused: tuple[str, ...]
    fetched: Fetched
    at: float  # when WeChat answered (the platform's clock)
    replaces: str | None  # the token in the file when the call was made


class AuthorizerFetcher:
    """An authorizer's "client": api_authorizer_token with its refresh token, persisting the
    one WeChat returns before the token is published. A refresh token that cannot be written
    is a store failure (StoreError: the refresher backs off): it is kept with its token and
    written first at the next attempt, and no call is made while the refresh directory cannot
    be written."""

    def __init__(self, parts: Parts, lists: AuthorizerList, side: AuthorizerSide) -> None:
        self.parts = parts
        self.lists = lists
        self.side = side
        self._unwritten: dict[str, Unwritten] = {}  # appid -> kept until it can be written
        # appid -> when (monotonic) the authorizer list last failed to repair it: a list read
        # started before then cannot tell that it needs a new authorization or has cancelled
        self._unhelped: dict[str, float] = {}
        self._lock = threading.Lock()

    def fetch(self, app: AppConfig, force_refresh: bool = False) -> Fetched:
        p = self.parts
        appid = app.appid
        if (late := self._write_unwritten(appid)) is not None:
            return late  # no call: WeChat handed it out at the last attempt
        token = p.component_token()
        if token is None:
            raise UpstreamError(ErrorClass.TRANSIENT, "no valid component_access_token yet "
                                "(is the component_verify_ticket arriving?)", called=False)
        if p.fleet is not None:  # another host may have refreshed it last (and rotated)
            p.fleet.pull_refresh(appid, p.files)
        # no call while the refresh token it returns could not be made durable
        p.files.check_refresh_writable(appid)
        tried: list[str] = []
        started = time.monotonic()  # a list read started since then knows what refused these
        for source, refresh_token in p.files.refresh_candidates(appid):
            fetched = self._try(appid, token, refresh_token, tuple(tried))
            if fetched is not None:
                with self._lock:  # it works again (a new authorization, the list's)
                    self._unhelped.pop(appid, None)
                if source == "listed":
                    p.log.warning("authorizer.repaired", app=appid, reason="the stored refresh "
                                  "token was refused; the one api_get_authorizer_list gave works")
                elif source == "previous":
                    p.log.info("authorizer.previous_refresh_token", app=appid,
                               reason="the newest one was refused (never used: a crash "
                               "before it was?); the one before it works")
                return fetched
            tried.append(refresh_token)
        # every stored refresh token is refused: WeChat's list has the authorizer's current one
        # (one read serves every repair for LIST_WINDOW s: a read this fetch may predate what
        # refused it, so only a read started since decides that the list cannot help)
        since = self._unhelped.get(appid)
        for _ in range(2):
            try:
                read = self.lists.read(token, newer_than=since)
            except UpstreamError as exc:
                raise UpstreamError(ErrorClass.TRANSIENT, f"the stored authorizer_refresh_token "
                                    f"of {appid} is refused (61023), and the authorizer list "
                                    f"could not be read to repair it: {exc}") from None
            if read is None:  # the last read predates the refusal; the next is not due yet
                raise UpstreamError(ErrorClass.TRANSIENT, f"the stored authorizer_refresh_token "
                                    f"of {appid} is refused (61023), also the one the last read "
                                    "of the authorizer list gave: it is repaired after the next "
                                    f"read (one per {LIST_WINDOW:.0f} s at most)")
            listed = read.entries.get(appid)
            if listed is not None and listed not in tried:
                p.files.note_listed(appid, listed, p.clock())
                fetched = self._try(appid, token, listed, tuple(tried))
                if fetched is not None:
                    with self._lock:
                        self._unhelped.pop(appid, None)
                    p.log.warning("authorizer.repaired", app=appid,
                                  reason="refresh token recovered from api_get_authorizer_list")
                    return fetched
                tried.append(listed)
            if since is not None and read.started >= since:
                break  # read since the list last failed to help: it decides
            with self._lock:
                since = self._unhelped.setdefault(appid, started)
            if read.started >= since:
                break
        with self._lock:
            self._unhelped.pop(appid, None)
        if listed is None:
            self.side.gone(appid, "not in api_get_authorizer_list: the authorization was cancelled")
            raise UpstreamError(ErrorClass.NEEDS_HUMAN, f"{appid} no longer authorizes the "
                                "platform (61023, and it is not in the authorizer list): its "
                                "files are removed", errcode=61023)
        reason = ("every authorizer_refresh_token is refused (61023), also the one "
                  "api_get_authorizer_list gives: the authorizer must authorize the platform "
                  "again")
        self.side.needs_reauth(appid, reason)
        raise UpstreamError(ErrorClass.NEEDS_HUMAN, f"{appid}: {reason}", errcode=61023)

    def _try(self, appid: str, token: str, refresh_token: str, refused: tuple[str, ...]
             ) -> Fetched | None:
        """One call with one refresh token: the token (its rotated refresh token stored first),
        None for 61023; other failures raise."""
        p = self.parts
        try:
            fetched, rotated = p.host.client.authorizer_token(
                p.comp.component_appid, token, appid, refresh_token)
        except UpstreamError as exc:
            if exc.kind is ErrorClass.TOKEN_INVALID:
                self.side.component_refused(token)
                raise UpstreamError(ErrorClass.TRANSIENT, "WeChat refused the "
                                    "component_access_token; it is being replaced") from None
            if exc.errcode in (61023, 61003):  # refused, or the authorization is gone: the
                return None                       # authorizer list tells which
            raise
        # durable before the new access token is published (the refresher writes it after)
        now = p.clock()
        try:
            stored = self.side.store_refresh(appid, rotated or refresh_token, now,
                                             previous=refresh_token,
                                             after=(refresh_token, *refused))
        except StoreError as exc:
            current = p.record(appid)
            with self._lock:
                self._unwritten[appid] = Unwritten(
                    rotated or refresh_token, refresh_token, refused, fetched, now,
                    current.access_token if current is not None else None)
            raise StoreError(f"{exc}: the refresh token WeChat returned is kept in memory and "
                             "written, then its token published, when the disk allows (no "
                             "call meanwhile)") from None
        self._stored(appid, stored)
        return fetched

    def _stored(self, appid: str, stored: int) -> None:
        if stored == Pushed.GONE:  # another host removed it (unauthorized) meanwhile
            self.side.later_remove(appid)
            raise UpstreamError(ErrorClass.PERMANENT, f"{appid} was removed from the fleet "
                                "(unauthorized) during its refresh", called=True)
        self.side.authorizer_ok(appid)

    def model(self, app: AppConfig) -> RefreshModel:
        return RefreshModel.NEW_EACH_CALL  # api_authorizer_token: a new token every call

    def waiting_for(self, app: AppConfig) -> str | None:
        """The component token, while there is no valid one (a token handed out at the last
        attempt, its refresh token not yet written, needs none)."""
        if self.unpublished(app.appid) or self.parts.component_token() is not None:
            return None
        return self.parts.component_key

    def unpublished(self, appid: str) -> bool:
        """A token WeChat handed out is kept, its refresh token not yet written: the
        refresher runs (backing off) until it is, whether or not the file's token is due."""
        with self._lock:
            return appid in self._unwritten

    def _write_unwritten(self, appid: str) -> Fetched | None:
        """The refresh token of the last attempt that could not be written, written now
        (StoreError when it still cannot be: no call); then the token that came with it, for
        the refresher to publish, when the file still holds the token it replaces and it has
        life left. None: nothing kept, or its token is not to be published (the next refresh
        token is used)."""
        p = self.parts
        with self._lock:
            kept = self._unwritten.get(appid)
        if kept is None:
            return None
        try:
            now_stored = (p.files.refresh(appid) or {}).get("refresh_token")
        except ValueError:
            now_stored = None
        if now_stored not in (kept.used, kept.refresh_token, *kept.refused):
            # written by another since (an authorization, an import, the fleet; or removed):
            # that chain is the newer one
            with self._lock:
                self._unwritten.pop(appid, None)
            p.log.info("authorizer.unwritten_dropped", app=appid,
                       token=mask(kept.fetched.access_token),
                       reason="its refresh token was replaced by another writer meanwhile")
            return None
        try:
            stored = self.side.store_refresh(appid, kept.refresh_token, kept.at,
                                             previous=kept.used,
                                             after=(kept.used, *kept.refused))
        except StoreError as exc:
            raise StoreError(f"{exc}: the refresh token WeChat returned at the last attempt "
                             "is kept in memory until it can be written (no call "
                             "meanwhile)") from None
        with self._lock:
            self._unwritten.pop(appid, None)
        self._stored(appid, stored)
        current = p.record(appid)
        left = kept.at + kept.fetched.expires_in - p.clock()
        if stored == Pushed.OLDER or (current.access_token if current else None) != kept.replaces \
                or left <= p.host.config.renew_before:
            p.log.info("authorizer.unwritten_dropped", app=appid,
                       token=mask(kept.fetched.access_token),
                       reason="the refresh token is written; its token is not published: "
                       + ("it is due already" if left <= p.host.config.renew_before else
                          "the token was written by another writer since"))
            return None
        p.log.info("authorizer.refresh_token_written", app=appid, late_write=True,
                   token=mask(kept.fetched.access_token))
        return Fetched(kept.fetched.access_token, int(left), kept.fetched.took_ms)

    def fetch_ticket(self, app: AppConfig, access_token: str, kind: str) -> Fetched:
        return self.parts.host.client.fetch_ticket(app, access_token, kind)

    def close(self) -> None:
        pass
