"""FleetStore: one app's record, bookkeeping and lock when Redis is the source of truth, beside
the local file every host keeps (the contract readers rely on).

- ``locked()``: the local writers' lock, then the fleet's lease and the generation taken with
  it (lease.py). ``holding()`` says, just before the upstream call, whether the lease is still
  this host's.
- ``look()``: the Redis record as it stands, with no side effect (the refresher's look
  without the lock).
- ``read()``, under the lock: the Redis record. Tokens are ordered by generation alone,
  never by host clocks or expiries: this host remembers (memory.py, in ``.locks/<app>.gen``)
  the generation its file's token was written under and the highest it has seen, across
  restarts. Its file re-seeds Redis (no upstream call) only when Redis has no record, when
  Redis's generation is lower than the file's (a Redis restored from an old snapshot, a
  lagging replica promoted), or with a token this host fetched itself while Redis was away and
  nobody wrote since. Otherwise the record wins and the file follows it.
- ``write()``: a compare-and-set that refuses a lower generation than the record's, so a holder
  that lost its lease (paused, SIGSTOPped, a hung call) never overwrites a newer token; then the
  local file.
- a removed identity (an Open Platform's authorizer that cancelled, ``keys.gone``) is never
  written or re-seeded: a host that still has its file, or a refresh of it in flight, cannot
  put it back, and ``holding()`` says no call is made for it.
- ``fetched()``: after a token call WeChat may have answered, a lease found lost means that
  call may have retired the record's token: the record's generation is marked fenced
  (``retired()`` then says so to every host's refresher, and the next lease holder fetches
  once more; the next record clears the mark). A token fetched while Redis was away that
  cannot re-seed Redis (another host wrote since) marks it too.
- ``sync()``: the local file follows the record (followers, and candidates after another host's
  refresh), by the same rules as ``read()``.
- the day's calls, forced refreshes and their spacing are counted in Redis, fleet-wide
  (counts.py); the rest of the bookkeeping (last result, backoff) is this host's own, in its
  status file.
- While Redis is unreachable (``degraded``) all of it falls back to the local files; one command
  every few seconds tries Redis again.

Times in records are the fleet's (Redis TIME); local files are written in this host's time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from wxtoken.config import AppConfig
from wxtoken.errors import Superseded, TokenCorrupt
from wxtoken.fleet.checks import FleetChecks
from wxtoken.fleet.connect import REDIS_ERRORS
from wxtoken.fleet.counts import FleetCounts
from wxtoken.fleet.delivery import Delivery, LocalCopy
from wxtoken.fleet.events import Fenced
from wxtoken.fleet.keys import Keys
from wxtoken.fleet.lease import Lease
from wxtoken.fleet.memory import Memory
from wxtoken.fleet.shared import Fleet, parse_record_json, record_json
from wxtoken.logs import get_logger, mask
from wxtoken.record import TokenRecord
from wxtoken.schedule import RefreshModel, model_of
from wxtoken.status import AppStatus, fingerprint
from wxtoken.store import FileStore

FENCED_TTL = 86400  # a fenced-fetch mark outlives any record it can concern


class FleetStore:
    """One app's state in the fleet's Redis, with this host's local file beside it."""

    def __init__(self, fleet: Fleet, app: AppConfig, identity: str | None = None,
                 local: FileStore | None = None, key: str | None = None,
                 still_removed: Callable[[], bool] | None = None) -> None:
        """``identity``, ``local`` and ``key`` (the name the daemon knows it by) default to
        the app's; an Open Platform's tokens give their own. ``still_removed``: whether the
        owner (the platform) still holds the identity removed; a removed mark it no longer
        holds (authorized again, the mark's deletion lost to a failure) is deleted here."""
        self.fleet = fleet
        self.app = app
        self.key = key or app.name
        self.platform = key is not None  # an Open Platform's token (not a configured app)
        self.local = local or FileStore(fleet.config.state_dir, app.name, app.file_mode,
                                        app.file_group)
        self.keys = Keys(fleet.prefix, identity or app.identity)
        self.log = get_logger(app=self.key, appid=app.appid, api=app.api)
        self.lease = Lease(fleet, self.keys, self.log)
        self.counts = FleetCounts(fleet, self.keys)
        # a lease whose holder died frees itself this late: waiting for it is not a stall
        self.extra_wait = self.lease.extra_wait
        self.copy = LocalCopy(fleet, self.local)  # the file, and its token's generation
        self.delivery = Delivery(fleet, self.keys, app.api, self.copy,
                                 mirrored=not self.platform)
        # the highest generation this host has seen (a floor after a flush), across restarts
        self.seen_gen = self.copy.memory.seen
        self._last: tuple[str, int] = ("", 0)  # the record last read: its token, generation
        self._fenced = 0  # the fenced-fetch mark read with it (0: none)
        self._retiring = False  # the last token call may have retired the previous token
        # a late fetch may have retired the fleet's token: the refresher checks the token
        # once WeChat's overlap is over (and takes the flag)
        self.suspect = False
        self.checks: FleetChecks = FleetChecks(self)
        self.by = ""  # who wrote the record last seen
        self.removed = False  # Redis refused a write or seed: the identity was removed
        self._still_removed_check = still_removed

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
        with self.local.locked(timeout), self.lease.taken(self.seen_gen) as gen:
            if gen is not None:  # None: Redis is down, this host decides alone, from its file
                self.seen_gen = max(self.seen_gen, gen)
            yield

    def holding(self) -> bool:
        """Just before an upstream call: whether this host still holds the lease (a holder
        paused past it must not fetch: its fetch would retire the new leader's token). True
        when Redis is down (the host decides alone then)."""
        if self.removed and self.still_removed():
            return False
        lease = self.lease
        if not lease.held:
            return True
        if lease.lost:
            return False
        if lease.gen <= self._last[1]:
            # a record of this generation or higher was seeded after the lease was taken (a
            # host back from a partition): a write would be refused, so no call
            self.log.warning("lease.stale", generation=lease.gen, theirs=self._last[1],
                             reason="the record's generation passed the lease's: no call")
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

    def still_removed(self, quiet: bool = False) -> bool:
        """Whether the identity is still removed: its mark is there, and the owner still holds
        it removed (a stale mark is deleted); True while Redis cannot say."""
        if not self.fleet.may_try():
            return True
        try:
            marked = bool(self.fleet.client.exists(self.keys.gone))
            if marked and self._still_removed_check is not None and \
                    not self._still_removed_check():
                self.fleet.client.delete(self.keys.gone)
                self.log.warning("fleet.removed_mark_cleared", reason="authorized again after "
                                 "its removal: its token is written to the fleet again")
                marked = False
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return True
        self.removed = marked
        if marked and not quiet:
            self.log.warning("fleet.removed_no_call", reason="removed from the fleet (the "
                             "authorization was cancelled): no call")
        return marked

    def _refused_removed(self, was: bool) -> None:
        """Redis refused a write or seed of a removed identity (``was``: known before)."""
        if not was:
            self.log.warning("fleet.removed", reason="removed from the fleet (the authorization "
                             "was cancelled): its token is not written back to Redis")
        self.removed = True

    # -- the record -----------------------------------------------------------------------------
    def _fetch(self) -> tuple[TokenRecord | None, int]:
        """The Redis record and its generation (None, 0 when there is none usable), and the
        fenced-fetch mark beside it (one round trip)."""
        raw, fenced = self.fleet.client.mget([self.keys.record, self.keys.fenced])
        self._ok()
        try:
            self._fenced = int(fenced) if fenced is not None else 0
        except ValueError:
            self._fenced = 0
        if raw is None:
            self._last = ("", 0)
            return None, 0
        try:
            record, gen, self.by = parse_record_json(raw, self.app.name)
        except (ValueError, TokenCorrupt) as exc:
            self.log.warning("fleet.record_unusable", reason=str(exc))
            self._last = ("", 0)
            return None, 0
        self.seen_gen = max(self.seen_gen, gen)
        self._last = (record.access_token, gen)
        return record, gen

    def retired(self, record: TokenRecord) -> bool:
        """Whether a fetch made after its host's lease ran out may have retired ``record``'s
        token (the record last read is marked fenced): the next lease holder replaces it."""
        token, gen = self._last
        return self.fleet.up and self._fenced > 0 and token == record.access_token and \
            gen <= self._fenced

    def fenced_pending(self) -> bool:
        """Whether the record last read is marked fenced (its token may be retired)."""
        return self._fenced > 0 and bool(self._last[0]) and self._last[1] <= self._fenced

    def _settle(self, record: TokenRecord | None, gen: int) -> tuple[TokenRecord | None, int]:
        """Decide between the Redis record (generation ``gen``) and this host's valid file by
        generation, and re-seed Redis from the file when the file is the newer; returns the
        record the fleet holds afterwards. Raises Redis's errors."""
        local = self.copy.record()
        if local is None or local.expires_at <= self.fleet.clock() or (
                record is not None and local.access_token == record.access_token):
            return record, gen
        known = self.copy.known_gen(local)
        seed_gen: int | None = None
        if record is None:
            # Redis restarted empty or was flushed: the file's generation orders the seeds
            seed_gen = (known + 1 if self.copy.memory.alone else known) if known is not None else 0
        elif known is not None and self.copy.memory.alone and gen <= known:
            seed_gen = known + 1  # fetched while Redis was away, and nobody wrote since
        elif known is not None and not self.copy.memory.alone and gen < known:
            seed_gen = known  # Redis went back (an old snapshot, a lagging replica promoted)
        if seed_gen is not None and self.seed(local, seed_gen):
            return self._fetch()
        if known is not None and self.copy.memory.alone and record is not None and \
                model_of(self.app.api) is RefreshModel.NEW_EACH_CALL:
            # a token this host fetched alone lost to a record written since: which WeChat
            # issued last is unknown, so the record's token may be retired: one more fetch
            # (stable_token's and WeCom's calls made alone retire nothing)
            self._mark_fenced("this host fetched a token while Redis was away, and another "
                              "host wrote one since")
            self.copy.forget(self.seen_gen)
            return self._fetch()
        return record, gen

    def read(self) -> TokenRecord | None:
        if not self.fleet.may_try():
            return self.copy.record()
        try:
            self.delivery.retry()  # Redis failed right after a write: tell now
            record, gen = self._settle(*self._fetch())
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return self.copy.record()
        if record is not None:
            self.copy.follow(record, gen, self.seen_gen)
        return record

    def look(self) -> TokenRecord | None:
        """The Redis record as it stands (the local file while Redis is unreachable): no
        re-seed, no file written (only an announce of this host's own write that Redis failed
        to take is made again). None when Redis has none, or when this host's file does not
        hold its token (a start, another host's refresh the sync thread has not followed yet):
        the refresher then takes the lock (and the lease), and read() decides."""
        if not self.fleet.may_try():
            return self.copy.record()
        try:
            self.delivery.retry()  # this host's own write, not yet told: tell now
            record = self._fetch()[0]
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return self.copy.record()
        if record is not None and self.copy.token() != record.access_token:
            return None  # this host's file is not in step: the run brings it there, locked
        return record

    def seed(self, record: TokenRecord, gen: int) -> bool:
        """Put this host's valid record into Redis as generation ``gen``, unless Redis holds
        one of that generation or higher."""
        was = self.removed
        answer = self._seed(record, gen)
        if answer < 0 and not self.still_removed(quiet=True):
            answer = self._seed(record, gen)  # the mark was stale (authorized again)
        if answer < 0:
            self._refused_removed(was)
        done = answer > 0
        if done:
            self.log.warning("fleet.reseeded", token=mask(record.access_token), generation=gen,
                             expires_in=int(record.expires_at - self.fleet.clock()),
                             reason="Redis had no record this new")
            self.seen_gen = max(self.seen_gen, gen)
            self.copy.remember(Memory(self.seen_gen, gen, fingerprint(record.access_token)))
            self.delivery.announce(record)
        return done

    def _seed(self, record: TokenRecord, gen: int) -> int:
        return int(self.fleet.seed_record(
            keys=[self.keys.record, self.keys.gen, self.keys.fenced, self.keys.gone],
            args=[record_json(record, 0, self.fleet.host), gen, self.seen_gen]))

    def _mark_fenced(self, why: str) -> None:
        """Mark every record written so far as possibly retired (Redis's errors propagate);
        every host hears of it, and the next lease holder fetches once more."""
        marked = int(self.fleet.mark_fenced(keys=[self.keys.record, self.keys.gen,
                                                  self.keys.fenced], args=[FENCED_TTL]))
        self._fenced = max(self._fenced, marked)
        self.log.warning("fleet.fetch_fenced", generation=marked, reason=why +
                         ": the fleet's token may be retired; the next lease holder fetches "
                         "once more")
        self.suspect = True
        # every host's sync thread hears it (a candidate there wakes its refresher)
        self.fleet.announce_record(keys=[self.fleet.version_key],
                                   args=[self.fleet.channel, self.keys.identity])
        self.fleet.events.publish(Fenced(self.key))

    def fetched(self, retires: bool) -> None:
        """Right after a token call WeChat may have answered (``retires``: a call that issues a
        new token): a lease lost meanwhile means another host may have fetched and written
        since, and this call may have retired that token (WeChat is the resource, and has no
        fencing): mark the record so the next lease holder fetches once more."""
        self._retiring = retires
        if not retires or not self.lease.held:
            return  # Redis was down when the lock was taken: the memory says "alone"
        try:
            if not self.lease.lost and self.lease.owned():
                return  # held throughout: no other host can have fetched meanwhile
            self._mark_fenced("this host's call was answered after its lease ran out")
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)

    def _write_record(self, record: TokenRecord, gen: int) -> list[int]:
        return list(self.fleet.write_record(
            keys=[self.keys.record, self.keys.gen, self.keys.fenced, self.keys.gone],
            args=[record_json(record, gen, self.fleet.host), gen]))

    def write(self, record: TokenRecord) -> None:
        gen = self.lease.gen
        if not self.lease.held:  # Redis was down when the lock was taken: this host alone
            self.copy.alone(record, self.seen_gen, self.seen_gen)
            return
        was = self.removed
        try:
            written, theirs, *seeded = self._write_record(record, gen)
            if not written and theirs < 0 and not self.still_removed(quiet=True):
                written, theirs, *seeded = self._write_record(record, gen)  # a stale mark
        except REDIS_ERRORS as exc:
            # the token is the newest WeChat handed out: keep it here; when Redis is back, this
            # host's file re-seeds it (unless a host wrote a newer generation meanwhile)
            self.fleet.mark_down(exc)
            self.copy.alone(record, gen - 1, self.seen_gen)
            return
        self._ok()
        retiring, self._retiring = self._retiring, False
        if not written and theirs < 0:
            self._refused_removed(was)
            raise Superseded("removed from the fleet: the authorization was cancelled")
        self.removed = False
        if not written:
            self.log.warning("fleet.fenced", generation=gen, theirs=theirs,
                             token=mask(record.access_token),
                             reason="another host wrote a newer token after this one's lease "
                             "ran out: this one is not written")
            if retiring and seeded and seeded[0]:
                # re-seeded by a host that fetched alone while Redis was away: which of the
                # two WeChat issued last is unknown (a record written under a later lease is
                # newer: its lease began after this one's ended, after this answer, or the
                # answer came late and fetched() has marked it already)
                with contextlib.suppress(*REDIS_ERRORS):
                    self._mark_fenced("this host's fetched token was refused by a record "
                                      "re-seeded from another host's file")
            raise Superseded(f"generation {gen} refused: the fleet's record is "
                             f"generation {theirs}")
        self.by = self.fleet.host
        self._last = (record.access_token, gen)
        self.delivery.deliver(record, gen, self.seen_gen)

    def sync(self) -> bool:
        """Bring the local file up to the fleet's record (a follower's whole job; candidates
        too, when another host refreshed); a newer local token re-seeds Redis instead. True
        when the file was rewritten. Raises Redis's errors (the caller marks the fleet down)."""
        record, gen = self._settle(*self._fetch())
        if record is None:
            return False
        before = self.local_token()
        self.copy.follow(record, gen, self.seen_gen)
        return self.local_token() != before

    def local_token(self) -> str | None:
        return self.copy.token()

    # -- bookkeeping ----------------------------------------------------------------------------
    def read_status(self) -> AppStatus:
        return self.counts.read(self.local.read_status())

    def write_status(self, status: AppStatus, durable: bool = True) -> None:
        self.local.write_status(status, durable)
        self.counts.write(status)
