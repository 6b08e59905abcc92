"""When one token is due: the refresher's schedule, drawn once per record.

A record is due at its jittered time (``schedule.jittered_due_at``: every ``refresh_interval``,
and always ``renew_before`` ahead of its expiry), or at once when it cannot be trusted: stamped
in the future (the clock stepped back), possibly retired by another host's late fetch, waiting
for an authorizer's refresh token to be saved, or refused by WeChat when a reader reported it.
While a fleet's coordination is down, a ``token`` or WeCom record waits for its last
``renew_before`` instead (``schedule.degraded_due_at``): hosts refreshing on their own would
retire each other's tokens. Its tickets fall due on their own (tickets.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from wxtoken import schedule
from wxtoken.schedule import RefreshModel
from wxtoken.status import AppStatus, fingerprint

if TYPE_CHECKING:
    from wxtoken.config import AppConfig, Config
    from wxtoken.record import TokenRecord
    from wxtoken.source import TokenSource
    from wxtoken.store import TokenStore
    from wxtoken.tickets import Tickets


class Timing:
    """One token's due times (its refresher's collaborators, given when built)."""

    def __init__(self, app: AppConfig, config: Config, store: TokenStore, source: TokenSource,
                 tickets: Tickets, rng: random.Random, clock: Callable[[], float],
                 population: Callable[[], int]) -> None:
        self.app, self.config, self.store, self.source = app, config, store, source
        self.model = source.model(app)
        self.tickets, self.rng, self.clock, self.population = tickets, rng, clock, population
        self._due: tuple[str, float, float] | None = None  # (token, refreshed, jittered due)

    def configure(self, config: Config) -> None:
        self.config = config
        self._due = None  # drawn again under the new settings

    def due_at(self, record: TokenRecord, status: AppStatus) -> float:
        """When this record should be replaced, jitter included (drawn once per record)."""
        exact = status.refreshed_at_exact if int(
            status.refreshed_at_exact) == record.refreshed_at else None
        key = (record.access_token, float(record.refreshed_at))
        if self._due is None or self._due[:2] != key:
            due = schedule.jittered_due_at(record, self.model, self.config.refresh_interval,
                                           self.config.renew_before, self.population(),
                                           self.rng, exact)
            self._due = (*key, due)
        return self._due[2]

    def is_due(self, record: TokenRecord, status: AppStatus, now: float) -> bool:
        if schedule.from_the_future(record.refreshed_at, now):
            return True
        if self.store.retired(record):
            # another host's late fetch may have retired it: a lease holder fetches once more
            return True
        if self.source.unpublished(self.app.appid):
            # an authorizer's token whose refresh token could not be written yet: the fetch
            # writes it, then hands the token over without a call (WeChat retires the
            # file's token soon)
            return True
        if self.model is RefreshModel.NEW_EACH_CALL \
                and status.refused_token == fingerprint(record.access_token):
            # a reader reported it and the forced refresh could not replace it then (a plain
            # call replaces it; stable_token and WeCom would hand back the same token)
            return True
        if self.degraded:
            # the fleet's coordination is down: candidates that refreshed on their own would
            # retire each other's tokens, so wait until the token's last renew_before, then
            # one jittered attempt per host (stable_token hands every caller the same token)
            return self.degraded_due_at(record) <= now
        return self.due_at(record, status) <= now

    @property
    def degraded(self) -> bool:
        """Whether the degraded rule holds: the store's coordination is down, and this token's
        API issues a new token per call (stable_token hands every caller the same one)."""
        return self.store.degraded and self.model is not RefreshModel.FINAL_WINDOW

    def degraded_due_at(self, record: TokenRecord) -> float:
        """schedule.degraded_due_at, drawn once per record."""
        key = (record.access_token, -float(record.refreshed_at))  # apart from due_at's draws
        if self._due is None or self._due[:2] != key:
            self._due = (*key, schedule.degraded_due_at(record, self.model,
                                                        self.config.renew_before, self.rng))
        return self._due[2]

    def tickets_due_at(self, record: TokenRecord) -> float:
        return self.tickets.due_at(record, schedule.lead(record, self.model,
                                                          self.config.renew_before),
                                   self.clock())

    def next_at(self, record: TokenRecord, status: AppStatus) -> float:
        """The record's next run: its due time, or its tickets' when sooner."""
        due = self.degraded_due_at(record) if self.degraded else self.due_at(record, status)
        return min(due, self.tickets_due_at(record))
