"""One component's authorizers: which tokens this host keeps, and their refresh tokens.

Registration (a refresher per token, a FleetStore beside it in the fleet mode, a follower's
mirror), a token published outside its refresher (an authorization, an import), the refresh
token stored durably (then pushed to Redis), an authorizer's removal (refresher stopped, files
deleted), the removals Redis has not been told of yet (tombstones), and the authorizers that
need a new authorization.
"""

from __future__ import annotations

import random
import threading

from wxtoken.component.fleet import Pushed
from wxtoken.component.parts import Part, Parts
from wxtoken.component.sources import AuthorizerFetcher, ComponentFetcher
from wxtoken.errors import StoreError, TokenUnavailable
from wxtoken.fleet.connect import REDIS_ERRORS
from wxtoken.fleet.store import FleetStore
from wxtoken.logs import get_logger
from wxtoken.record import TokenRecord
from wxtoken.refresher import Refresher
from wxtoken.status import AppStatus, LastResult
from wxtoken.store import FileStore


class Authorizers(Part):
    """The tokens one platform registered with the daemon, and its authorizers' bookkeeping."""

    def __init__(self, parts: Parts, rng: random.Random, component_fetcher: ComponentFetcher,
                 authorizer_fetcher: AuthorizerFetcher) -> None:
        super().__init__(parts)
        self.rng = rng
        self.component_fetcher = component_fetcher
        self.authorizer_fetcher = authorizer_fetcher
        self.keys: set[str] = set()  # the refreshers this platform registered
        self.stores: dict[str, FleetStore] = {}  # the fleet mode: each token's FleetStore
        # registering and removing a token (refresher, FleetStore) is check-then-act from the
        # scheduler's, the platform's and the fleet's sync threads
        self.tokens = threading.RLock()
        self._publishing: set[str] = set()  # authorizers whose token publish() is writing
        self._needs_reauth: dict[str, str] = {}

    # -- registration ---------------------------------------------------------------------------
    def build_refresher(self, appid: str) -> Refresher:
        component = appid == self.comp.component_appid
        app = self.parts.app(appid, () if component else self.comp.tickets)
        fetcher = self.component_fetcher if component else self.authorizer_fetcher
        local = FileStore(self.files.dir, appid, 0o640, None)
        store: FileStore | FleetStore = local
        if self.parts.node is not None:
            store = self._fleet_store(appid, local)
        log = get_logger(component=self.comp.name, app=appid,
                         role="component" if component else "authorizer")
        return Refresher(self.host.config, app, fetcher, store=store,
                         clock=self.clock, rng=self.rng, log=log,
                         population=self.host.population)

    def _fleet_store(self, appid: str, local: FileStore) -> FleetStore:
        """The token's FleetStore (record, lease, generation in Redis), followed by the sync
        thread: another host's refresh rewrites this host's file."""
        assert self.parts.node is not None and self.fleet is not None
        fleet = self.fleet
        store = FleetStore(self.parts.node.fleet, self.parts.app(appid),
                           identity=fleet.identity(appid), local=local,
                           key=self.parts.key(appid),
                           still_removed=lambda: fleet.still_removed(appid))
        with self.tokens:
            old = self.stores.get(appid)
            if old is not None:
                self.parts.node.sync.remove(old)
            self.stores[appid] = store
            self.parts.node.sync.add(store)
        return store

    def add(self, appid: str) -> Refresher | None:
        """Start keeping an authorizer's token (the one registered already, if any)."""
        key = self.parts.key(appid)
        if self.parts.following:
            self.follow(appid)
            return None
        with self.tokens:
            refresher = self.parts.host_refresher(key)
            if refresher is not None or appid in self._publishing:
                return refresher
            refresher = self.build_refresher(appid)
            with self._lock:
                self.keys.add(key)
            self.host.add_refresher(key, refresher)
        return refresher

    def follow(self, appid: str) -> None:
        """A follower's mirror of one token: its file follows the fleet's record."""
        assert self.parts.node is not None
        with self.tokens:
            if appid in self.stores:
                return
            store = self._fleet_store(appid, FileStore(self.files.dir, appid, 0o640, None))
            with self._lock:
                self.keys.add(self.parts.key(appid))
        if self.parts.node.fleet.up:
            try:
                store.sync()
            except REDIS_ERRORS as exc:
                self.parts.node.fleet.mark_down(exc)

    # -- refresh tokens, a token published outside its refresher, an authorizer removed -------
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
        if authorized and appid in self.tombstones():
            self.forget_tombstone(appid)  # authorized again since it was removed here
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
        self.host.later(lambda: self.remove(appid), 0, f"remove:{self.comp.name}/{appid}")

    def publish(self, appid: str, record: TokenRecord, status: AppStatus | None = None,
                refresh_token: str | None = None, authorized_at: float | None = None,
                since: float | None = None, wechat_at: float | None = None) -> bool:
        """Write an authorizer's token obtained outside its refresher (an authorization, an
        import) and make sure a refresher keeps it fresh. ``refresh_token`` is stored first,
        under the token's lock (the fleet's lease): no host refreshes the authorizer between
        the two writes, which would retire the token about to be written. ``since``: when the
        token was asked for; a token another host wrote after that is newer and stays. False
        when the token could not be written."""
        key = self.parts.key(appid)
        with self.tokens:  # one refresher per authorizer, whoever else registers it
            refresher = self.parts.host_refresher(key)
            if refresher is None:
                refresher = self.build_refresher(appid)
            self._publishing.add(appid)  # add() leaves it alone meanwhile
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
                    fresh.succeeded(self.clock())
                    fresh.last_result = LastResult.OK
                    fresh.refreshed_at_exact = float(record.refreshed_at)
                    refresher.store.write_status(fresh)
        except (StoreError, TokenUnavailable) as exc:
            self.log.error("authorizer.store_failed", app=appid, error=str(exc))
            if refresh_token is not None and not stored:  # never lose a refresh token
                self.store_refresh(appid, refresh_token, self.clock(),
                                   authorized_at=authorized_at, wechat_at=wechat_at)
        finally:
            with self.tokens:
                self._publishing.discard(appid)
                registered = self.parts.host_refresher(key) is not None
                if not registered:  # scheduled from the new file (no call: it is fresh)
                    with self._lock:
                        self.keys.add(key)
                    self.host.add_refresher(key, refresher)
        if registered:
            self.host.wake(key)  # decides again from the new file (no call: it is fresh)
        return written

    def remove(self, appid: str, seen: tuple[float, float | None] | None = None,
               check: bool = False) -> None:
        """Stop the authorizer's refresher and delete its files. ``check``: only while the
        authorization this host holds is still ``seen`` (the one the removal was decided
        against; None: none), else it is kept (authorized again meanwhile)."""
        key = self.parts.key(appid)
        with self.tokens:
            self.host.remove_refresher(key)
            store = self.stores.pop(appid, None)
            if store is not None and self.parts.node is not None:
                self.parts.node.sync.remove(store)
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
            self.add(appid)
            return
        with self._lock:
            self.keys.discard(key)
            self._needs_reauth.pop(appid, None)
            pending = dict(self._needs_reauth)
        self.files.note(needs_reauth=pending or None)
        self.log.info("authorizer.removed", app=appid, files=len(removed))

    def registered(self) -> set[str]:
        """The authorizers whose token this host keeps in the fleet (a FleetStore each)."""
        with self.tokens:
            return {a for a in self.stores if a != self.comp.component_appid}

    # -- removals Redis was not told of yet (.platform.json's ``removed``) ------------------------
    def tombstones(self) -> dict[str, float]:
        found = self.files.platform().get("removed")
        return dict(found) if isinstance(found, dict) else {}

    def forget_tombstone(self, appid: str) -> None:
        with self._lock:
            left = self.tombstones()
            left.pop(appid, None)
            self.files.note(durable=True, removed=left or None)

    def tombstone(self, appid: str, at: float) -> None:
        """Redis could not be told of a removal: kept durably, told at the next resync."""
        with self._lock:  # every host removes it once Redis is told (at the next resync)
            self.files.note(durable=True, removed={**self.tombstones(), appid: at})

    # -- authorizers that must authorize the platform again ----------------------------------------
    def load_needs_reauth(self, found: dict[str, str]) -> None:
        """At start: those the last run marked (.platform.json)."""
        self._needs_reauth = found

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
