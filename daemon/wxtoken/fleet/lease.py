"""The fleet's lease on one token: redis-py's ``Lock`` (an owner token, ``thread_local=False``
so that a heartbeat thread can extend it while a call is in flight), and a generation taken
atomically with it (fencing: a write under a lower generation than the record's is refused)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from wxtoken.errors import StoreError
from wxtoken.fleet.connect import REDIS_ERRORS
from wxtoken.fleet.keys import Keys
from wxtoken.fleet.shared import Fleet

LEASE_ERRORS: tuple[type[Exception], ...] = (LockError, *REDIS_ERRORS)


class _Heartbeat(threading.Thread):
    """Extends a held lease every third of its timeout until stopped; a Redis hiccup is tried
    again until the lease would have run out, another owner ends it at once."""

    def __init__(self, lease: Lock, timeout: float, log: Any) -> None:
        super().__init__(name="lease-heartbeat", daemon=True)
        self.lease, self.timeout, self.log = lease, timeout, log
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        extended = time.monotonic()
        while not self.stopped.wait(self.timeout / 3):
            try:
                self.lease.extend(self.timeout, replace_ttl=True)
                extended = time.monotonic()
            except LockNotOwnedError:
                self._lose("another host holds the lease now")
                return
            except LEASE_ERRORS:
                if time.monotonic() - extended >= self.timeout:
                    self._lose("Redis did not answer before the lease ran out")
                    return

    def _lose(self, why: str) -> None:
        self.lost = True
        self.log.warning("lease.lost", reason=f"{why}; a write after another host's will be "
                         "refused (fencing)")


class Lease:
    """The lease on one identity's record, held by one host at a time."""

    def __init__(self, fleet: Fleet, keys: Keys, log: Any) -> None:
        self.fleet, self.keys, self.log = fleet, keys, log
        # a lease whose holder died frees itself this late: waiting for it is not a stall
        self.extra_wait = fleet.lease_timeout + 1
        self.gen = 0  # the generation taken with the lease now held
        self._lock: Lock | None = None
        self._beat: _Heartbeat | None = None

    @property
    def held(self) -> bool:
        """Whether a lease was taken for the work in progress (False: Redis was down)."""
        return self._lock is not None

    @property
    def lost(self) -> bool:
        """The heartbeat found it gone (another owner, or Redis silent until it ran out)."""
        return self._beat is not None and self._beat.lost

    def owned(self) -> bool:
        """Asks Redis whether the lease is still this host's (REDIS_ERRORS when it cannot)."""
        return self._lock is not None and bool(self._lock.owned())

    @contextlib.contextmanager
    def taken(self, seen_gen: int) -> Iterator[int | None]:
        """Hold the lease for the block: yields its generation (at least ``seen_gen + 1``), or
        None when Redis is down (the host decides alone). StoreError when another host kept it
        for ``extra_wait`` seconds."""
        lock = self._take(seen_gen) if self.fleet.may_try() else None
        if lock is None:
            yield None
            return
        beat = _Heartbeat(lock, self.fleet.lease_timeout, self.log)
        self._lock, self._beat = lock, beat
        beat.start()
        try:
            yield self.gen
        finally:
            beat.stopped.set()
            self._lock = self._beat = None
            # expired (the heartbeat logged it) or Redis went away: it frees itself
            with contextlib.suppress(*LEASE_ERRORS):
                lock.release()

    def _take(self, seen_gen: int) -> Lock | None:
        lock = Lock(self.fleet.client, self.keys.lease, timeout=self.fleet.lease_timeout,
                    blocking_timeout=self.extra_wait, thread_local=False)
        try:
            if not lock.acquire():
                raise StoreError(f"the fleet's lease on {self.keys.identity} stayed taken for "
                                 f"{self.extra_wait:.0f} s")
            gen = self.fleet.take_generation(keys=[self.keys.lease, self.keys.gen],
                                             args=[lock.local.token, seen_gen])
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return None
        self.fleet.mark_up()
        if gen is None:
            raise StoreError(f"the fleet's lease on {self.keys.identity} expired at once")
        self.gen = int(gen)
        return lock
