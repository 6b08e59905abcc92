"""This daemon as one node of the fleet: the shared Redis state, a FleetStore per app, the sync
thread, the apps it only follows, and passive refresh across hosts.

Roles are per app: a host whose app table has a secret is a candidate refresher for it (and the
leader while it wrote the current record); without a secret it is a follower and never calls
WeChat. A follower's passive refresh is handed to the candidates over the fleet's request
channel; the answer is the new record, followed into the local file as usual. What the fleet's
counts or its wait refuse, a follower answers at once, as a candidate would: the candidates
share the inputs of their wait (error class, failures, the failed attempt's start in fleet
time; never its end), and every host works the wait out from them.
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
from wxtoken.clock import next_wechat_midnight
from wxtoken.config import AppConfig, Config
from wxtoken.errcodes import HARD_ERRORS, ErrorClass
from wxtoken.errors import TokenCorrupt
from wxtoken.fleet.connect import REDIS_ERRORS, text
from wxtoken.fleet.events import FileFollowed, RedisChanged, RefreshAsked, RefreshRequested
from wxtoken.fleet.keys import request_channel
from wxtoken.fleet.shared import Fleet
from wxtoken.fleet.store import FleetStore
from wxtoken.fleet.sync import Sync
from wxtoken.logs import get_logger
from wxtoken.passive import Forced, ForcedState
from wxtoken.record import TokenRecord
from wxtoken.refresher import STORE_SLACK
from wxtoken.reload import Plan
from wxtoken.schedule import Outcome, State
from wxtoken.status import AppStatus, Role
from wxtoken.store import atomic_write

STATUS_FILE = ".fleet.json"  # app names have no dots: never an app's file
# a follower's answer to a passive refresh: the candidates have this long to show they took
# the request up (a forced refresh counted, or the lease held) before their refusal is worked
# out here; and no answer takes longer than ANSWER_WITHIN (the clients give up at 40 s)
TAKEN_UP_WITHIN = 3.0
ANSWER_WITHIN = 30.0
# the inputs of a candidate's wait, shared in the app's status hash beside the counts (never
# the wait's end: every host works it out from these, with its own config)
WAIT_FIELDS = ("wait_error_class", "wait_failures", "wait_attempt_at", "wait_ended")


class Unreachable(Exception):
    """The fleet's Redis is known to be down: no forced refresh."""


DOWN: tuple[type[Exception], ...] = (Unreachable, *REDIS_ERRORS)


def wait_inputs(status: AppStatus) -> tuple[str, int, float, int]:
    """What a wait follows from: the last error's class, the failures in a row, when the
    attempt that failed began (fleet time), and whether the wait was ended early (a quota
    reset, the operator)."""
    ended = int(status.failures > 0 and status.retry_at == 0.0)
    return (status.error_class.value if status.error_class else "", status.failures,
            status.last_attempt_at, ended)


class NodeStore(FleetStore):
    """A FleetStore that also shares the inputs of this host's wait (``WAIT_FIELDS``), for
    followers to answer passive refreshes as a candidate would. Written only when they
    change, so a host that made no attempt never overwrites another's."""

    def __init__(self, fleet: Fleet, app: AppConfig) -> None:
        super().__init__(fleet, app)
        self._shared_wait: tuple[str, int, float, int] | None = None

    def write_status(self, status: AppStatus, durable: bool = True) -> None:
        if self._shared_wait is None:
            self._shared_wait = wait_inputs(self.local.read_status())
        super().write_status(status, durable)
        inputs = wait_inputs(status)
        if inputs == self._shared_wait or not self.fleet.up:
            return
        try:
            self.fleet.client.hset(self.keys.status,
                                   mapping={k: str(v) for k, v in zip(WAIT_FIELDS, inputs,
                                                                      strict=True)})
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return
        self._shared_wait = inputs

    def shared_wait(self) -> tuple[ErrorClass | None, int, float, bool]:
        """The fleet's last wait inputs (raises Redis's errors)."""
        values = self.fleet.client.hmget(self.keys.status, list(WAIT_FIELDS))
        kind, failures, attempt, ended = (text(v) if v is not None else "" for v in values)
        try:
            error_class = ErrorClass(kind) if kind else None
            return error_class, int(failures or 0), float(attempt or 0), ended == "1"
        except ValueError:
            return None, 0, 0.0, False

    def lease_held(self) -> bool:
        """Whether some host holds the app's lease (a refresh is decided or made now)."""
        return bool(self.fleet.client.exists(self.keys.lease))


