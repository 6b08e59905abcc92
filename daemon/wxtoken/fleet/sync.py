"""Keeping this host's files in step with the fleet: a pub/sub subscriber that rewrites a file
within moments of a record change, a poll of one fleet-wide version key every few seconds that
catches a lost message (the version ran ahead of what was heard) or an emptied Redis (the
version is gone), a full resync (and re-seed) on every reconnect, and the clock check against
Redis TIME.

Idle, a host sends Redis one GET every ten seconds and one TIME a minute (and redis-py's
keep-alive PING on the subscription): it never busy-polls.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

from wxtoken.fleet.connect import REDIS_ERRORS, text
from wxtoken.fleet.events import Announced, Fenced, FileFollowed, Heard, RefreshAsked, Resyncing
from wxtoken.fleet.keys import request_channel
from wxtoken.fleet.shared import Fleet
from wxtoken.fleet.store import FleetStore
from wxtoken.logs import get_logger

POLL_EVERY = 10.0  # seconds between version polls: a flushed Redis is re-seeded within this
CLOCK_EVERY = 60.0  # seconds between clock checks
DOWN_RESYNC_EVERY = 60.0  # at most this often, a resync after an outage the subscription outlived
RECONNECT_MAX = 5.0  # the longest wait between reconnects: back within 10 s of Redis's return
WAKE = "__wxtoken_wake__ 0"

class Sync:
    """One thread per daemon that follows the fleet's records for every app of this host."""

    def __init__(self, fleet: Fleet, stores: list[FleetStore], candidates: set[str]) -> None:
        """Tells what it hears on ``fleet.events`` (fleet/events.py): FileFollowed,
        RefreshAsked, Announced, Heard, Resyncing, Fenced."""
        self.fleet = fleet
        self.events = fleet.events
        self.by_identity: dict[str, list[FleetStore]] = {}
        self.requests: dict[str, str] = {}
        # the names announced on the events channel that are records of no store here (an
        # Open Platform's authorizer set and ticket): Announced; other channels: Heard
        self.announced: frozenset[str] = frozenset()
        self.channels: frozenset[str] = frozenset()
        self._stores = threading.Lock()  # add/remove from several threads
        self._downs = 0  # the fleet's count of outages at the last resync
        self._down_resync = -DOWN_RESYNC_EVERY  # monotonic time of the last one for an outage
        self._resubscribe = False
        self._thread = threading.Thread(target=self._run, name="fleet-sync", daemon=True)
        self.update(stores, candidates)
        self.log = get_logger(component="fleet")
        self.heard = 0  # the highest fleet version heard of
        self._stopped = threading.Event()
        self._catch_up = False  # set when redis-py reconnected the subscription

    def start(self) -> None:
        self._thread.start()

    def update(self, stores: list[FleetStore], candidates: set[str]) -> None:
        """The apps to follow (a reload changed them): subscribe anew, then catch up."""
        by_identity: dict[str, list[FleetStore]] = {}
        for store in stores:
            by_identity.setdefault(store.keys.identity, []).append(store)
        with self._stores:
            # an Open Platform's stores stay (they come and go with its authorizers)
            for identity, kept in self.by_identity.items():
                platform = [s for s in kept if s.platform]
                if platform:
                    by_identity.setdefault(identity, []).extend(platform)
            self.by_identity = by_identity
        # the channels of the identities this host has the secret of
        self.requests = {request_channel(self.fleet.prefix, i): i for i in sorted(candidates)}
        if self._thread.is_alive():
            self._resubscribe = True
            with contextlib.suppress(*REDIS_ERRORS):
                self.fleet.client.publish(self.fleet.channel, WAKE)

    def add(self, store: FleetStore) -> None:
        """Follow one more record (an authorizer discovered while running)."""
        with self._stores:
            stores = self.by_identity.get(store.keys.identity, [])
            self.by_identity = {**self.by_identity, store.keys.identity: [*stores, store]}

    def remove(self, store: FleetStore) -> None:
        with self._stores:
            stores = [s for s in self.by_identity.get(store.keys.identity, [])
                      if s is not store]
            by_identity = dict(self.by_identity)
            if stores:
                by_identity[store.keys.identity] = stores
            else:
                by_identity.pop(store.keys.identity, None)
            self.by_identity = by_identity

    def announce(self, name: str) -> None:
        """Tell ``name``'s news on the events channel as Announced (not a record's)."""
        self.announced = self.announced | {name}

    def listen(self, channel: str) -> None:
        """Tell every message on ``channel`` as Heard (subscribed anew at once)."""
        self.channels = self.channels | {channel}
        if self._thread.is_alive():
            self._resubscribe = True
            with contextlib.suppress(*REDIS_ERRORS):
                self.fleet.client.publish(self.fleet.channel, WAKE)

    def stop(self) -> None:
        self._stopped.set()
        if self.fleet.up:  # wake the subscription's blocking read
            with contextlib.suppress(*REDIS_ERRORS):
                self.fleet.client.publish(self.fleet.channel, WAKE)
        if self._thread.is_alive():
            self._thread.join(3)

    def _run(self) -> None:
        wait = 1.0
        while not self._stopped.is_set():
            # redis-py < 8.2 has no type hints here (the ignores are for it)
            pubsub = self.fleet.client.pubsub(  # type: ignore[no-untyped-call, unused-ignore]
                ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.fleet.channel, *self.requests, *self.channels)
                # redis-py reconnects a subscription by itself (a quick Redis restart goes
                # unseen otherwise): every reconnect must catch up, and maybe re-seed
                assert pubsub.connection is not None  # subscribe() connected it
                pubsub.connection.register_connect_callback(self._reconnected)
                self.fleet.mark_up()
                self.resync()  # catch up with what changed while away; re-seed if Redis is empty
                wait = 1.0
                self._follow(pubsub)
            except REDIS_ERRORS as exc:
                self.fleet.mark_down(exc)
                self._stopped.wait(wait)
                wait = min(RECONNECT_MAX, wait * 2)
            except Exception as exc:  # a bug must not end the following silently
                self.log.error("fleet.sync_crashed", error=f"{type(exc).__name__}: {exc}",
                               next_in=RECONNECT_MAX)
                self._stopped.wait(RECONNECT_MAX)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    pubsub.close()

    def _reconnected(self, _connection: object) -> None:
        self._catch_up = True

    def _follow(self, pubsub: Any) -> None:
        next_poll = time.monotonic() + POLL_EVERY
        next_clock = time.monotonic() + CLOCK_EVERY
        self._catch_up = self._resubscribe = False
        while not self._stopped.is_set() and not self._resubscribe:
            message = pubsub.get_message(timeout=max(0.0, next_poll - time.monotonic()))
            if self._catch_up:
                self._catch_up = False
                self.fleet.mark_up()
                self.resync()
            if message is not None and message.get("type") == "message":
                channel, data = text(message["channel"]), text(message["data"])
                if channel in self.requests:
                    self.requested(self.requests[channel], data)
                elif channel in self.channels:
                    self.events.publish(Heard(channel, data))
                else:
                    self.changed(data)
            if self.fleet.downs != self._downs and self.fleet.up and \
                    time.monotonic() - self._down_resync >= DOWN_RESYNC_EVERY:
                # Redis was unreachable for another thread while this subscription survived
                # (Redis paused, a network blip): catch up as after a reconnect (a flapping
                # Redis gets one a minute, not one per blip)
                self._down_resync = time.monotonic()
                self.resync()
            if time.monotonic() >= next_poll:
                if time.monotonic() >= next_clock:
                    self.fleet.measure_clock()
                    next_clock = time.monotonic() + CLOCK_EVERY
                self.poll()
                next_poll = time.monotonic() + POLL_EVERY

    def changed(self, data: str) -> None:
        """ "<identity> <version>": a record changed somewhere in the fleet."""
        identity, _, version = data.rpartition(" ")
        with contextlib.suppress(ValueError):
            self.heard = max(self.heard, int(version))
        for store in self.by_identity.get(identity, ()):
            self._follow_store(store)
        if identity in self.announced:
            self.events.publish(Announced(identity))
        self.fleet.last_sync = time.time()

    def requested(self, identity: str, data: str) -> None:
        try:
            request = json.loads(data)
            invalid, privileged = request.get("invalid_token"), request.get("privileged")
        except (ValueError, AttributeError):
            return
        if (invalid is None or isinstance(invalid, str)) and isinstance(privileged, bool):
            self.events.publish(RefreshAsked(identity, invalid or None, privileged))

    def poll(self) -> None:
        """The fleet's version: ahead of what this host heard (a message lost) or gone (Redis
        flushed or restarted empty): resync, which re-seeds what Redis lost."""
        version = self.fleet.client.get(self.fleet.version_key)
        self.fleet.mark_up()
        if version is None or int(version) > self.heard:
            self.resync()
        self.fleet.last_sync = time.time()

    def resync(self) -> None:
        """Every app: the local file follows the fleet's record; a record Redis lost is re-seeded
        from this host's file."""
        self._downs = self.fleet.downs
        version = self.fleet.client.get(self.fleet.version_key)
        self.heard = int(version) if version is not None else 0
        # an Open Platform's first: authorizers removed meanwhile go before their stores
        # would re-seed Redis with their records
        self.events.publish(Resyncing())
        for stores in list(self.by_identity.values()):
            for store in stores:
                self._follow_store(store)
        self.fleet.last_sync = time.time()

    def _follow_store(self, store: FleetStore) -> None:
        if store.sync():
            self.events.publish(FileFollowed(store.key))
        if store.fenced_pending():
            # another host's late fetch may have retired the record's token: this host's
            # refresher (a candidate's) looks now, and takes the lease to fetch once more
            self.events.publish(Fenced(store.key))
