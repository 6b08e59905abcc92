"""What the fleet's parts tell each other: frozen, typed events on one small broker (as
APScheduler 4's data stores publish typed events), instead of callbacks handed through
constructors and hook lists filled from outside.

A subscriber runs on the publishing thread, in the order of subscription; an order between
parts that matters is an event of its own (``Resyncing`` is published before any store
follows the fleet, so an Open Platform removes what is gone before its stores would re-seed it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

E = TypeVar("E")


@dataclass(frozen=True)
class RedisChanged:
    """Redis went up or down (Fleet)."""


@dataclass(frozen=True)
class RedisBack:
    """Redis is back after being down (Fleet): schedules made without it are redone."""


@dataclass(frozen=True)
class Fenced:
    """A record was marked fenced (a late fetch may have retired its token): ``key``'s
    refresher looks now (FleetStore, Sync)."""

    key: str


@dataclass(frozen=True)
class FileFollowed:
    """The sync thread rewrote ``key``'s local file from the fleet's record (Sync)."""

    key: str


@dataclass(frozen=True)
class RefreshAsked:
    """A follower somewhere asked for a passive refresh of ``identity`` (Sync)."""

    identity: str
    invalid_token: str | None
    privileged: bool


@dataclass(frozen=True)
class RefreshRequested:
    """This host is to run the passive refresh a follower asked for, on its app ``name``
    (FleetNode, on a thread of its own)."""

    name: str
    invalid_token: str | None
    privileged: bool


@dataclass(frozen=True)
class Announced:
    """A name announced on the events channel that is not a record's (an Open Platform's
    authorizer set, its ticket) (Sync)."""

    name: str


@dataclass(frozen=True)
class Heard:
    """A message on a channel some part listens to (Sync.listen)."""

    channel: str
    data: str


@dataclass(frozen=True)
class Resyncing:
    """A resync begins: published before any store follows the fleet's record (Sync)."""


class Broker:
    """Subscribe callbacks to event types; publish events to them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[type, tuple[Callable[[Any], None], ...]] = {}

    def subscribe(self, event_type: type[E], callback: Callable[[E], None]) -> None:
        with self._lock:
            self._subscribers[event_type] = (*self._subscribers.get(event_type, ()), callback)

    def publish(self, event: object) -> None:
        for callback in self._subscribers.get(type(event), ()):
            callback(event)
