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

The parts, each given what it needs when built (``Parts``: the registry, config, files, fleet,
clock, log and lock; the other parts it calls; a fetcher gets a Protocol Platform implements):

- ``platform.py``: ``Platform``, the facade the daemon, the control endpoint, the callback and
  health use; builds the parts and starts them; the ticket and the component token.
- ``parts.py``: ``Host`` (what a platform needs of the daemon) and ``Parts`` (what every part
  shares: names, the token files, the component token in its file).
- ``sources.py``: the token sources a refresher calls (``ComponentFetcher``,
  ``AuthorizerFetcher``: the 61023 repair, a refresh token kept in memory until it is written).
- ``authorizer_list.py``: the read of WeChat's authorizer list the repairs, the cancellations
  and the lost authorizations share (one per ``LIST_WINDOW``).
- ``authorizers.py``: which tokens are registered, a token published outside its refresher, a
  refresh token stored (then pushed to Redis), an authorizer removed, tombstones, the
  authorizers that need a new authorization.
- ``events.py``: the callback's events and the authorizations (the code exchanged; a lost
  answer taken from the authorizer list).
- ``cancel.py``: ``unauthorized`` events decided, and an authorizer that is gone.
- ``reconcile.py``: the daily reconcile and ``wxtoken component import``.
- ``resync.py``: the fleet mode's resyncs and news (Redis ↔ this host), a follower's mirrors.

The locks, outermost first (a lock is only taken while holding those before it, never the
other way round; none is held across a wait for another host but a token's lock):

1. ``Authorizers.tokens`` (re-entrant): registering and removing a token. Inside it: the
   registry's and the fleet sync's own locks (``add_refresher``, ``sync.add``), and
   ``Parts.lock``. Never held while a token's lock is taken: ``publish`` takes them in turn.
2. a token's lock (``refresher.store.locked``: the file lock, the fleet's lease), held by a
   refresher's run (the fetchers run inside it) and by ``Authorizers.publish``. Inside it:
   every lock below.
3. ``AuthorizerList._lock``: one read of the authorizer list at a time, held across the WeChat
   calls; nothing else is taken inside it.
4. ``ComponentFiles.refresh_lock`` (re-entrant): a refresh-token file's read-modify-write, and
   ``Authorizers.remove``'s check-then-delete; nothing of the platform's is taken inside it.
5. ``Parts.lock``: the platform's bookkeeping (registered keys, ``needs_reauth``, tombstones,
   pending cancellations, lost authorizations). Inside it: ``ComponentFiles``' own lock
   (``note``, ``note_entry``) and the registry's scheduler (``host.later``).
6. ``ComponentFiles``' lock (``.platform.json``), ``TicketFile``'s (the ticket file; it notes
   a push in ``.platform.json`` after releasing its own) and ``AuthorizerFetcher._lock`` (its
   kept refresh tokens): innermost, nothing inside.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wxtoken.component.authorizer_list import LIST_PAGE, LIST_WINDOW, AuthorizerList, ListRead
from wxtoken.component.authorizers import Authorizers
from wxtoken.component.cancel import CANCEL_BACKOFF, CANCELLING, Cancellations
from wxtoken.component.crypto import MessageCrypto
from wxtoken.component.events import ADOPT_TRIES, ADOPTING, CODE_SPENT, Authorizations
from wxtoken.component.parts import Host, Parts
from wxtoken.component.reconcile import (
    IMPORT_AHEAD,
    MAX_IMPORT_LINE,
    RECONCILE_EVERY,
    TOKEN_CHARS,
    Reconciler,
)
from wxtoken.component.resync import FleetResync
from wxtoken.component.sources import AuthorizerFetcher, ComponentFetcher
from wxtoken.component.ticket_file import ticket_problem
from wxtoken.config import AppConfig, ComponentConfig
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import WxtokenError
from wxtoken.fleet.events import Announced, Heard, Resyncing
from wxtoken.logs import mask
from wxtoken.record import TokenRecord
from wxtoken.refresher import Refresher
from wxtoken.store import clean_state_dir

