"""What every part of one Open Platform component is given when built: the daemon's token
registry (``Host``), the component's config, files and fleet share, the clock, the log, and the
platform's lock (``Parts.lock``, shared by every part: see platform.py for the lock order)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from wxtoken.component.fleet import PlatformFleet
from wxtoken.component.store import ComponentFiles
from wxtoken.config import Api, AppConfig, ComponentConfig, Config
from wxtoken.errors import TokenUnavailable
from wxtoken.logs import get_logger
from wxtoken.passive import Forced
from wxtoken.record import TokenRecord, load_record, token_path
from wxtoken.refresher import Refresher
from wxtoken.upstream import WeChatClient

if TYPE_CHECKING:
    from wxtoken.fleet.node import FleetNode


def number(value: Any) -> float | None:
    """A time from JSON (a number, not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


class Host(Protocol):
    """What a platform needs of the daemon: its token registry (registry.TokenRegistry)."""

    config: Config
    refreshers: dict[str, Refresher]

    @property
    def client(self) -> WeChatClient: ...

    def add_refresher(self, key: str, refresher: Refresher) -> None: ...

    def remove_refresher(self, key: str) -> None: ...

    def settle(self, key: str, timeout: float) -> bool: ...

    def wake(self, key: str) -> None: ...

    def force(self, key: str, invalid_token: str | None, privileged: bool) -> Forced | None: ...

    def later(self, func: Callable[[], None], delay: float, job: str) -> None: ...

    def population(self) -> int: ...


@dataclass(frozen=True, eq=False)
class Parts:
    """One component's shared parts (built once by Platform, never replaced)."""

    host: Host
    comp: ComponentConfig
    files: ComponentFiles
    fleet: PlatformFleet | None
    node: FleetNode | None
    # a follower (fleet mode, no secret) never calls WeChat: it mirrors the fleet's files
    following: bool
    clock: Callable[[], float]
    log: Any  # structlog's, bound to component=NAME
    # the platform's bookkeeping (registered keys, needs_reauth, tombstones, cancellations,
    # lost authorizations): short sections, see platform.py for what may be taken inside it
    lock: threading.Lock

    @classmethod
    def build(cls, host: Host, comp: ComponentConfig, clock: Callable[[], float],
              node: FleetNode | None) -> Parts:
        files = ComponentFiles(host.config.state_dir, comp.name, comp.component_appid)
        fleet = PlatformFleet(node.fleet, comp, files) if node is not None else None
        return cls(host=host, comp=comp, files=files, fleet=fleet, node=node,
                   following=node is not None and comp.follower, clock=clock,
                   log=get_logger(component=comp.name), lock=threading.Lock())

    def key(self, appid: str) -> str:
        return f"{self.comp.name}/{appid}"

    @property
    def component_key(self) -> str:
        return self.key(self.comp.component_appid)

    def app(self, appid: str, tickets: tuple[str, ...] = ()) -> AppConfig:
        return AppConfig(name=appid, api=Api.TOKEN, appid=appid, secret="",
                         secret_source=f"component {self.comp.name}", tickets=tickets)

    def host_refresher(self, key: str) -> Refresher | None:
        return self.host.refreshers.get(key)

    def component_token(self) -> str | None:
        """The component token in its file, when valid for a second more."""
        try:
            record = load_record(token_path(self.files.dir, self.comp.component_appid),
                                 self.comp.component_appid)[0]
        except TokenUnavailable:
            return None
        return record.access_token if record.expires_at > time.time() + 1 else None

    def record(self, appid: str) -> TokenRecord | None:
        """The token in this host's file (a follower's health)."""
        try:
            return load_record(token_path(self.files.dir, appid), appid)[0]
        except TokenUnavailable:
            return None


class Part:
    """A part of one platform (its authorizers, events, cancellations, reconcile): the shared
    parts as attributes of its own."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.host, self.comp, self.files, self.fleet = parts.host, parts.comp, parts.files, \
            parts.fleet
        self.clock, self.log, self._lock = parts.clock, parts.log, parts.lock
