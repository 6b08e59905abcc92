"""This daemon as one node of the fleet: the shared Redis state, a FleetStore per app, the sync
thread, the apps it only follows, and passive refresh across hosts.

Roles are per app: a host whose app table has a secret is a candidate refresher for it (and the
leader while it wrote the current record); without a secret it is a follower and never calls
WeChat. A follower's passive refresh is handed to the candidates over the fleet's request
channel; the answer is the new record, followed into the local file as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from wxtoken import passive, schedule
from wxtoken.config import AppConfig, Config
from wxtoken.errors import TokenCorrupt
from wxtoken.fleet.connect import REDIS_ERRORS
from wxtoken.fleet.keys import request_channel
from wxtoken.fleet.shared import Fleet
from wxtoken.fleet.store import FleetStore
from wxtoken.fleet.sync import Sync
from wxtoken.logs import get_logger
from wxtoken.passive import ForcedState
from wxtoken.record import TokenRecord
from wxtoken.refresher import Forced
from wxtoken.reload import Plan
from wxtoken.schedule import Outcome, State
from wxtoken.store import atomic_write

STATUS_FILE = ".fleet.json"  # app names have no dots: never an app's file


class FleetNode:
    """The fleet side of one daemon."""

    def __init__(self, config: Config, on_request: Callable[[str, str | None, bool], None],
                 on_back: Callable[[], None]) -> None:
        assert config.redis is not None
        self.config = config
        self.fleet = Fleet(config, config.redis)
        self.stores = {app.name: FleetStore(self.fleet, app) for app in config.apps}
        self.followers = {app.name for app in config.apps if app.follower}
        self.on_request = on_request  # a candidate runs a passive refresh a follower asked for
        self.log = get_logger(component="fleet")
        self.sync = Sync(self.fleet, list(self.stores.values()), self._changed, self._requested,
                         {app.identity for app in config.apps if not app.follower})
        self._changes = threading.Condition()
        self._leading: dict[str, bool] = {}
        self.fleet.on_change = self.write_status
        # the schedules made while Redis was down (token apps wait for renew_before) are redone
        self.fleet.on_back = on_back

    @property
    def clock(self) -> Callable[[], float]:
        return self.fleet.clock

    def start(self) -> dict[str, Outcome]:
        """Connect (ConfigError when the hosts disagree or the login is refused), bring the
        followed files up to date, start following; the followers' first outcomes."""
        self.fleet.start(self.config.apps)
        outcomes = {}
        for name in sorted(self.followers):
            store = self.stores[name]
            if self.fleet.up:
                try:
                    store.sync()
                except REDIS_ERRORS as exc:
                    self.fleet.mark_down(exc)
            record = self.record(name)
            outcomes[name] = Outcome(State.REUSED if record else State.WAITING, float("inf"),
                                     record.expires_at if record else None)
        self.sync.start()
        self.write_status()
        return outcomes

    def stop(self) -> None:
        self.sync.stop()
        self.fleet.client.close()

    def reload(self, config: Config, change: Plan) -> None:
        """Take a reloaded config: a store for each added or changed app, none for a removed
        one; ConfigError when the fleet knows a new or changed identity otherwise."""
        apps = tuple(config.app(n) for n in (*change.added, *change.changed))
        if self.fleet.up:
            self.fleet.check_identities(apps)
        self.config = self.fleet.config = config
        for name in change.removed:
            self.stores.pop(name, None)
        for app in apps:
            self.stores[app.name] = FleetStore(self.fleet, app)
        self.followers = {app.name for app in config.apps if app.follower}
        self.sync.update(list(self.stores.values()),
                         {app.identity for app in config.apps if not app.follower})
        self.write_status()

    # -- roles and health -----------------------------------------------------------------------
    def role(self, name: str) -> str:
        if name in self.followers:
            return "follower"
        return "leader" if self.stores[name].leader else "candidate"

    def record(self, name: str) -> TokenRecord | None:
        """The app's local file (what this host's readers get)."""
        try:
            return self.stores[name].local.read()
        except TokenCorrupt:
            return None

    def _changed(self, name: str) -> None:
        """The sync thread rewrote an app's file: wake a follower waiting for it."""
        with self._changes:
            self._changes.notify_all()
        self.note_leadership(name)

    def note_leadership(self, name: str) -> None:
        if name in self.followers or name not in self.stores:  # not an app: a platform's
            return
        leading = self.stores[name].leader
        if self._leading.get(name) != leading:
            self._leading[name] = leading
            self.log.info("fleet.leadership", app=name, leader=leading,
                          by=self.stores[name].by or None)
            self.write_status()

    def write_status(self) -> None:
        """``<state_dir>/.fleet.json`` for `wxtoken status`: Redis reachable, last sync, clock
        skew and each app's role on this host."""
        doc: dict[str, Any] = {"host": self.fleet.host, **self.fleet.status(),
                               "roles": {name: self.role(name) for name in self.stores},
                               "written_at": time.time()}
        with contextlib.suppress(OSError):  # bookkeeping only
            atomic_write(os.path.join(self.config.state_dir, STATUS_FILE),
                         json.dumps(doc).encode() + b"\n", 0o640, durable=False)

    # -- passive refresh across hosts -----------------------------------------------------------
    def _requested(self, identity: str, invalid: str | None, privileged: bool) -> None:
        """A follower somewhere asked for a passive refresh: each candidate app of this host
        with that identity runs one (compare-and-refresh under the lease: one call in all),
        as the follower's peer would have (operator or token reader)."""
        for name, store in self.stores.items():
            if store.app.identity == identity and name not in self.followers:
                threading.Thread(target=self.on_request, args=(name, invalid, privileged),
                                 daemon=True, name="fleet-request").start()

    def ask(self, app: AppConfig, invalid: str | None, privileged: bool,
            timeout: float) -> Forced:
        """A passive refresh on a follower: refuse what the fleet's counts refuse, else hand it
        to the candidates and wait for the fleet's record to move on."""
        store = self.stores[app.name]
        current = self.record(app.name)
        now = self.fleet.clock()
        if invalid is not None and current is not None and current.access_token != invalid \
                and current.expires_at > time.time():
            return Forced(ForcedState.CURRENT, current)
        if not self.fleet.up:
            return Forced(ForcedState.WAITING, current, retry_after=10.0,
                          reason="the fleet's Redis is unreachable: no forced refresh")
        status = store.read_status()
        refusal = passive.refusal(status, now, app.api, self.config.daily_budget,
                                  1 + len(app.tickets), privileged)
        before = current.access_token if current else None
        # rate-limited right after a forced refresh: another report's refresh is probably
        # under way, and its token answers this one too
        if refusal is not None and refusal.state is ForcedState.RATE_LIMITED and \
                schedule.elapsed(status.last_forced_at, now) < timeout and \
                (record := self._wait_for_change(app.name, before, timeout)) is not None:
            return Forced(ForcedState.CURRENT, record)
        if refusal is not None and refusal.state is not ForcedState.WAITING:
            return Forced(refusal.state, current, retry_after=refusal.retry_after)
        try:
            listeners = self.fleet.client.publish(
                request_channel(self.fleet.prefix, app.identity),
                json.dumps({"invalid_token": invalid, "privileged": privileged}))
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return Forced(ForcedState.WAITING, current, retry_after=10.0,
                          reason="the fleet's Redis is unreachable: no forced refresh")
        if not listeners:
            return Forced(ForcedState.FAILED, current, retry_after=30.0,
                          reason="this host only follows the app, and no host with its secret "
                          "is listening")
        if (record := self._wait_for_change(app.name, before, timeout)) is not None:
            return Forced(ForcedState.REFRESHED, record)
        return Forced(ForcedState.FAILED, current, retry_after=30.0,
                      reason=f"no new token from the fleet within {timeout:.0f} s (the "
                      "candidates refused or failed: see their journals)")

    def _wait_for_change(self, name: str, before: str | None,
                         timeout: float) -> TokenRecord | None:
        """The app's file once it holds another token than ``before`` (None: not in time)."""
        deadline = time.monotonic() + timeout
        with self._changes:
            while True:
                record = self.record(name)
                if record is not None and record.access_token != before:
                    return record
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changes.wait(left)
