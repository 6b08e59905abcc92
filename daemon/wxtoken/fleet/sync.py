"""Keeping this host's files in step with the fleet: a pub/sub subscriber that rewrites a file
within moments of a record change, a cheap poll of one fleet-wide version key about once a
minute for messages lost, a full resync (and re-seed of an empty Redis) on every reconnect, and
the clock check against Redis TIME.

Idle, it sends Redis one GET and one TIME a minute (and redis-py's keep-alive PING on the
subscription): it never busy-polls.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable

from wxtoken.fleet.connect import REDIS_ERRORS, text
from wxtoken.fleet.shared import Fleet
from wxtoken.fleet.store import FleetStore
from wxtoken.logs import get_logger

POLL_EVERY = 60.0  # seconds between version polls (and clock checks)
RECONNECT_MAX = 5.0  # the longest wait between reconnects: back within 10 s of Redis's return
WAKE = "__wxtoken_wake__"


class Sync:
    """One thread per daemon that follows the fleet's records for every app of this host."""

    def __init__(self, fleet: Fleet, stores: list[FleetStore],
                 on_change: Callable[[str], None],
                 on_request: Callable[[str, str | None], None] | None = None) -> None:
        self.fleet = fleet
        self.by_identity: dict[str, list[FleetStore]] = {}
        for store in stores:
            self.by_identity.setdefault(store.app.identity, []).append(store)
        self.on_change = on_change  # called with the app name after its file was rewritten
        self.on_request = on_request  # a follower's passive refresh (hosts with a secret only)
        self.log = get_logger(component="fleet")
        self.version: bytes | str | None = None
        self._stopped = threading.Event()
        self._catch_up = False  # set when redis-py reconnected the subscription
        self._thread = threading.Thread(target=self._run, name="fleet-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
            pubsub = self.fleet.client.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.fleet.channel)
                if self.on_request is not None:
                    pubsub.subscribe(self.fleet.request_channel)
                # redis-py reconnects a subscription by itself (a quick Redis restart goes
                # unseen otherwise): every reconnect must catch up, and maybe re-seed
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

    def _follow(self, pubsub: object) -> None:
        next_poll = time.monotonic() + POLL_EVERY
        self._catch_up = False
        while not self._stopped.is_set():
            message = pubsub.get_message(  # type: ignore[attr-defined]
                timeout=max(0.0, next_poll - time.monotonic()))
            if self._catch_up:
                self._catch_up = False
                self.fleet.mark_up()
                self.resync()
            if message is not None and message.get("type") == "message":
                if text(message["channel"]) == self.fleet.request_channel:
                    self.requested(text(message["data"]))
                else:
                    self.changed(text(message["data"]))
            if time.monotonic() >= next_poll:
                self.poll()
                next_poll = time.monotonic() + POLL_EVERY

    def changed(self, identity: str) -> None:
        """A record changed somewhere in the fleet: follow it if it is one of ours."""
        for store in self.by_identity.get(identity, ()):
            if store.sync():
                self.on_change(store.app.name)
        self.fleet.last_sync = time.time()

    def requested(self, data: str) -> None:
        if self.on_request is None:
            return
        try:
            request = json.loads(data)
            identity, invalid = str(request["identity"]), request.get("invalid_token")
        except (ValueError, KeyError, TypeError):
            return
        if identity in self.by_identity and (invalid is None or isinstance(invalid, str)):
            self.on_request(identity, invalid or None)

    def poll(self) -> None:
        """The minute's checks: the clock against Redis TIME, and the fleet's version: when it
        moved without us hearing of it (a message lost), or vanished (Redis flushed), resync."""
        self.fleet.measure_clock()
        version = self.fleet.client.get(self.fleet.version_key)
        if version != self.version:
            self.resync()
        self.fleet.last_sync = time.time()

    def resync(self) -> None:
        """Every app: the local file follows the fleet's record; a record Redis lost is re-seeded
        from this host's file."""
        self.version = self.fleet.client.get(self.fleet.version_key)
        for stores in self.by_identity.values():
            for store in stores:
                if store.sync():
                    self.on_change(store.app.name)
        self.fleet.last_sync = time.time()
