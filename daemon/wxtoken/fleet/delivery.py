"""Where a token the fleet holds is delivered, apart from deciding it (FleetStore, with Redis:
the lease, the compare-and-set, the generations):

- ``LocalCopy``: this host's file (the contract readers rely on, written in this host's time)
  and what the host remembers of that file's token (memory.py); a token fetched while Redis
  was away waits here to re-seed it;
- ``Delivery``: a committed record goes to the file, then to the other hosts (the fleet's
  version and events channel) and the SDKs' keys (mirrors); an announce Redis did not take is
  made again at the next look."""

from __future__ import annotations

import os
import threading

from wxtoken.errors import TokenCorrupt
from wxtoken.fleet.keys import Keys
from wxtoken.fleet.memory import Memory
from wxtoken.fleet.shared import Fleet
from wxtoken.record import TokenRecord
from wxtoken.status import fingerprint
from wxtoken.store import FileStore


class LocalCopy:
    """This host's file of one token, in the fleet's time to its callers."""

    def __init__(self, fleet: Fleet, local: FileStore) -> None:
        self.fleet = fleet
        self.file = local
        self.memory_path = os.path.join(os.path.dirname(local.lock_path), f"{local.app}.gen")
        self.memory = Memory.load(self.memory_path)
        self._lock = threading.Lock()  # orders this host's writes of its file

    # -- times: the fleet's (Redis TIME) in records, this host's in the file ----------------
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

    # -- reading ----------------------------------------------------------------------------
    def record(self) -> TokenRecord | None:
        """The file's record in the fleet's time; None when there is none usable."""
        try:
            return self._to_fleet(self.file.read())
        except TokenCorrupt:
            return None

    def token(self) -> str | None:
        try:
            local = self.file.read()
        except TokenCorrupt:
            return None
        return local.access_token if local else None

    def known_gen(self, local: TokenRecord) -> int | None:
        """The generation the file's token was written under; None when unknown (the file
        changed behind the memory's back, or an older version wrote it)."""
        if self.memory.token != fingerprint(local.access_token):
            return None
        return self.memory.gen

    # -- writing ----------------------------------------------------------------------------
    def remember(self, memory: Memory) -> None:
        """Keep what this host knows of its file's token (best effort: a memory lost or stale
        only makes the file's generation unknown, and Redis's record wins)."""
        self.memory = memory
        memory.save(self.memory_path)

    def forget(self, seen: int) -> None:
        """The file's token lost to a record written since: its generation no longer
        matters (``seen``: the highest generation this host has seen)."""
        with self._lock:
            self.memory = Memory(seen)

    def alone(self, record: TokenRecord, base: int, seen: int) -> None:
        """A token fetched while Redis could not be written: the file, remembered as fetched
        alone after generation ``base``."""
        with self._lock:
            self.file.write(self._to_local(record))
            self.remember(Memory(seen, max(0, base), fingerprint(record.access_token),
                                 alone=True))

    def follow(self, record: TokenRecord, gen: int, seen: int) -> None:
        """The file follows the fleet's record of generation ``gen``, unless its token is known
        to be newer by generation (the sync thread and the refresher both write it: a record
        read before another's write must not put an older token back)."""
        with self._lock:
            local = self.record()
            if local is not None and local.access_token == record.access_token and \
                    local.expires_at == record.expires_at and local.tickets == record.tickets:
                if self.memory.gen != gen or self.memory.alone or self.memory.seen < seen or \
                        self.known_gen(local) is None:
                    self.remember(Memory(seen, gen, fingerprint(record.access_token)))
                return
            if local is not None and local.access_token != record.access_token and \
                    local.expires_at > self.fleet.clock() and \
                    (known := self.known_gen(local)) is not None and \
                    (known >= gen if self.memory.alone else known > gen):
                return
            self.file.write(self._to_local(record))
            self.remember(Memory(seen, gen, fingerprint(record.access_token)))


class Delivery:
    """A committed record's way to its sinks: the file, the other hosts, the SDKs' keys."""

    def __init__(self, fleet: Fleet, keys: Keys, api: str, copy: LocalCopy,
                 mirrored: bool) -> None:
        self.fleet = fleet
        self.keys = keys
        self.api = api
        self.copy = copy
        self.mirrored = mirrored  # an Open Platform's tokens are not written to the SDKs' keys
        self.unannounced: TokenRecord | None = None  # delivered here, the fleet not yet told

    def deliver(self, record: TokenRecord, gen: int, seen: int) -> None:
        """``record``, just committed as generation ``gen``: this host's file, then the
        announce."""
        self.copy.follow(record, gen, seen)
        self.announce(record)

    def announce(self, record: TokenRecord) -> None:
        """Tell the other hosts (and write the mirrors); kept for later when Redis fails."""
        done = self.fleet.announce(self.keys, record, self.api, mirrored=self.mirrored)
        self.unannounced = None if done else record

    def retry(self) -> None:
        """An announce Redis did not take, made again (Redis's errors propagate)."""
        if self.unannounced is not None:
            self.announce(self.unannounced)
