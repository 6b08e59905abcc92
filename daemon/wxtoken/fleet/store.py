"""FleetStore: one app's record, bookkeeping and lock when Redis is the source of truth, beside
the local file every host keeps (the contract readers rely on).

- ``locked()``: the local writers' lock, then the fleet's lease (redis-py ``Lock``, owner
  token, ``thread_local=False`` so a heartbeat can extend it while a call is in flight), then a
  generation taken atomically with it (fencing). ``holding()`` says, just before the upstream
  call, whether the lease is still this host's.
- ``read()``: the Redis record; when Redis has none (restarted empty, flushed) or an older one
  than this host's valid file, the file re-seeds it first (no upstream call).
- ``write()``: a compare-and-set that refuses a lower generation than the record's, so a holder
  that lost its lease (paused, SIGSTOPped, a hung call) never overwrites a newer token; then the
  local file.
- ``sync()``: the local file follows the record (followers, and candidates after another host's
  refresh), but is never replaced by a token that expires earlier than its own: a token this
  host fetched alone while Redis was away goes to Redis instead.
- the day's calls, forced refreshes and their spacing are counted in Redis, fleet-wide; the
  rest of the bookkeeping (last result, backoff) is this host's own, in its status file.
- While Redis is unreachable (``degraded``) all of it falls back to the local files; one command
  every few seconds tries Redis again.

Times in records are the fleet's (Redis TIME); local files are written in this host's time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from wxtoken.config import AppConfig
from wxtoken.errors import StoreError, Superseded, TokenCorrupt
from wxtoken.fleet.connect import REDIS_ERRORS, text
from wxtoken.fleet.keys import Keys
from wxtoken.fleet.shared import Fleet, parse_record_json, record_json
from wxtoken.logs import get_logger, mask
from wxtoken.record import TokenRecord
from wxtoken.status import AppStatus
from wxtoken.store import FileStore

LEASE_ERRORS: tuple[type[Exception], ...] = (LockError, *REDIS_ERRORS)
STATUS_TTL = 3 * 86400  # the fleet's counts outlive a WeChat day, and no more
FLEET_FIELDS = {"calls_day": str, "calls_today": int, "forced_today": int,
                "last_forced_at": float, "forced_streak": int, "ticket_replaced_at": float,
                "refreshed_at_exact": float,  # the record's refreshed_at with its fraction
                "refused_token": str}  # a reported token a forced refresh could not replace


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


class FleetStore:
    """One app's state in the fleet's Redis, with this host's local file beside it."""

    def __init__(self, fleet: Fleet, app: AppConfig, identity: str | None = None,
                 local: FileStore | None = None, key: str | None = None) -> None:
        """``identity``, ``local`` and ``key`` (the name the daemon knows it by) default to
        the app's; an Open Platform's tokens give their own."""
        self.fleet = fleet
        self.app = app
        self.key = key or app.name
        self.platform = key is not None  # an Open Platform's token (not a configured app)
        self.local = local or FileStore(fleet.config.state_dir, app.name, app.file_mode,
                                        app.file_group)
        self.keys = Keys(fleet.prefix, identity or app.identity)
        self.log = get_logger(app=self.key, appid=app.appid, api=app.api)
        # a lease whose holder died frees itself this late: waiting for it is not a stall
        self.extra_wait = fleet.lease_timeout + 1
        self.gen = 0  # the generation taken with the lease now held
        self.seen_gen = 0  # the highest generation this host has seen (a floor after a flush)
        self.by = ""  # who wrote the record last seen
        self._local = threading.Lock()  # orders this host's writes of its local file
        self._lease: Lock | None = None
        self._beat: _Heartbeat | None = None
        self.unannounced: TokenRecord | None = None  # written, but the fleet not yet told

    @property
    def degraded(self) -> bool:
        """Redis is unreachable: the local files are all there is."""
        return not self.fleet.up

    @property
    def leader(self) -> bool:
        """Whether this host wrote the current record."""
        return self.by == self.fleet.host

    def _ok(self) -> None:
        self.fleet.mark_up()

    # -- the lock -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        with self.local.locked(timeout):
            lease = self._take_lease() if self.fleet.may_try() else None
            if lease is None:
                yield  # Redis is down: this host decides alone, from its file
                return
            beat = _Heartbeat(lease, self.fleet.lease_timeout, self.log)
            self._lease, self._beat = lease, beat
            beat.start()
            try:
                yield
            finally:
                beat.stopped.set()
                self._lease = self._beat = None
                # expired (the heartbeat logged it) or Redis went away: it frees itself
                with contextlib.suppress(*LEASE_ERRORS):
                    lease.release()

    def _take_lease(self) -> Lock | None:
        lease = Lock(self.fleet.client, self.keys.lease, timeout=self.fleet.lease_timeout,
                     blocking_timeout=self.extra_wait, thread_local=False)
        try:
            if not lease.acquire():
                raise StoreError(f"the fleet's lease on {self.keys.identity} stayed taken for "
                                 f"{self.extra_wait:.0f} s")
            gen = self.fleet.take_generation(keys=[self.keys.lease, self.keys.gen],
                                             args=[lease.local.token, self.seen_gen])
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return None
        self._ok()
        if gen is None:
            raise StoreError(f"the fleet's lease on {self.keys.identity} expired at once")
        self.gen = int(gen)
        self.seen_gen = max(self.seen_gen, self.gen)
        return lease

    def holding(self) -> bool:
        """Just before an upstream call: whether this host still holds the lease (a holder
        paused past it must not fetch: its fetch would retire the new leader's token). True
        when Redis is down (the host decides alone then)."""
        lease, beat = self._lease, self._beat
        if lease is None or beat is None:
            return True
        if beat.lost:
            return False
        try:
            owned = lease.owned()
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return True
        if not owned:
            self.log.warning("lease.lost", reason="the lease ran out before the upstream call: "
                             "no call")
        return bool(owned)

    # -- the record -----------------------------------------------------------------------------
    def _to_local(self, record: TokenRecord) -> TokenRecord:
        """The record in this host's time (the same times while the clocks agree; the
        measurement's uncertainty counts against the token)."""
        shift = self.fleet.offset + self.fleet.uncertainty
        return record.replace(
            expires_at=round(record.expires_at - shift),
            refreshed_at=round(record.refreshed_at - shift),
            tickets={k: (t, round(e - shift)) for k, (t, e) in record.tickets.items()})

    def _to_fleet(self, record: TokenRecord | None) -> TokenRecord | None:
        if record is None:
            return None
        shift = round(self.fleet.offset)
        return record.replace(
            expires_at=record.expires_at + shift, refreshed_at=record.refreshed_at + shift,
            tickets={k: (t, e + shift) for k, (t, e) in record.tickets.items()})

    def _local_record(self) -> TokenRecord | None:
        try:
            return self._to_fleet(self.local.read())
        except TokenCorrupt:
            return None

    def _fetch(self) -> tuple[TokenRecord | None, int]:
        """The Redis record and its generation (None, 0 when there is none usable)."""
        raw = self.fleet.client.get(self.keys.record)
        self._ok()
        if raw is None:
            return None, 0
        try:
            record, gen, self.by = parse_record_json(raw, self.app.name)
        except (ValueError, TokenCorrupt) as exc:
            self.log.warning("fleet.record_unusable", reason=str(exc))
            return None, 0
        self.seen_gen = max(self.seen_gen, gen)
        return record, gen

    def _newer_here(self, record: TokenRecord | None) -> TokenRecord | None:
        """This host's file when it holds a valid token the fleet's record lacks and that
        expires later (fetched while Redis was away), or Redis has none (restarted empty)."""
        local = self._local_record()
        if local is None or local.expires_at <= self.fleet.clock():
            return None
        if record is None or (local.access_token != record.access_token
                              and local.expires_at > record.expires_at):
            return local
        return None

    def read(self) -> TokenRecord | None:
        if not self.fleet.may_try():
            return self._local_record()
        try:
            if self.unannounced is not None:  # Redis failed right after a write: tell now
                self._announce(self.unannounced)
            record, _ = self._fetch()
            if (newer := self._newer_here(record)) is not None:
                self.seed(newer)  # no upstream call: the newest valid file re-seeds Redis
                record, _ = self._fetch()
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return self._local_record()
        if record is not None:
            self._write_local(record)
        return record

    def seed(self, record: TokenRecord) -> bool:
        """Put this host's valid record into Redis unless Redis has one expiring later."""
        done = bool(self.fleet.seed_record(
            keys=[self.keys.record, self.keys.gen],
            args=[record_json(record, 0, self.fleet.host), record.expires_at, self.seen_gen]))
        if done:
            self.log.warning("fleet.reseeded", token=mask(record.access_token),
                             expires_in=int(record.expires_at - self.fleet.clock()),
                             reason="Redis had no record this new")
            self._announce(record)
        return done

    def _announce(self, record: TokenRecord) -> None:
        # an Open Platform's tokens are not written into the SDKs' layouts
        self.unannounced = None if self.fleet.announce(self.keys, record, self.app.api,
                                                       mirrored=not self.platform) else record

    def write(self, record: TokenRecord) -> None:
        if self._lease is None:  # Redis was down when the lock was taken: this host alone
            self._write_local(record)
            return
        try:
            written, theirs = self.fleet.write_record(
                keys=[self.keys.record, self.keys.gen],
                args=[record_json(record, self.gen, self.fleet.host), self.gen])
        except REDIS_ERRORS as exc:
            # the token is the newest WeChat handed out: keep it here; when Redis is back, this
            # host's file re-seeds it
            self.fleet.mark_down(exc)
            self._write_local(record)
            return
        self._ok()
        if not written:
            self.log.warning("fleet.fenced", generation=self.gen, theirs=theirs,
                             token=mask(record.access_token),
                             reason="another host wrote a newer token after this one's lease "
                             "ran out: this one is not written")
            raise Superseded(f"generation {self.gen} refused: the fleet's record is "
                             f"generation {theirs}")
        self.by = self.fleet.host
        self._write_local(record)
        self._announce(record)

    def _write_local(self, record: TokenRecord) -> None:
        """This host's file, unless it holds a valid token expiring later than ``record``'s
        (a newer token never gives way to an older one; the sync thread and the refresher both
        write it)."""
        with self._local:
            local = self._local_record()
            if local is not None and local.access_token == record.access_token and \
                    local.expires_at == record.expires_at and local.tickets == record.tickets:
                return
            if local is not None and local.access_token != record.access_token and \
                    local.expires_at > record.expires_at and \
                    local.expires_at > self.fleet.clock():
                return
            self.local.write(self._to_local(record))

    def sync(self) -> bool:
        """Bring the local file up to the fleet's record (a follower's whole job; candidates
        too, when another host refreshed); a newer local token re-seeds Redis instead. True
        when the file was rewritten. Raises Redis's errors (the caller marks the fleet down)."""
        record, _ = self._fetch()
        if (newer := self._newer_here(record)) is not None:
            self.seed(newer)
            return False
        if record is None:
            return False
        before = self.local_token()
        self._write_local(record)
        return self.local_token() != before

    def local_token(self) -> str | None:
        try:
            local = self.local.read()
        except TokenCorrupt:
            return None
        return local.access_token if local else None

    # -- bookkeeping ----------------------------------------------------------------------------
    def read_status(self) -> AppStatus:
        status = self.local.read_status()
        if not self.fleet.may_try():
            return status
        try:
            shared = self.fleet.client.hgetall(self.keys.status)
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return status
        self._ok()
        for name, kind in FLEET_FIELDS.items():
            value = shared.get(name.encode())
            if value is not None:
                with contextlib.suppress(ValueError):
                    setattr(status, name, kind(text(value)))
        return status

    def write_status(self, status: AppStatus, durable: bool = True) -> None:
        self.local.write_status(status, durable)
        if not self.fleet.may_try():
            return
        try:
            pipe = self.fleet.client.pipeline(transaction=True)
            pipe.hset(self.keys.status, mapping={k: str(getattr(status, k)) for k in FLEET_FIELDS})
            pipe.expire(self.keys.status, STATUS_TTL)
            pipe.execute()
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return
        self._ok()
