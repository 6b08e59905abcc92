"""JS-SDK and card tickets (``jsapi``, ``wx_card``): fetched with the app's token, kept in its
file next to it, renewed before they expire. A ticket that cannot be had keeps its valid old
value (tickets do not die with the token) and is retried with backoff; one refused because
WeChat no longer takes the token is retried with the hard backoff.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from wxtoken import schedule
from wxtoken.config import AppConfig
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import UpstreamError
from wxtoken.record import TokenRecord
from wxtoken.source import TokenSource


@dataclass(frozen=True)
class Fetched:
    """What one round of ticket calls gave."""

    record: TokenRecord  # with every ticket that could be had (old ones kept while valid)
    refused: bool  # getticket said the token is no longer good (40001/42001)
    unused: int  # calls counted for this round that were not made


class Tickets:
    """One app's tickets: when they are due, and fetching them (with their own backoff)."""

    def __init__(self, app: AppConfig, client: TokenSource, log: Any, rng: random.Random,
                 transient: tuple[float, float], hard: tuple[float, float]) -> None:
        self.app = app
        self.client = client
        self.log = log
        self.rng = rng
        self.transient = transient  # (base, cap) of the backoff after a failed call
        self.hard = hard  # (base, cap) after a refusal replacing the token did not cure
        self.failures = 0
        self.retry_at = 0.0
        self.set_at = 0.0  # when retry_at was set (a wait from before a clock step is void)

    def due_at(self, record: TokenRecord, lead: float, now: float) -> float:
        """When a configured ticket is missing or within ``lead`` of expiry (inf: none)."""
        due = math.inf
        retry_at = self.retry_at
        if retry_at and schedule.from_the_future(self.set_at, now):
            retry_at = 0.0
        for kind in self.app.tickets:
            ticket = record.tickets.get(kind)
            due = min(due, retry_at if ticket is None else max(ticket[1] - lead, retry_at))
        return due

    def fetch(self, record: TokenRecord, now: float) -> Fetched:
        """``record`` with fresh tickets, fetched with its token."""
        tickets = dict(record.tickets)
        failed = refused = False
        asked = 0
        for kind in self.app.tickets:
            asked += 1
            try:
                got = self.client.fetch_ticket(self.app, record.access_token, kind)
            except UpstreamError as exc:
                failed = True
                if not exc.called:
                    asked -= 1  # no byte reached WeChat: it costs no budget
                self.log.warning("ticket.failed", ticket=kind, error=str(exc),
                                 errcode=exc.errcode, errmsg=exc.errmsg,
                                 **({"rid": exc.rid} if exc.rid else {}))
                if exc.kind is ErrorClass.TOKEN_INVALID:
                    refused = True
                    break
                continue
            tickets[kind] = (got.access_token, int(now) + got.expires_in)
            self.log.info("ticket.refreshed", ticket=kind, expires_in=got.expires_in,
                          took_ms=got.took_ms)
        if failed:
            self.failures += 1
            base, cap = self.hard if refused else self.transient
            self.retry_at = now + schedule.backoff(self.failures, base, cap, self.rng,
                                                   full_jitter=not refused)
            self.set_at = now
        else:
            self.failures, self.retry_at = 0, 0.0
        kept = {k: v for k, v in tickets.items() if k in self.app.tickets and v[1] > now}
        return Fetched(record.replace(tickets=kept), refused, len(self.app.tickets) - asked)
