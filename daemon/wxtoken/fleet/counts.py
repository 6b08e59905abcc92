"""The fleet-wide part of an app's bookkeeping (``<prefix>:{<identity>}:status``): the day's
calls, forced refreshes and their spacing, counted once for the whole fleet. The rest of an
AppStatus (last result, backoff) is each host's own, in its status file. While Redis is
unreachable the local file's values stand."""

from __future__ import annotations

import contextlib

from wxtoken.fleet.connect import REDIS_ERRORS, text
from wxtoken.fleet.keys import Keys
from wxtoken.fleet.shared import Fleet
from wxtoken.status import AppStatus

STATUS_TTL = 3 * 86400  # the fleet's counts outlive a WeChat day, and no more
FLEET_FIELDS = {"calls_day": str, "calls_today": int, "forced_today": int,
                "last_forced_at": float, "forced_streak": int, "ticket_replaced_at": float,
                "refreshed_at_exact": float,  # the record's refreshed_at with its fraction
                "refused_token": str}  # a reported token a forced refresh could not replace


class FleetCounts:
    """One identity's fleet-wide counts over a host's AppStatus."""

    def __init__(self, fleet: Fleet, keys: Keys) -> None:
        self.fleet = fleet
        self.key = keys.status

    def read(self, status: AppStatus) -> AppStatus:
        """``status`` (this host's) with the fleet's counts over it."""
        if not self.fleet.may_try():
            return status
        try:
            shared = self.fleet.client.hgetall(self.key)
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return status
        self.fleet.mark_up()
        for name, kind in FLEET_FIELDS.items():
            value = shared.get(name.encode())
            if value is not None:
                with contextlib.suppress(ValueError):
                    setattr(status, name, kind(text(value)))
        return status

    def write(self, status: AppStatus) -> None:
        if not self.fleet.may_try():
            return
        try:
            pipe = self.fleet.client.pipeline(transaction=True)
            pipe.hset(self.key, mapping={k: str(getattr(status, k)) for k in FLEET_FIELDS})
            pipe.expire(self.key, STATUS_TTL)
            pipe.execute()
        except REDIS_ERRORS as exc:
            self.fleet.mark_down(exc)
            return
        self.fleet.mark_up()