class FleetNode:
    """The fleet side of one daemon."""

    def __init__(self, config: Config) -> None:
        """Its events (``self.fleet.events``, fleet/events.py) tell the daemon what to do:
        RefreshRequested (a follower's passive refresh, to run here), RedisBack, Fenced."""
        assert config.redis is not None
        self.config = config
        self.fleet = Fleet(config, config.redis)
        self.stores: dict[str, NodeStore] = {app.name: NodeStore(self.fleet, app)
                                             for app in config.apps}
        self.followers = {app.name for app in config.apps if app.follower}
        self.log = get_logger(component="fleet")
        self.sync = Sync(self.fleet, list(self.stores.values()),
                         {app.identity for app in config.apps if not app.follower})
        self._changes = threading.Condition()
        self._leading: dict[str, bool] = {}
        events = self.fleet.events
        events.subscribe(RedisChanged, lambda _: self.write_status())
        events.subscribe(FileFollowed, lambda e: self._changed(e.key))
        events.subscribe(RefreshAsked, self._requested)

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
            self.stores[app.name] = NodeStore(self.fleet, app)
        self.followers = {app.name for app in config.apps if app.follower}
        self.sync.update(list(self.stores.values()),
                         {app.identity for app in config.apps if not app.follower})
        self.write_status()

    # -- roles and health -----------------------------------------------------------------------
    def role(self, name: str) -> Role:
        if name in self.followers:
            return Role.FOLLOWER
        return Role.LEADER if self.stores[name].leader else Role.CANDIDATE

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
    def _requested(self, asked: RefreshAsked) -> None:
        """A follower somewhere asked for a passive refresh: each candidate app of this host
        with that identity runs one (compare-and-refresh under the lease: one call in all),
        as the follower's peer would have (operator or token reader)."""
        for name, store in self.stores.items():
            if store.app.identity == asked.identity and name not in self.followers:
                event = RefreshRequested(name, asked.invalid_token, asked.privileged)
                threading.Thread(target=self.fleet.events.publish, args=(event,),
                                 daemon=True, name="fleet-request").start()

    def ask(self, app: AppConfig, invalid: str | None, privileged: bool,
            timeout: float) -> Forced:
        """A passive refresh on a follower: refuse at once what the fleet's counts and its wait
        refuse, as a candidate would (the same state and retry_after, from the inputs shared in
        Redis), else hand it to the candidates and wait for the fleet's record to move on, as
        long as they are seen working on it and no longer than ``ANSWER_WITHIN``."""
        store = self.stores[app.name]
        current = self.record(app.name)
        if invalid is not None and current is not None and current.access_token != invalid \
                and current.expires_at > time.time():
            return Forced(ForcedState.CURRENT, current)
        deadline = time.monotonic() + min(timeout, ANSWER_WITHIN)
        before = current.access_token if current else None
        try:
            refusal = self._refusal(app, store, privileged)
            if refusal is not None and refusal.state is ForcedState.RATE_LIMITED:
                # right after a forced refresh: while it is still under way, its token answers
                # this report too
                if (record := self._wait_for_fleet(app, store, before, deadline)) is not None:
                    return Forced(ForcedState.CURRENT, record)
                refusal = self._refusal(app, store, privileged)  # retry_after from now
            if refusal is not None:
                store.sync()  # a record that has not reached this file yet answers it too
                if (record := self._current(app.name, invalid)) is not None:
                    return Forced(ForcedState.CURRENT, record)
                if refusal.state is ForcedState.WAITING and invalid is not None:
                    # a candidate notes the refused token, for its next run to replace it
                    self._publish(app, invalid, privileged)
                return Forced(refusal.state, current, retry_after=refusal.retry_after,
                              reason=refusal.reason)
            asked = self.fleet.clock()
            if not self._publish(app, invalid, privileged):
                return Forced(ForcedState.FAILED, current, retry_after=30.0,
                              reason="this host only follows the app, and no host with its "
                              "secret is listening")
            if (record := self._wait_for_fleet(app, store, before, deadline, asked)) is not None:
                return Forced(ForcedState.REFRESHED, record)
            error_class, failures, attempt, _ = store.shared_wait()
            if failures > 0 and attempt >= asked - 1.0 and error_class is not None:
                return Forced(ForcedState.FAILED, current, retry_after=30.0,
                              reason=f"the fleet's forced refresh failed ({error_class}): see "
                              "the candidates' journals")
            if (refusal := self._refusal(app, store, privileged)) is not None:
                return Forced(refusal.state, current, retry_after=refusal.retry_after,
                              reason=refusal.reason)
        except DOWN as exc:
            if not isinstance(exc, Unreachable):
                self.fleet.mark_down(exc)
            return Forced(ForcedState.WAITING, current, retry_after=10.0,
                          reason="the fleet's Redis is unreachable: no forced refresh")
        return Forced(ForcedState.FAILED, current, retry_after=30.0,
                      reason="no new token from the fleet (the candidates refused or failed: "
                      "see their journals)")

    def _publish(self, app: AppConfig, invalid: str | None, privileged: bool) -> int:
        """Hand a passive refresh to the candidates; how many hosts listened."""
        return int(self.fleet.client.publish(
            request_channel(self.fleet.prefix, app.identity),
            json.dumps({"invalid_token": invalid, "privileged": privileged})))

    def _current(self, name: str, invalid: str | None) -> TokenRecord | None:
        """The app's file when it holds a valid token other than the reported one."""
        record = self.record(name)
        if invalid is not None and record is not None and record.access_token != invalid \
                and record.expires_at > time.time():
            return record
        return None

    def _refusal(self, app: AppConfig, store: NodeStore,
                 privileged: bool) -> passive.Refusal | None:
        """What the fleet's counts and its current wait refuse now, worked out as a candidate
        does (``Refresher.wait_end``) from the inputs the candidates share; a wait's end is at
        the latest its backoff can end (its jitter is the failing host's own). Raises Redis's
        errors (and says the fleet is down when it is)."""
        if not self.fleet.up:
            raise Unreachable
        status = store.read_status()  # says the fleet is down rather than raise
        if not self.fleet.up:
            raise Unreachable
        now = self.fleet.clock()
        status.error_class, status.failures, status.last_attempt_at, ended = store.shared_wait()
        calls = 1 + len(app.tickets)
        return passive.refusal(status, now, app.api, self.config.daily_budget, calls,
                               privileged, 0.0 if ended else self._wait_end(app, status, now))

    def _hold_limit(self, app: AppConfig) -> float:
        """The longest a candidate's run holds the lease (as ``Refresher.hold_limit``)."""
        return schedule.call_deadline(self.config.renew_before) * (1 + len(app.tickets)) \
            + STORE_SLACK

    def _wait_end(self, app: AppConfig, status: AppStatus, now: float) -> float:
        """When the fleet's wait after its last failure ends at the latest (0: none)."""
        if status.failures <= 0 or status.error_class not in passive.WAITS_FOR_READERS:
            return 0.0
        attempt = status.last_attempt_at
        if status.error_class is ErrorClass.QUOTA_EXHAUSTED:
            end = next_wechat_midnight(attempt + self._hold_limit(app)) + 60
        else:
            assert status.error_class in HARD_ERRORS
            base = min(600.0, max(1.0, self.config.refresh_interval / 6))  # Refresher's
            cap = max(base, self.config.refresh_interval)
            ceiling = min(cap, base * 2 ** min(status.failures - 1, 30))
            end = attempt + self._hold_limit(app) + ceiling
        end = schedule.wait_until(end, attempt, now)
        return end if end > now else 0.0

    def _wait_for_fleet(self, app: AppConfig, store: NodeStore, before: str | None,
                        deadline: float, asked: float | None = None) -> TokenRecord | None:
        """The app's file once it holds another token than ``before``, for as long as a
        candidate is seen at work: a forced refresh counted and not yet written while the lease
        is held; after this host's request (``asked``, fleet time), the lease held, or for
        ``TAKEN_UP_WITHIN`` seconds. None once nothing is under way (or too late)."""
        hold = self._hold_limit(app)
        taken_up_by = time.monotonic() + TAKEN_UP_WITHIN
        while True:
            if (record := self._wait_for_change(app.name, before, 0.0)) is not None:
                return record
            status = store.read_status()
            since = schedule.elapsed(status.last_forced_at, self.fleet.clock())
            _, failures, attempt, _ = store.shared_wait()
            # a forced refresh was counted and has neither written its token nor failed
            counted = status.last_forced_at > status.refreshed_at_exact and since < hold and \
                not (failures > 0 and attempt >= status.last_forced_at) and \
                (asked is None or status.last_forced_at >= asked - 1.0)
            held = store.lease_held()
            if asked is None:
                working = counted and held
            else:  # not counted yet: the candidate may wait for the lease, or be on its way
                working = held or (not counted and time.monotonic() < taken_up_by)
            left = deadline - time.monotonic()
            if not working or left <= 0:
                # nothing under way, or it ended without a token: a last look at the record
                store.sync()
                return self._wait_for_change(app.name, before, 0.0)
            if (record := self._wait_for_change(app.name, before, min(0.5, left))) is not None:
                return record

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