if TYPE_CHECKING:
    from wxtoken.fleet.node import FleetNode

# the names other modules and the tests import from here (the parts' own modules hold them)
__all__ = ["ADOPTING", "ADOPT_TRIES", "CANCELLING", "CANCEL_BACKOFF", "CODE_SPENT",
           "IMPORT_AHEAD", "LIST_PAGE", "LIST_WINDOW", "MAX_IMPORT_LINE", "RECONCILE_EVERY",
           "TOKEN_CHARS", "AuthorizerFetcher", "ComponentFetcher", "Host", "Platform"]


class Platform:
    """One ``[components.NAME]`` in the daemon."""

    def __init__(self, host: Host, comp: ComponentConfig, clock: Callable[[], float],
                 rng: random.Random, node: FleetNode | None = None) -> None:
        self.parts = parts = Parts.build(host, comp, clock, node)
        self.host = host
        self.node = node
        self.files = parts.files
        self.fleet = parts.fleet
        # a follower (fleet mode, no secret) never calls WeChat: it mirrors the fleet's files
        self.following = parts.following
        self.comp = comp
        self.clock = clock
        self.rng = rng
        self.crypto = MessageCrypto(comp.msg_token, comp.encoding_aes_key,
                                    comp.component_appid)
        self.log = parts.log
        self.lists = AuthorizerList(parts)
        self.component_fetcher = ComponentFetcher(parts, self)
        self.authorizer_fetcher = AuthorizerFetcher(parts, self.lists, self)
        self.authorizers = Authorizers(parts, rng, self.component_fetcher,
                                       self.authorizer_fetcher)
        self.keys = self.authorizers.keys  # the refreshers this platform registered
        self.stores = self.authorizers.stores  # the fleet mode: each token's FleetStore
        self.cancels = Cancellations(parts, self.authorizers, self.lists)
        self.events = Authorizations(parts, self.authorizers, self.lists, self.cancels,
                                     self.on_ticket)
        self.reconciler = Reconciler(parts, self.authorizers, self.lists)
        self.resync = FleetResync(parts, self.authorizers, self.cancels, self._end_ticket_wait)

    # -- names ------------------------------------------------------------------------------------
    def key(self, appid: str) -> str:
        return self.parts.key(appid)

    @property
    def component_key(self) -> str:
        return self.parts.component_key

    def app(self, appid: str, tickets: tuple[str, ...] = ()) -> AppConfig:
        return self.parts.app(appid, tickets)

    def record(self, appid: str) -> TokenRecord | None:
        """The token in this host's file (a follower's health)."""
        return self.parts.record(appid)

    def host_refresher(self, key: str) -> Refresher | None:
        return self.parts.host_refresher(key)

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the directories, register the component's refresher and one per known
        authorizer, and plan the reconcile (now when the last is more than a day old)."""
        self.files.ensure()
        for done in clean_state_dir(self.files.dir) + self.files.clean_private():
            self.log.info("state_dir.cleaned", action=done)
        doc = self.files.platform()
        self.authorizers.load_needs_reauth(dict(doc.get("needs_reauth") or {}))
        self._resume()
        if self.fleet is not None and self.node is not None:
            self.fleet.warn_without_persistence()
            events, sync = self.node.fleet.events, self.node.sync
            news = {self.fleet.members_name: self.resync.members,
                    self.fleet.ticket_name: self.resync.ticket_news}
            for name in news:
                sync.announce(name)
            events.subscribe(Announced, lambda e: news[e.name]() if e.name in news else None)
            events.subscribe(Resyncing, lambda _: self.resync.full_resync())
            if self.following:
                self.resync.start_following()
                return
            requests = self.fleet.requests
            sync.listen(requests)
            events.subscribe(Heard, lambda e: self.events.handed_over(e.data)
                             if e.channel == requests else None)
            self.resync.full_resync()  # what changed while this host was down, both ways
        self.authorizers.add(self.comp.component_appid)
        for appid in self.files.authorizers():
            self.authorizers.add(appid)
        self.reconciler.start(doc)

    def _resume(self) -> None:
        """At start: the cancellations and the lost authorizations the last run had not
        decided (kept in .platform.json) are taken up again."""
        now = time.monotonic()
        self.cancels.resume(now)
        if self.following:
            return
        self.events.resume(now)

    # -- the ticket and the component token ----------------------------------------------------
    def ticket_worked(self, ticket: str, now: float) -> None:
        self.files.ticket.worked(ticket, now)
        if self.fleet is not None:
            at = self.files.ticket.received_at(ticket)
            if at is not None:
                self.fleet.push_ticket("good", ticket, at)

    def component_token(self) -> str | None:
        """The component token in its file, when valid for a second more."""
        return self.parts.component_token()

    def component_ready(self) -> None:
        """A component token was fetched: a reconcile that waited for one runs now (the
        refresher writes the file right after this: a moment later)."""
        self.reconciler.component_ready()

    def component_refused(self, token: str) -> None:
        """WeChat refused the component token (an authorizer call said so): replace it."""
        self.log.warning("component.token_refused", token=mask(token))
        self.host.later(lambda: self._force_component(token), 0,
                        f"component-refresh:{self.comp.name}")

    def _force_component(self, token: str) -> None:
        self.host.force(self.component_key, token, True)

    def on_ticket(self, ticket: str, via: str) -> bool:
        """A component_verify_ticket arrived (pushed, or handed over): kept durably; a
        component token waiting for one is fetched at once. False when it was known."""
        if not ticket or len(ticket) > 512 or not ticket.isprintable():
            raise WxtokenError("not a component_verify_ticket")
        now = self.clock()
        before = self.files.ticket.newest_at()
        stored = self.files.ticket.store(ticket, now)
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


    # -- what other parts and the daemon call (each done by one part) ---------------------------
    def store_refresh(self, appid: str, refresh_token: str, now: float,
                      previous: str | None = None, authorized_at: float | None = None,
                      after: tuple[str, ...] = (), wechat_at: float | None = None) -> int:
        return self.authorizers.store_refresh(appid, refresh_token, now, previous=previous,
                                              authorized_at=authorized_at, after=after,
                                              wechat_at=wechat_at)

    def later_remove(self, appid: str) -> None:
        self.authorizers.later_remove(appid)

    def authorizer_ok(self, appid: str) -> None:
        self.authorizers.authorizer_ok(appid)

    def needs_reauth(self, appid: str, reason: str) -> None:
        self.authorizers.needs_reauth(appid, reason)

    def needing_reauth(self) -> dict[str, str]:
        return self.authorizers.needing_reauth()

    def gone(self, appid: str, reason: str, at: float | None = None) -> None:
        self.cancels.gone(appid, reason, at)

    def on_unauthorized(self, appid: str, at: float | None = None) -> None:
        self.cancels.on_unauthorized(appid, at)

    def on_event(self, fields: dict[str, str]) -> str:
        """One decrypted callback message; what was done (for the log)."""
        return self.events.on_event(fields)

    def on_authorized(self, appid: str, code: str, attempt: int = 0,
                      at: float | None = None, reached: bool = False) -> None:
        self.events.on_authorized(appid, code, attempt, at, reached)

    def authorizer_list(self, token: str, newer_than: float | None = None) -> ListRead | None:
        return self.lists.read(token, newer_than)

    def reconcile(self) -> None:
        self.reconciler.reconcile()

    def import_lines(self, lines: list[bytes]) -> dict[str, Any]:
        return self.reconciler.import_lines(lines)

    def full_resync(self) -> None:
        self.resync.full_resync()

    def resync_members(self, adopted: bool = False) -> None:
        self.resync.members(adopted)

    # -- health -----------------------------------------------------------------------------------
    def ticket_problem(self, now: float) -> str | None:
        """The newest ticket's age counts from its first receipt; the last push (the same
        ticket again, or a new one) says whether pushes still come."""
        pushed = self.files.platform().get("ticket_pushed_at")
        return ticket_problem(self.files.ticket.newest_at(),
                              pushed if isinstance(pushed, (int, float)) else None, now,
                              self.files.ticket.life)
