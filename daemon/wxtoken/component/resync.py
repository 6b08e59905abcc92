"""The fleet mode: one host's authorizers kept in step with the fleet's (Redis).

At start, at every reconnect and when a message was lost (``full_resync``): removals made while
Redis was away are told, the fleet's tickets and refresh tokens taken, this host's newer ones
pushed; on the authorizer set's news (``members``) new authorizers start here and those another
host removed go; on the ticket's news (``ticket_news``) a component token waiting for a ticket
is fetched. A follower (no secret) mirrors the fleet's tokens (``start_following``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from wxtoken.component.authorizers import Authorizers
from wxtoken.component.cancel import Cancellations
from wxtoken.component.fleet import Pushed
from wxtoken.component.parts import Parts
from wxtoken.record import APP_NAME_RE
from wxtoken.store import json_number


class FleetResync:
    """A platform's side of the fleet's sync thread (its hooks and resyncs)."""

    def __init__(self, parts: Parts, authorizers: Authorizers, cancels: Cancellations,
                 end_ticket_wait: Callable[[], None]) -> None:
        self.parts = parts
        self.comp, self.files, self.fleet, self.log = parts.comp, parts.files, parts.fleet, \
            parts.log
        self.authorizers = authorizers
        self.cancels = cancels
        self._end_ticket_wait = end_ticket_wait  # the component's refresher, told to fetch now

    def start_following(self) -> None:
        """A follower: a mirror of the component's token and of every authorizer's the fleet
        knows, or this host has a file of (unless it was removed meanwhile)."""
        assert self.fleet is not None
        self.full_resync()  # removals told, tickets taken, the fleet's authorizers followed
        self.authorizers.follow(self.comp.component_appid)
        local = sorted(set(self._local_tokens()) - set(self.authorizers.stores))
        gone = self.fleet.gone(local)
        for appid in local:
            if appid in gone:  # removed while this host was down
                self.files.remove_authorizer(appid)
            else:
                self.authorizers.follow(appid)

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
                        or json_number(doc.get("authorized_at")) >
                        json_number(theirs.get("authorized_at"))
                        or (seeded and json_number(doc.get("updated_at")) >
                            json_number(theirs.get("updated_at"))))):
                continue
            previous = doc.get("previous")
            result = self.fleet.push_refresh(
                appid, doc, after=(previous,) if isinstance(previous, str) else (),
                seeded=seeded)
            if result == Pushed.GONE:
                self.log.info("authorizer.removed_elsewhere", app=appid)
                self.authorizers.later_remove(appid)
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
        for appid, at in sorted(self.authorizers.tombstones().items()):
            if self.fleet.remove(appid, at) is not None:  # told (or authorized again since)
                self.authorizers.forget_tombstone(appid)
        for appid in self.cancels.waiting():  # a follower's wait for Redis
            self.cancels.later(appid, 0.0)
        self.ticket_news()
        # authorizations and rotations made here while Redis was away go there first, so
        # that the set's news below does not remove them
        adopted = False
        if not self.parts.following and (entries := self.fleet.all_refresh()) is not None:
            self.fleet.adopt_all(entries, self.files)
            self._push_missing(entries)
            adopted = True
        self.members(adopted)

    def members(self, adopted: bool = False) -> None:
        """The fleet's authorizers changed: start the new ones here, remove those another
        host removed. ``adopted``: the fleet's refresh tokens were just taken (no need to ask
        for each new one)."""
        assert self.fleet is not None
        members = self.fleet.members()
        if members is None:
            return
        mine = self.authorizers.registered()
        removed_here = self.authorizers.tombstones()  # not yet told to Redis: not taken back
        added = sorted(members - mine - set(removed_here))
        missing = sorted(mine - members)
        for appid, at in self.fleet.gone(missing).items():
            if self._authorized_at(appid) <= at:  # not authorized here since
                self.authorizers.later_remove(appid)
        if self.parts.following:
            for appid in added:
                self.authorizers.follow(appid)
            return
        for appid in added:
            if not adopted:
                self.fleet.pull_refresh(appid, self.files)
            try:
                known = self.files.refresh(appid) is not None
            except ValueError:
                known = False
            if known:
                self.authorizers.add(appid)

    def _authorized_at(self, appid: str) -> float:
        try:
            return json_number((self.files.refresh(appid) or {}).get("authorized_at"))
        except ValueError:
            return 0.0

    def ticket_news(self) -> None:
        """Another host received a ticket: take it; a component token waiting for one is
        fetched now."""
        assert self.fleet is not None
        if self.fleet.pull_tickets(self.files) and not self.parts.following \
                and self.parts.component_token() is None:
            self._end_ticket_wait()
