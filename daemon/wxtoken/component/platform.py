"""One Open Platform component in the daemon.

Its tokens are refreshed by the daemon's usual refreshers (schedule, lock, budget, backoff,
passive refresh, the files' contract); what differs is how a token is fetched:

- the component token with the newest ``component_verify_ticket`` younger than 12 h, and if
  WeChat refuses it (61005/61006), with the last ticket that worked;
- an authorizer's token with its refresh token, which WeChat may rotate: the new one is
  persisted durably *before* the token is published. WeChat keeps the one used valid until the
  new one is first used, so a crash at any instant leaves one that works. When every stored one
  is refused (61023), ``api_get_authorizer_list`` (which returns each authorizer's current
  refresh token) repairs it; only when that fails too is the authorizer marked as needing a new
  authorization (error line, status, metric).

Authorizers are discovered: from ``authorized`` events (the code is exchanged with
``api_query_auth``; when its answer is lost after WeChat may have used the code, the
authorization is taken from the authorizer list within a minute), from the authorizer list
(daily, and at start when the last look is more than a day old), and from ``wxtoken component
import``.

An ``unauthorized`` event is ordered against the authorization held by WeChat's clock alone (the
events' CreateTime, kept with the refresh token as ``wechat_at``): sent before it, it is ignored
(a late or replayed push); sent after it, the authorizer's files go; a tie, or no WeChat time on
either side (an authorization from an import or the authorizer list), is asked of WeChat: an
authorizer still in the authorizer list (read after the event) is kept. On a fleet Redis
decides that, against the fleet's authorization, and a host removes its files only when Redis
removed the authorizer. A cancellation not yet decided is kept in ``.platform.json``
(``cancelling``), so a restart does not lose it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from wxtoken.component.crypto import MessageCrypto
from wxtoken.component.fleet import PlatformFleet, Pushed, Verdict
from wxtoken.component.store import ComponentFiles, as_number, ticket_problem
from wxtoken.config import Api, AppConfig, ComponentConfig, Config
from wxtoken.errcodes import TICKET_ERRCODES, ErrorClass
from wxtoken.errors import StoreError, TokenUnavailable, UpstreamError, WxtokenError
from wxtoken.fleet.connect import REDIS_ERRORS
from wxtoken.fleet.store import FleetStore
from wxtoken.logs import get_logger, mask
from wxtoken.record import APP_NAME_RE, MAX_TOKEN_LEN, TokenRecord, load_record, token_path
from wxtoken.refresher import Forced, Refresher
from wxtoken.schedule import FUTURE_TOLERANCE
from wxtoken.status import AppStatus, LastResult
from wxtoken.store import FileStore, clean_state_dir
from wxtoken.upstream import Fetched, WeChatClient

if TYPE_CHECKING:
    from wxtoken.fleet.node import FleetNode

RECONCILE_EVERY = 86400.0
LIST_PAGE = 500  # api_get_authorizer_list's largest page
# one read of the authorizer list (every page) serves every 61023 repair for this long; the
# next starts no sooner, however many authorizers need one (a failed read waits as long too)
LIST_WINDOW = 20.0
MAX_IMPORT_LINE = 4096  # bytes: a line of an import (an export's line is a few hundred)
# an imported access_token's expires_at: WeChat's tokens live 2 hours (expires_in 7200), and
# the old system's clock may run a few minutes ahead of this host's
IMPORT_AHEAD = 7200 + 600
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # a token: visible ASCII, no space or control
# .platform.json's tables of work a restart must not lose (appid -> {"at": WeChat's time})
CANCELLING = "cancelling"  # unauthorized events not decided yet
ADOPTING = "adopting"  # authorizations whose api_query_auth answer was lost
CODE_SPENT = frozenset({61009, 61010})  # the authorization code was used, or has expired
# reads of the authorizer list (a window apart) that look for an authorization whose
# api_query_auth answer was lost, before the daily reconcile is left to find it
ADOPT_TRIES = 4
CANCEL_BACKOFF = 600.0  # the longest wait between tries to decide a cancellation


def _number(value: Any) -> float | None:
    """A time from JSON (a number, not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


class Host(Protocol):
    """What a platform needs of the daemon: its token registry (registry.TokenRegistry)."""

    config: Config
    refreshers: dict[str, Refresher]

    @property
    def client(self) -> WeChatClient: ...

    def add_refresher(self, key: str, refresher: Refresher) -> None: ...

    def remove_refresher(self, key: str) -> None: ...

    def settle(self, key: str, timeout: float) -> bool: ...

    def wake(self, key: str) -> None: ...

    def force(self, key: str, invalid_token: str | None, privileged: bool) -> Forced | None: ...

    def later(self, func: Callable[[], None], delay: float, job: str) -> None: ...

    def population(self) -> int: ...


class ComponentFetcher:
    """The component token's "client": api_component_token with the best ticket."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def fetch(self, app: AppConfig, force_refresh: bool = False) -> Fetched:
        p = self.platform
        if p.fleet is not None:  # a ticket another host received
            p.fleet.pull_tickets(p.files)
        now = p.clock()
        tickets = p.files.usable_tickets(now)
        if not tickets and p.files.newest_ticket_at() is None:
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
            p.ticket_worked(ticket, now)
            p.component_ready()
            return fetched
        assert failure is not None
        raise failure

    def fetch_ticket(self, app: AppConfig, access_token: str, kind: str) -> Fetched:
        raise UpstreamError(ErrorClass.PERMANENT, "a component token has no tickets")

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Unwritten:
    """A token WeChat handed out whose rotated refresh token could not be written: both are
    kept (in memory) until the refresh token can be made durable, then the token is
    published, unless the file was written by another writer since."""

    refresh_token: str  # the one WeChat returned (or the one used, when it returned none)
    used: str
    refused: tuple[str, ...]
    fetched: Fetched
    at: float  # when WeChat answered (the platform's clock)
    replaces: str | None  # the token in the file when the call was made


@dataclass
class _ListRead:
    """One read of the authorizer list (every page): appid -> its current refresh token."""

    started: float  # time.monotonic() when the read began
    entries: dict[str, str] = field(default_factory=dict)
    error: UpstreamError | None = None  # the read failed: no other until LIST_WINDOW passes


class AuthorizerFetcher:
    """An authorizer's "client": api_authorizer_token with its refresh token, persisting the
    one WeChat returns before the token is published. A refresh token that cannot be written
    is a store failure (StoreError: the refresher backs off): it is kept with its token and
    written first at the next attempt, and no call is made while the refresh directory cannot
    be written."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._unwritten: dict[str, _Unwritten] = {}  # appid -> kept until it can be written
        # appid -> when (monotonic) the authorizer list last failed to repair it: a list read
        # started before then cannot tell that it needs a new authorization or has cancelled
        self._unhelped: dict[str, float] = {}
        self._lock = threading.Lock()

    def fetch(self, app: AppConfig, force_refresh: bool = False) -> Fetched:
        p = self.platform
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
                read = p.authorizer_list(token, newer_than=since)
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
            p.gone(appid, "not in api_get_authorizer_list: the authorization was cancelled")
            raise UpstreamError(ErrorClass.NEEDS_HUMAN, f"{appid} no longer authorizes the "
                                "platform (61023, and it is not in the authorizer list): its "
                                "files are removed", errcode=61023)
        reason = ("every authorizer_refresh_token is refused (61023), also the one "
                  "api_get_authorizer_list gives: the authorizer must authorize the platform "
                  "again")
        p.needs_reauth(appid, reason)
        raise UpstreamError(ErrorClass.NEEDS_HUMAN, f"{appid}: {reason}", errcode=61023)

    def _try(self, appid: str, token: str, refresh_token: str, refused: tuple[str, ...]
             ) -> Fetched | None:
        """One call with one refresh token: the token (its rotated refresh token stored first),
        None for 61023; other failures raise."""
        p = self.platform
        try:
            fetched, rotated = p.host.client.authorizer_token(
                p.comp.component_appid, token, appid, refresh_token)
        except UpstreamError as exc:
            if exc.kind is ErrorClass.TOKEN_INVALID:
                p.component_refused(token)
                raise UpstreamError(ErrorClass.TRANSIENT, "WeChat refused the "
                                    "component_access_token; it is being replaced") from None
            if exc.errcode in (61023, 61003):  # refused, or the authorization is gone: the
                return None                       # authorizer list tells which
            raise
        # durable before the new access token is published (the refresher writes it after)
        now = p.clock()
        try:
            stored = p.store_refresh(appid, rotated or refresh_token, now,
                                     previous=refresh_token, after=(refresh_token, *refused))
        except StoreError as exc:
            current = p.record(appid)
            with self._lock:
                self._unwritten[appid] = _Unwritten(
                    rotated or refresh_token, refresh_token, refused, fetched, now,
                    current.access_token if current is not None else None)
            raise StoreError(f"{exc}: the refresh token WeChat returned is kept in memory and "
                             "written, then its token published, when the disk allows (no "
                             "call meanwhile)") from None
        self._stored(appid, stored)
        return fetched

    def _stored(self, appid: str, stored: int) -> None:
        p = self.platform
        if stored == Pushed.GONE:  # another host removed it (unauthorized) meanwhile
            p.later_remove(appid)
            raise UpstreamError(ErrorClass.PERMANENT, f"{appid} was removed from the fleet "
                                "(unauthorized) during its refresh", called=True)
        p.authorizer_ok(appid)

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
        p = self.platform
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
            stored = p.store_refresh(appid, kept.refresh_token, kept.at, previous=kept.used,
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
        return self.platform.host.client.fetch_ticket(app, access_token, kind)

    def close(self) -> None:
        pass


class Platform:
    """One ``[components.NAME]`` in the daemon."""

    def __init__(self, host: Host, comp: ComponentConfig, clock: Callable[[], float],
                 rng: random.Random, node: FleetNode | None = None) -> None:
        self.host = host
        self.node = node
        self.files = ComponentFiles(host.config.state_dir, comp.name, comp.component_appid)
        self.fleet: PlatformFleet | None = None
        if node is not None:
            self.fleet = PlatformFleet(node.fleet, comp, self.files)
        # a follower (fleet mode, no secret) never calls WeChat: it mirrors the fleet's files
        self.following = node is not None and comp.follower
        self.stores: dict[str, FleetStore] = {}  # the fleet mode: each token's FleetStore
        self.comp = comp
        self.clock = clock
        self.rng = rng
        self.crypto = MessageCrypto(comp.msg_token, comp.encoding_aes_key,
                                    comp.component_appid)
        self.log = get_logger(component=comp.name)
        self.component_fetcher = ComponentFetcher(self)
        self.authorizer_fetcher = AuthorizerFetcher(self)
        self.keys: set[str] = set()  # the refreshers this platform registered
        self._lock = threading.Lock()
        # registering and removing a token (refresher, FleetStore) is check-then-act from the
        # scheduler's, the platform's and the fleet's sync threads
        self._tokens = threading.RLock()
        self._publishing: set[str] = set()  # authorizers whose token _publish is writing
        self._needs_reauth: dict[str, str] = {}
        self._reconcile_waiting = False
        self._list_lock = threading.Lock()  # one authorizer-list read at a time
        self._list_read: _ListRead | None = None  # the last, for the 61023 repairs
        # appid -> time.monotonic() of its last unauthorized event: WeChat is asked about it
        # only with a read of the authorizer list started since
        self._cancel_since: dict[str, float] = {}
        # appid -> {"at": its CreateTime or None, "received": this host's time}: the
        # cancellations not decided yet (kept in .platform.json too, for a restart)
        self._cancels: dict[str, dict[str, Any]] = {}
        # appid -> (its authorization's WeChat time, time.monotonic() before the exchange whose
        # answer was lost): taken from a read of the authorizer list started since
        self._adopting: dict[str, tuple[float | None, float]] = {}

    # -- names ------------------------------------------------------------------------------------
    def key(self, appid: str) -> str:
        return f"{self.comp.name}/{appid}"

    @property
    def component_key(self) -> str:
        return self.key(self.comp.component_appid)

    # -- refreshers -------------------------------------------------------------------------------
    def app(self, appid: str, tickets: tuple[str, ...] = ()) -> AppConfig:
        return AppConfig(name=appid, api=Api.TOKEN, appid=appid, secret="",
                         secret_source=f"component {self.comp.name}", tickets=tickets)

    def _refresher(self, appid: str) -> Refresher:
        component = appid == self.comp.component_appid
        app = self.app(appid, () if component else self.comp.tickets)
        fetcher = self.component_fetcher if component else self.authorizer_fetcher
        local = FileStore(self.files.dir, appid, 0o640, None)
        store: FileStore | FleetStore = local
        if self.node is not None:
            store = self._fleet_store(appid, local)
        log = get_logger(component=self.comp.name, app=appid,
                         role="component" if component else "authorizer")
        return Refresher(self.host.config, app, fetcher, store=store,  # type: ignore[arg-type]
                         clock=self.clock, rng=self.rng, log=log,
                         population=self.host.population)

    def _fleet_store(self, appid: str, local: FileStore) -> FleetStore:
        """The token's FleetStore (record, lease, generation in Redis), followed by the sync
        thread: another host's refresh rewrites this host's file."""
        assert self.node is not None and self.fleet is not None
        store = FleetStore(self.node.fleet, self.app(appid), identity=self.fleet.identity(appid),
                           local=local, key=self.key(appid))
        with self._tokens:
            old = self.stores.get(appid)
            if old is not None:
                self.node.sync.remove(old)
            self.stores[appid] = store
            self.node.sync.add(store)
        return store

    def _add(self, appid: str) -> Refresher | None:
        """Start keeping an authorizer's token (the one registered already, if any)."""
        key = self.key(appid)
        if self.following:
            self._follow(appid)
            return None
        with self._tokens:
            refresher = self.host_refresher(key)
            if refresher is not None or appid in self._publishing:
                return refresher
            refresher = self._refresher(appid)
            with self._lock:
                self.keys.add(key)
            self.host.add_refresher(key, refresher)
        return refresher

    def _follow(self, appid: str) -> None:
        """A follower's mirror of one token: its file follows the fleet's record."""
        assert self.node is not None
        with self._tokens:
            if appid in self.stores:
                return
            store = self._fleet_store(appid, FileStore(self.files.dir, appid, 0o640, None))
            with self._lock:
                self.keys.add(self.key(appid))
        if self.node.fleet.up:
            try:
                store.sync()
            except REDIS_ERRORS as exc:
                self.node.fleet.mark_down(exc)

    def record(self, appid: str) -> TokenRecord | None:
        """The token in this host's file (a follower's health)."""
        try:
            return load_record(token_path(self.files.dir, appid), appid)[0]
        except TokenUnavailable:
            return None

    def store_refresh(self, appid: str, refresh_token: str, now: float,
                      previous: str | None = None, authorized_at: float | None = None,
                      after: tuple[str, ...] = (), wechat_at: float | None = None) -> int:
        """Persist an authorizer's refresh token: durably here, then (the fleet mode) in
        Redis, before the token it came with is published. ``after``: the refresh tokens it
        replaces (used, or found refused): the fleet takes it only if its current one is among
        them (a holder paused past its lease cannot replace a newer chain). ``authorized_at``:
        it comes from an authorization (made then) or an import, which starts a new chain and
        may bring back an authorizer removed before that; ``wechat_at``: that authorization's
        CreateTime (None: unknown). Returns the fleet's answer (Pushed.STORED without a fleet)."""
        authorized = authorized_at is not None
        doc = self.files.store_refresh(appid, refresh_token, now, previous=previous,
                                       authorized_at=authorized_at, wechat_at=wechat_at)
        if authorized and appid in self._tombstones():
            self._forget_tombstone(appid)  # authorized again since it was removed here
        if self.fleet is None:
            return Pushed.STORED
        result = self.fleet.push_refresh(appid, doc, authorized, after)
        if result == Pushed.FAILED:
            self.log.warning("fleet.refresh_token_local_only", app=appid,
                             reason="Redis could not be written: the refresh token is on this "
                             "host only until a resync puts it there")
        elif result == Pushed.OLDER:
            self.log.warning("fleet.refresh_token_fenced", app=appid,
                             reason="the fleet holds a refresh token this one does not follow "
                             "from (another host refreshed after this host's lease ran out): "
                             "the fleet's is taken at the next refresh, this one kept as a "
                             "spare")
        return result

    def later_remove(self, appid: str) -> None:
        self.host.later(lambda: self._remove(appid), 0, f"remove:{self.comp.name}/{appid}")

    def ticket_worked(self, ticket: str, now: float) -> None:
        self.files.ticket_worked(ticket, now)
        if self.fleet is not None:
            at = self.files.received_at(ticket)
            if at is not None:
                self.fleet.push_ticket("good", ticket, at)

    def start(self) -> None:
        """Create the directories, register the component's refresher and one per known
        authorizer, and plan the reconcile (now when the last is more than a day old)."""
        self.files.ensure()
        for done in clean_state_dir(self.files.dir) + self.files.clean_private():
            self.log.info("state_dir.cleaned", action=done)
        doc = self.files.platform()
        self._needs_reauth = dict(doc.get("needs_reauth") or {})
        self._resume()
        if self.fleet is not None and self.node is not None:
            self.fleet.warn_without_persistence()
            self.node.sync.hooks[self.fleet.members_name] = self.resync_members
            self.node.sync.hooks[self.fleet.ticket_name] = self._ticket_news
            self.node.sync.resyncs.append(self.full_resync)
            if self.following:
                self._start_following()
                return
            self.node.sync.listen(self.fleet.requests, self._handed_over)
            self.full_resync()  # what changed while this host was down, both ways
        self._add(self.comp.component_appid)
        for appid in self.files.authorizers():
            self._add(appid)
        last = doc.get("last_reconcile")
        age = self.clock() - last if isinstance(last, (int, float)) else None
        due = 0.0 if age is None or age >= RECONCILE_EVERY else RECONCILE_EVERY - age
        if self.fleet is not None and (wait := self.fleet.reconcile_wait()) is not None:
            due = wait  # the fleet's: one host reconciles a day
        self.host.later(self.reconcile, due, f"reconcile:{self.comp.name}")

    def _resume(self) -> None:
        """At start: the cancellations and the lost authorizations the last run had not
        decided (kept in .platform.json) are taken up again."""
        now = time.monotonic()
        for appid, entry in self.files.entries(CANCELLING).items():
            with self._lock:
                self._cancels[appid] = entry if isinstance(entry, dict) else {"at": None}
                self._cancel_since.setdefault(appid, now)
            self._cancel_later(appid, 0.0)
        if self.following:
            return
        for appid, entry in self.files.entries(ADOPTING).items():
            at = entry.get("at") if isinstance(entry, dict) else None
            with self._lock:
                self._adopting[appid] = (_number(at), now)
            self._adopt_later(appid, 0.0, 0)

    # -- the fleet mode ------------------------------------------------------------------------
    def _start_following(self) -> None:
        """A follower: a mirror of the component's token and of every authorizer's the fleet
        knows, or this host has a file of (unless it was removed meanwhile)."""
        assert self.fleet is not None
        self.full_resync()  # removals told, tickets taken, the fleet's authorizers followed
        self._follow(self.comp.component_appid)
        local = sorted(set(self._local_tokens()) - set(self.stores))
        gone = self.fleet.gone(local)
        for appid in local:
            if appid in gone:  # removed while this host was down
                self.files.remove_authorizer(appid)
            else:
                self._follow(appid)

    def _local_tokens(self) -> list[str]:
        """The authorizers this host has a token file of."""
        try:
            names = os.listdir(self.files.dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")
                      and not n.endswith(".status.json") and APP_NAME_RE.match(n[:-5])
                      and n[:-5] != self.comp.component_appid)

    def _push_missing(self, entries: dict[str, dict[str, Any]]) -> None:
        """This host's refresh tokens into Redis where Redis lacks them (restarted empty: the
        host that refreshed last wins), where they follow from Redis's (rotated here while
        Redis could not be written), or where they come from a later authorization; an
        authorizer removed meanwhile goes here too."""
        assert self.fleet is not None
        reseeded = 0
        for appid in self.files.authorizers():
            try:
                doc = self.files.refresh(appid) or {}
            except ValueError:
                continue
            theirs = entries.get(appid)
            mine = doc.get("refresh_token")
            seeded = theirs is None or bool(theirs.get("seeded"))
            if theirs is not None and (
                    theirs.get("refresh_token") == mine or not (
                        theirs.get("refresh_token") in (doc.get("previous"), doc.get("fleet"))
                        or as_number(doc.get("authorized_at")) >
                        as_number(theirs.get("authorized_at"))
                        or (seeded and as_number(doc.get("updated_at")) >
                            as_number(theirs.get("updated_at"))))):
                continue
            previous = doc.get("previous")
            result = self.fleet.push_refresh(
                appid, doc, after=(previous,) if isinstance(previous, str) else (),
                seeded=seeded)
            if result == Pushed.GONE:
                self.log.info("authorizer.removed_elsewhere", app=appid)
                self.later_remove(appid)
            elif result == Pushed.STORED:
                reseeded += 1
        if reseeded:
            self.log.warning("fleet.refresh_tokens_reseeded", authorizers=reseeded,
                             reason="Redis lacked them or had older ones (restarted empty, or "
                             "written while it was unreachable)")

    def full_resync(self) -> None:
        """Every reconnect, and a message lost: removals made while Redis was away are told,
        the fleet's authorizers and tickets are taken, this host's newer refresh tokens go to
        Redis."""
        assert self.fleet is not None
        for appid, at in sorted(self._tombstones().items()):
            if self.fleet.remove(appid, at) is not None:  # told (or authorized again since)
                self._forget_tombstone(appid)
        with self._lock:  # a follower's wait for Redis
            waiting = sorted(self._cancels)
        for appid in waiting:
            self._cancel_later(appid, 0.0)
        self._ticket_news()
        # authorizations and rotations made here while Redis was away go there first, so
        # that the set's news below does not remove them
        adopted = False
        if not self.following and (entries := self.fleet.all_refresh()) is not None:
            self.fleet.adopt_all(entries, self.files)
            self._push_missing(entries)
            adopted = True
        self.resync_members(adopted)

    def _tombstones(self) -> dict[str, float]:
        found = self.files.platform().get("removed")
        return dict(found) if isinstance(found, dict) else {}

    def _forget_tombstone(self, appid: str) -> None:
        with self._lock:
            left = self._tombstones()
            left.pop(appid, None)
            self.files.note(durable=True, removed=left or None)

    def resync_members(self, adopted: bool = False) -> None:
        """The fleet's authorizers changed: start the new ones here, remove those another
        host removed. ``adopted``: the fleet's refresh tokens were just taken (no need to ask
        for each new one)."""
        assert self.fleet is not None
        members = self.fleet.members()
        if members is None:
            return
        with self._tokens:
            mine = {a for a in self.stores if a != self.comp.component_appid}
        removed_here = self._tombstones()  # not yet told to Redis: not taken back from it
        added = sorted(members - mine - set(removed_here))
        missing = sorted(mine - members)
        for appid, at in self.fleet.gone(missing).items():
            if self._authorized_at(appid) <= at:  # not authorized here since
                self.later_remove(appid)
        if self.following:
            for appid in added:
                self._follow(appid)
            return
        for appid in added:
            if not adopted:
                self.fleet.pull_refresh(appid, self.files)
            try:
                known = self.files.refresh(appid) is not None
            except ValueError:
                known = False
            if known:
                self._add(appid)

    def _authorized_at(self, appid: str) -> float:
        try:
            return as_number((self.files.refresh(appid) or {}).get("authorized_at"))
        except ValueError:
            return 0.0

    def _ticket_news(self) -> None:
        """Another host received a ticket: take it; a component token waiting for one is
        fetched now."""
        assert self.fleet is not None
        if self.fleet.pull_tickets(self.files) and not self.following \
                and self.component_token() is None:
            self._end_ticket_wait()

    def _handed_over(self, data: str) -> None:
        """An authorization that reached a follower: one candidate exchanges the code."""
        assert self.fleet is not None
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and "unauthorized" in doc:
                self._cancel_handed_over(doc)
                return
            appid, code = doc["authorized"], doc["code"]
        except (ValueError, KeyError, TypeError):
            return
        when = _number(doc.get("at"))
        if isinstance(appid, str) and APP_NAME_RE.match(appid) and isinstance(code, str) \
                and code and self.fleet.claim(code):
            self.host.later(lambda: self.on_authorized(appid, code, at=when), 0,
                            f"authorize:{self.comp.name}/{appid}")

    def _cancel_handed_over(self, doc: dict[str, Any]) -> None:
        """An unauthorized event that reached a follower, for WeChat to be asked: one
        candidate takes it (and keeps it, as if pushed to it)."""
        assert self.fleet is not None
        appid, ident = doc.get("unauthorized"), doc.get("id")
        if not isinstance(appid, str) or not APP_NAME_RE.match(appid) \
                or not isinstance(ident, str) or not ident \
                or not self.fleet.claim(f"unauthorized:{ident}"):
            return
        self._note_cancel(appid, _number(doc.get("at")), must_keep=False)
        self._cancel_later(appid, 0.0)

    def component_token(self) -> str | None:
        """The component token in its file, when valid for a second more."""
        try:
            record = load_record(token_path(self.files.dir, self.comp.component_appid),
                                 self.comp.component_appid)[0]
        except TokenUnavailable:
            return None
        return record.access_token if record.expires_at > time.time() + 1 else None

    def component_ready(self) -> None:
        """A component token was fetched: a reconcile that waited for one runs now (the
        refresher writes the file right after this: a moment later)."""
        if self._reconcile_waiting:
            self._reconcile_waiting = False
            self.host.later(self.reconcile, 0.5, f"reconcile:{self.comp.name}")

    def component_refused(self, token: str) -> None:
        """WeChat refused the component token (an authorizer call said so): replace it."""
        self.log.warning("component.token_refused", token=mask(token))
        self.host.later(lambda: self._force_component(token), 0,
                        f"component-refresh:{self.comp.name}")

    def _force_component(self, token: str) -> None:
        self.host.force(self.component_key, token, True)

    # -- the ticket -------------------------------------------------------------------------------
    def on_ticket(self, ticket: str, via: str) -> bool:
        """A component_verify_ticket arrived (pushed, or handed over): kept durably; a
        component token waiting for one is fetched at once. False when it was known."""
        if not ticket or len(ticket) > 512 or not ticket.isprintable():
            raise WxtokenError("not a component_verify_ticket")
        now = self.clock()
        before = self.files.newest_ticket_at()
        stored = self.files.store_ticket(ticket, now)
        if self.fleet is not None:  # off the callback's thread (WeChat waits 5 s at most)
            fleet = self.fleet

            def share() -> None:
                fleet.push_ticket("latest", ticket, now)
            self.host.later(share, 0, f"ticket-share:{self.comp.name}")
        if not stored:
            return False
        # one line when tickets start (or start again) arriving, not one every 10 minutes
        quiet = before is not None and now - before < 1800 and via == "callback"
        (self.log.debug if quiet else self.log.info)("component.ticket_received", via=via,
                                                     ticket=mask(ticket))
        if self.component_token() is None and not self.following:
            self._end_ticket_wait()
        return True

    def _end_ticket_wait(self) -> None:
        def run() -> None:
            refresher = self.host_refresher(self.component_key)
            if refresher is not None:
                refresher.end_wait(lambda s: s.error_class in (ErrorClass.PERMANENT,
                                                               ErrorClass.TRANSIENT),
                                   "a new component_verify_ticket arrived")
            self.host.wake(self.component_key)
        self.host.later(run, 0, f"ticket-arrived:{self.comp.name}")

    def host_refresher(self, key: str) -> Refresher | None:
        return self.host.refreshers.get(key)

    # -- authorizers ------------------------------------------------------------------------------
    def authorizer_ok(self, appid: str) -> None:
        if appid in self._needs_reauth:
            with self._lock:
                self._needs_reauth.pop(appid, None)
                pending = dict(self._needs_reauth)
            self.files.note(needs_reauth=pending or None)

    def needs_reauth(self, appid: str, reason: str) -> None:
        with self._lock:
            self._needs_reauth[appid] = reason
            pending = dict(self._needs_reauth)
        self.files.note(needs_reauth=pending)
        self.log.error("authorizer.needs_reauthorization", app=appid, reason=reason)

    def needing_reauth(self) -> dict[str, str]:
        with self._lock:
            return dict(self._needs_reauth)

    def gone(self, appid: str, reason: str, at: float | None = None) -> None:
        """The authorizer no longer authorizes the platform (since ``at``; WeChat said so: it
        is not in the authorizer list): its refresher stops (after the run in progress) and
        its files go, unless the fleet holds a later authorization."""
        self.log.warning("authorizer.unauthorized", app=appid, reason=reason)
        now = at if at is not None else self.clock()
        seen = self.files.authorization(appid)
        if self.fleet is not None:
            done = self.fleet.remove(appid, now)
            if done is False:
                self.log.info("authorizer.kept", app=appid, reason="the fleet holds an "
                              "authorization made after that: its files stay")
                return
            if done:  # the fleet's word: every host removes its files
                self.later_remove(appid)
                return
            self._tombstone(appid, max(now, seen[0] if seen else 0.0))
        self.host.later(lambda: self._remove(appid, seen, check=True), 0,
                        f"remove:{self.comp.name}/{appid}")

    def _tombstone(self, appid: str, at: float) -> None:
        """Redis could not be told of a removal: kept durably, told at the next resync."""
        with self._lock:  # every host removes it once Redis is told (at the next resync)
            self.files.note(durable=True, removed={**self._tombstones(), appid: at})

    def _remove(self, appid: str, seen: tuple[float, float | None] | None = None,
                check: bool = False) -> None:
        """Stop the authorizer's refresher and delete its files. ``check``: only while the
        authorization this host holds is still ``seen`` (the one the removal was decided
        against; None: none), else it is kept (authorized again meanwhile)."""
        key = self.key(appid)
        with self._tokens:
            self.host.remove_refresher(key)
            store = self.stores.pop(appid, None)
            if store is not None and self.node is not None:
                self.node.sync.remove(store)
        # a refresh in flight finishes before the files go (none starts again)
        if not self.host.settle(key, 30.0):
            self.log.warning("authorizer.remove_waited", app=appid,
                             reason="a refresh still runs after 30 s: its files may come back "
                             "until its next run removes them")
        with self.files.refresh_lock:  # no authorization is stored in between
            if check and self.files.authorization(appid) != seen:
                removed = None
            else:
                removed = self.files.remove_authorizer(appid)
        if removed is None:
            self.log.info("authorizer.kept", app=appid, reason="authorized again while its "
                          "removal was decided: its files stay")
            self._add(appid)
            return
        with self._lock:
            self.keys.discard(key)
            self._needs_reauth.pop(appid, None)
            pending = dict(self._needs_reauth)
        self.files.note(needs_reauth=pending or None)
        self.log.info("authorizer.removed", app=appid, files=len(removed))

    # -- unauthorized events -------------------------------------------------------------------
    def on_unauthorized(self, appid: str, at: float | None = None) -> None:
        """An ``unauthorized`` event sent at ``at`` (its CreateTime; None: it has none): kept
        durably (OSError when it cannot be: the push is answered 503 and WeChat pushes it
        again), then decided off the callback's thread."""
        self._note_cancel(appid, at)
        self._cancel_later(appid, 0.0)

    def _note_cancel(self, appid: str, at: float | None, must_keep: bool = True) -> None:
        """Keep a cancellation to decide; with one pending already, the later WeChat time
        stands for both (either one after the authorization removes it). OSError when it
        cannot be kept durably (unless not ``must_keep``: then it is kept in memory only)."""
        with self._lock:
            before = _number((self._cancels.get(appid) or {}).get("at"))
            if before is not None and (at is None or before > at):
                at = before
            entry = {"at": at, "received": time.time()}
            try:
                self.files.note_entry(CANCELLING, appid, entry)
            except OSError as exc:
                if must_keep:
                    raise
                self.log.error("authorizer.unauthorized_unstored", app=appid, error=str(exc),
                               reason="the unauthorized event could not be kept durably: it "
                               "is decided now, but not after a restart")
            self._cancels[appid] = entry
            self._cancel_since[appid] = time.monotonic()

    def _forget_cancel(self, appid: str, entry: dict[str, Any]) -> None:
        """The cancellation ``entry`` is decided; one that came meanwhile is decided next (its
        run was skipped while this one ran: one run per job at a time)."""
        with self._lock:
            if self._cancels.get(appid) is not entry:
                self._cancel_later(appid, 1.0)
                return
            self._cancels.pop(appid, None)
            self._cancel_since.pop(appid, None)
            try:
                self.files.note_entry(CANCELLING, appid, None)
            except OSError as exc:  # decided again after a restart: the same verdict
                self.log.warning("authorizer.unauthorized_unstored", app=appid,
                                 error=str(exc))

    def _cancel_later(self, appid: str, delay: float, attempt: int = 0) -> None:
        self.host.later(lambda: self._cancel(appid, attempt), delay,
                        f"unauthorized:{self.comp.name}/{appid}")

    def _cancel(self, appid: str, attempt: int = 0) -> None:
        """Decide a pending cancellation: on the fleet by Redis (a follower hands what WeChat
        must be asked to a candidate); on one host, or while Redis is unreachable, against
        this host's own authorization (a follower, which holds none, waits for Redis)."""
        with self._lock:
            entry = self._cancels.get(appid)
        if entry is None:
            return  # decided meanwhile
        at = _number(entry.get("at"))
        if self.fleet is not None:
            if self._cancel_on_fleet(appid, at, entry, attempt):
                return
            if self.following:
                self.log.warning("authorizer.unauthorized_deferred", app=appid,
                                 reason="Redis is unreachable, and this host follows the "
                                 "platform (it holds no authorization to compare with and "
                                 "calls no WeChat API): decided when Redis is back; its files "
                                 "stay meanwhile")
                return
        seen = self.files.authorization(appid)
        wechat = seen[1] if seen is not None else None
        if seen is not None and at is not None and wechat is not None and at != wechat:
            if at < wechat:
                self._cancel_stale(appid, at, wechat, entry)
                return
        elif seen is not None:  # a tie, or a time missing: WeChat says
            listed = self._confirm(appid, attempt)
            if listed is None:
                return
            if listed:
                self._cancel_refuted(appid, entry)
                return
        self.log.warning("authorizer.unauthorized", app=appid, reason="an unauthorized event",
                         sent_at=at, authorized_at=wechat)
        if self.fleet is not None:  # Redis is unreachable: told at the next resync
            self._tombstone(appid, max(at if at is not None else self.clock(),
                                       seen[0] if seen is not None else 0.0))
        self._forget_cancel(appid, entry)
        self.host.later(lambda: self._remove(appid, seen, check=True), 0,
                        f"remove:{self.comp.name}/{appid}")

    def _cancel_on_fleet(self, appid: str, at: float | None, entry: dict[str, Any],
                         attempt: int) -> bool:
        """Redis decides against the fleet's authorization; WeChat is asked on a tie or a
        missing time. False when Redis is unreachable (nothing was done)."""
        assert self.fleet is not None
        got = self.fleet.cancel(appid, at)
        if got is None:
            return False
        verdict, seen = got
        if verdict == Verdict.REFUSED:
            self._cancel_stale(appid, at, None, entry)
            return True
        if verdict == Verdict.CONFIRM:
            if self.following:
                if self.fleet.hand_over_cancel(appid, at):
                    self._forget_cancel(appid, entry)  # a candidate keeps and decides it
                    self.log.info("authorizer.unauthorized_handed_over", app=appid,
                                  reason="WeChat is asked whether it still authorizes the "
                                  "platform, by a host with the component's secret")
                else:
                    (self.log.error if attempt == 0 else self.log.debug)(
                        "authorizer.not_handed_over", app=appid, next_in=60,
                        reason="no host with the component's secret is listening: the "
                        "unauthorized event waits (its files stay)")
                    self._cancel_later(appid, 60.0, attempt + 1)
                return True
            listed = self._confirm(appid, attempt)
            if listed is None:
                return True
            if listed:
                self._cancel_refuted(appid, entry)
                return True
            done = self.fleet.remove(appid, at, seen)
            if done is None:
                return False
            if not done:
                self._forget_cancel(appid, entry)
                self.log.info("authorizer.kept", app=appid, reason="authorized again while "
                              "the unauthorized event was decided: its files stay")
                return True
        self._forget_cancel(appid, entry)
        self.log.warning("authorizer.unauthorized", app=appid, reason="an unauthorized event",
                         sent_at=at)
        self.later_remove(appid)  # every host does, on the set's news
        return True

    def _cancel_stale(self, appid: str, at: float | None, wechat: float | None,
                      entry: dict[str, Any]) -> None:
        self._forget_cancel(appid, entry)
        self.log.warning("authorizer.unauthorized_ignored", app=appid, sent_at=at,
                         authorized_at=wechat,
                         reason="the unauthorized event was sent (CreateTime) before the "
                         "authorization held: a late or replayed push; its files stay")

    def _cancel_refuted(self, appid: str, entry: dict[str, Any]) -> None:
        self._forget_cancel(appid, entry)
        self.log.warning("authorizer.unauthorized_ignored", app=appid,
                         reason="WeChat still lists the authorizer (api_get_authorizer_list, "
                         "read after the unauthorized event, which could not be ordered "
                         "against the authorization by CreateTime): its files stay")

    def _confirm(self, appid: str, attempt: int) -> bool | None:
        """Whether WeChat still lists the authorizer, on a read of the authorizer list started
        after its last unauthorized event (the read the 61023 repairs share); None when that
        cannot be known now: the cancellation is tried again later."""
        token = self.component_token()
        if token is None:
            self._cancel_later(appid, 60.0, attempt + 1)
            return None
        with self._lock:
            since = self._cancel_since.get(appid)
        try:
            read = self.authorizer_list(token, newer_than=since)
        except UpstreamError as exc:
            wait = max(self._list_due(), min(CANCEL_BACKOFF, LIST_WINDOW * 2.0 ** attempt))
            self.log.warning("authorizer.unauthorized_unconfirmed", app=appid,
                             error=str(exc), errcode=exc.errcode, next_in=round(wait),
                             reason="the authorizer list could not be read to confirm the "
                             "unauthorized event: its files stay meanwhile")
            self._cancel_later(appid, wait, attempt + 1)
            return None
        if read is None:  # the last read predates the event: the next one decides
            self._cancel_later(appid, self._list_due(), attempt)
            return None
        return appid in read.entries

    def _list_due(self) -> float:
        """Seconds until the next read of the authorizer list may start (at least one: a job
        that plans itself again must have ended by then, or its next run is skipped)."""
        last = self._list_read
        if last is None:
            return 1.0
        return max(0.0, LIST_WINDOW - (time.monotonic() - last.started)) + 1.0

    def on_authorized(self, appid: str, code: str, attempt: int = 0,
                      at: float | None = None, reached: bool = False) -> None:
        """An authorization (new or updated; sent at ``at``, its CreateTime): exchange the
        code, store the refresh token, write the token, start refreshing. Retried while no
        component token is there yet. When WeChat may have used the code but its answer was
        lost (no answer came, or the code is spent after an earlier try ``reached`` WeChat),
        the authorization is taken from the authorizer list instead."""
        token = self.component_token()
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
        if self._publish(appid, record, refresh_token=refresh_token,
                         authorized_at=at if at is not None else asked, since=asked,
                         wechat_at=at):
            self.authorizer_ok(appid)
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
        token = self.component_token()
        read: _ListRead | None = None
        problem = "no valid component_access_token"
        if token is not None:
            try:
                read = self.authorizer_list(token, newer_than=since)
            except UpstreamError as exc:
                problem = f"the authorizer list could not be read: {exc}"
            else:
                if read is None:  # the last read predates the exchange: the next one tells
                    self._adopt_later(appid, self._list_due(), attempt)
                    return
        listed = read.entries.get(appid) if read is not None else None
        if read is not None and listed is None:
            problem = "not in api_get_authorizer_list (yet)"
            with self._lock:  # the next look needs a new read
                if self._adopting.get(appid) == pending:
                    self._adopting[appid] = (at, read.started + 1e-6)
        if listed is None:
            if attempt + 1 < ADOPT_TRIES:
                self._adopt_later(appid, max(self._list_due(), 5.0), attempt + 1)
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
                self.store_refresh(appid, listed, now,
                                   authorized_at=at if at is not None else now, wechat_at=at)
            except StoreError as exc:
                self.log.error("authorizer.store_failed", app=appid, error=str(exc), next_in=60)
                self._adopt_later(appid, 60.0, attempt)
                return
        self._adopted(appid)
        self.log.warning("authorizer.adopted", app=appid, reason="the answer of "
                         "api_query_auth was lost (WeChat used the code): the authorization "
                         "is taken from api_get_authorizer_list")
        refresher = self._add(appid)  # a new one fetches its token at once
        if refresher is not None:  # known already: it fetches now if a failure held it
            refresher.end_wait(lambda s: s.error_class is not None,
                               "a new authorization (from the authorizer list)")
            self.host.wake(self.key(appid))

    def _publish(self, appid: str, record: TokenRecord, status: AppStatus | None = None,
                 refresh_token: str | None = None, authorized_at: float | None = None,
                 since: float | None = None, wechat_at: float | None = None) -> bool:
        """Write an authorizer's token obtained outside its refresher (an authorization, an
        import) and make sure a refresher keeps it fresh. ``refresh_token`` is stored first,
        under the token's lock (the fleet's lease): no host refreshes the authorizer between
        the two writes, which would retire the token about to be written. ``since``: when the
        token was asked for; a token another host wrote after that is newer and stays. False
        when the token could not be written."""
        key = self.key(appid)
        with self._tokens:  # one refresher per authorizer, whoever else registers it
            refresher = self.host_refresher(key)
            if refresher is None:
                refresher = self._refresher(appid)
            self._publishing.add(appid)  # _add leaves it alone meanwhile
        written = stored = False
        try:
            with refresher.store.locked(refresher.lock_timeout):
                current = refresher.store.read() if since is not None else None
                if current is not None and since is not None and \
                        current.access_token != record.access_token and \
                        current.refreshed_at >= int(since):
                    # another host refreshed it meanwhile: its token and refresh token follow
                    # on from this authorization's, and stay
                    written = stored = True
                else:
                    if refresh_token is not None:
                        self.store_refresh(appid, refresh_token, self.clock(),
                                           authorized_at=authorized_at, wechat_at=wechat_at)
                        stored = True
                    refresher.store.write(record)
                    written = True
                    fresh = status or refresher.store.read_status()
                    fresh.last_result = LastResult.OK
                    fresh.last_success_at = time.time()
                    fresh.refreshed_at_exact = float(record.refreshed_at)
                    fresh.failures, fresh.retry_at = 0, 0.0
                    fresh.error_class = fresh.errcode = fresh.errmsg = fresh.error = None
                    refresher.store.write_status(fresh)
        except (StoreError, TokenUnavailable) as exc:
            self.log.error("authorizer.store_failed", app=appid, error=str(exc))
            if refresh_token is not None and not stored:  # never lose a refresh token
                self.store_refresh(appid, refresh_token, self.clock(),
                                   authorized_at=authorized_at, wechat_at=wechat_at)
        finally:
            with self._tokens:
                self._publishing.discard(appid)
                registered = self.host_refresher(key) is not None
                if not registered:  # scheduled from the new file (no call: it is fresh)
                    with self._lock:
                        self.keys.add(key)
                    self.host.add_refresher(key, refresher)
        if registered:
            self.host.wake(key)  # decides again from the new file (no call: it is fresh)
        return written

    def _authorization(self, appid: str, code: str, at: float | None) -> None:
        """An authorization event: exchanged here, or (the fleet mode) by one candidate."""
        if self.fleet is not None:
            if self.following:
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

    # -- reconcile --------------------------------------------------------------------------------
    def _list(self, token: str) -> dict[str, str]:
        """Every authorizer and its current refresh token, from WeChat (paged)."""
        listed: dict[str, str] = {}
        offset = 0
        while True:
            page = self.host.client.authorizer_list(self.comp.component_appid, token, offset,
                                                    LIST_PAGE)
            items = page.get("list")
            items = items if isinstance(items, list) else []
            for item in items:
                if isinstance(item, dict):
                    appid, rt = item.get("authorizer_appid"), item.get("refresh_token")
                    if isinstance(appid, str) and APP_NAME_RE.match(appid) \
                            and isinstance(rt, str) and rt:
                        listed[appid] = rt
            offset += len(items)
            total = page.get("total_count")
            if not items or not isinstance(total, int) or offset >= total:
                return listed

    def authorizer_list(self, token: str, newer_than: float | None = None) -> _ListRead | None:
        """The authorizer list for 61023 repairs: one read (every page) serves every repair
        for LIST_WINDOW s, and repairs that come while it is being read wait for it. None when
        the last read started before ``newer_than`` (monotonic) and the next is not due yet;
        UpstreamError when the read fails (or failed within the window: no new call)."""
        with self._list_lock:  # single flight: one read at a time, the others wait for it
            now = time.monotonic()
            last = self._list_read
            if last is not None and now - last.started < LIST_WINDOW:
                if last.error is not None:
                    raise last.error
                if newer_than is None or last.started >= newer_than:
                    return last
                return None
            read = _ListRead(started=now)
            try:
                read.entries = self._list(token)
            except UpstreamError as exc:
                read.error = exc
                self._list_read = read
                raise
            self._list_read = read
            return read

    def reconcile(self) -> None:
        """Learn every authorizer from WeChat's list: new ones start, known ones keep the
        listed refresh token as a fallback. Runs daily; retried soon while there is no
        component token."""
        token = self.component_token()
        if token is None:  # run when the component token comes (or in a minute at most)
            self._reconcile_waiting = True
            self.host.later(self.reconcile, 60, f"reconcile:{self.comp.name}")
            return
        self._reconcile_waiting = False
        if self.fleet is not None and not self.fleet.take_reconcile(RECONCILE_EVERY):
            wait = self.fleet.reconcile_wait()  # another host did it: look again when due
            self.host.later(self.reconcile,
                            max(60.0, wait if wait is not None else RECONCILE_EVERY),
                            f"reconcile:{self.comp.name}")
            return
        try:
            listed = self._list(token)
        except UpstreamError as exc:
            self.log.warning("authorizers.reconcile_failed", error=str(exc),
                             errcode=exc.errcode, next_in=600)
            if self.fleet is not None:
                self.fleet.release_reconcile()
            self.host.later(self.reconcile, 600, f"reconcile:{self.comp.name}")
            return
        now = self.clock()
        known = set(self.files.authorizers())
        added = 0
        try:
            for appid, refresh_token in listed.items():
                if appid not in known:
                    # removed lately (an unauthorized event; the list may lag): not brought
                    # back
                    stored = self.store_refresh(appid, refresh_token, now)
                    if stored == Pushed.GONE:
                        self.files.remove_authorizer(appid)
                        continue
                    if stored == Pushed.OLDER and self.fleet is not None:  # the fleet knows it
                        self.fleet.pull_refresh(appid, self.files)
                        self.files.note_listed(appid, refresh_token, now)
                    self._add(appid)
                    added += 1
                else:
                    self.files.note_listed(appid, refresh_token, now)
        except StoreError as exc:  # the refresh directory refuses writes: again in 10 min
            self.log.error("authorizers.reconcile_failed", error=str(exc), next_in=600)
            if self.fleet is not None:
                self.fleet.release_reconcile()
            self.host.later(self.reconcile, 600, f"reconcile:{self.comp.name}")
            return
        unlisted = sorted(known - set(listed))
        self.files.note(last_reconcile=now, listed=len(listed))
        self.log.info("authorizers.reconciled", listed=len(listed), added=added,
                      not_listed=len(unlisted))
        self.host.later(self.reconcile, RECONCILE_EVERY, f"reconcile:{self.comp.name}")

    # -- import ----------------------------------------------------------------------------------
    def _import_line(self, raw: bytes, now: float) -> tuple[str, str, TokenRecord | None]:
        """One line of an import: (authorizer_appid, refresh token, the token record when a
        still valid access token came with it); ValueError says what is wrong (never with a
        token in it)."""
        if len(raw) > MAX_IMPORT_LINE:
            raise ValueError(f"longer than {MAX_IMPORT_LINE} bytes")
        try:
            doc = json.loads(raw)
        except RecursionError:  # nested deeper than the interpreter's recursion limit
            raise ValueError("not a JSON object (nested too deep)") from None
        except ValueError as exc:
            raise ValueError(f"not a JSON object ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        appid, rt = doc.get("authorizer_appid"), doc.get("refresh_token")
        if not isinstance(appid, str) or not APP_NAME_RE.match(appid):
            raise ValueError("authorizer_appid is missing or not an appid")
        if appid == self.comp.component_appid:
            raise ValueError(f"authorizer_appid {appid} is the component's own appid, not an "
                             "authorizer's")
        if not isinstance(rt, str) or not rt.strip():
            raise ValueError("refresh_token is missing")
        rt = rt.strip()
        if not TOKEN_CHARS.fullmatch(rt):
            raise ValueError("refresh_token holds a character no token has (a control "
                             "character, a space or a non-ASCII one)")
        access, expires = doc.get("access_token"), doc.get("expires_at")
        if access is None and expires is None:
            return appid, rt, None
        if not isinstance(access, str) or not access or isinstance(expires, bool) \
                or not isinstance(expires, int):
            raise ValueError("access_token needs expires_at (Unix seconds), and the other way "
                             "round")
        if not TOKEN_CHARS.fullmatch(access):
            raise ValueError("access_token holds a character no token has (a control "
                             "character, a space or a non-ASCII one)")
        if len(access) > MAX_TOKEN_LEN:
            raise ValueError(f"access_token is longer than {MAX_TOKEN_LEN} characters")
        if expires > now + IMPORT_AHEAD:
            raise ValueError(f"expires_at lies more than {int(IMPORT_AHEAD // 60)} minutes "
                             "ahead: an access_token lives 2 hours (Unix seconds, this "
                             "host's clock)")
        if expires <= now + 1:  # expired: no valid token, the refresh token fetches one
            return appid, rt, None
        refreshed = doc.get("refreshed_at")
        if not isinstance(refreshed, int) or isinstance(refreshed, bool):
            # unknown: counted from now, so it is replaced by its expiry (less renew_before),
            # not at once
            refreshed = int(now)
        elif refreshed > now + FUTURE_TOLERANCE or refreshed > expires:
            raise ValueError("refreshed_at lies ahead of this host's clock or after "
                             "expires_at")
        return appid, rt, TokenRecord(app=appid, appid=appid, access_token=access,
                                      expires_at=expires, refreshed_at=max(1, refreshed))

    def import_lines(self, lines: list[bytes]) -> dict[str, Any]:
        """Seed authorizers from another system: JSON lines of authorizer_appid, refresh_token
        and optionally access_token + expires_at (+ refreshed_at). A valid imported token is
        used until it is due: the switch costs no refresh. Every line is checked before any is
        stored."""
        if self.following:
            raise WxtokenError(f"this host only follows component {self.comp.name} (no "
                               "secret): import on a host of the fleet that has its secret")
        entries = []
        problems = []
        now = time.time()
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                entries.append(self._import_line(raw, now))
            except ValueError as exc:
                problems.append(f"line {number}: {exc}")
        if problems:
            raise WxtokenError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)"
                                                           if len(problems) > 5 else ""))
        tokens = 0
        for appid, refresh_token, record in entries:
            if record is not None:
                tokens += 1
                self._publish(appid, record, refresh_token=refresh_token,
                              authorized_at=self.clock())
            else:
                self.store_refresh(appid, refresh_token, self.clock(),
                                   authorized_at=self.clock())
                self._add(appid)
        self.log.info("authorizers.imported", authorizers=len(entries), tokens=tokens)
        return {"imported": len(entries), "with_token": tokens}

    # -- events -----------------------------------------------------------------------------------
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
            self.on_ticket(ticket, "callback")
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
            self.on_unauthorized(appid, self._event_time(fields))
            return info
        return "ignored"

    # -- health -----------------------------------------------------------------------------------
    def ticket_problem(self, now: float) -> str | None:
        """The newest ticket's age counts from its first receipt; the last push (the same
        ticket again, or a new one) says whether pushes still come."""
        pushed = self.files.platform().get("ticket_pushed_at")
        return ticket_problem(self.files.newest_ticket_at(),
                              pushed if isinstance(pushed, (int, float)) else None, now,
                              self.files.ticket_life)
