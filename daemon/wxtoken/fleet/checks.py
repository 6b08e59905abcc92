"""What the fleet adds to one token's refresh decision, beside its store: a refresher asks its
store's ``checks`` (store.Checks; a FileStore has none) and knows nothing of Redis.

- Partitioned: Redis unreachable and a ``token`` app about to fetch on its own. First WeChat is
  asked whether this host's token is still accepted (a business API, none of the token quota).
  A refused token means another host, which still reaches Redis, holds a newer one: a fetch here
  would retire it for the whole fleet, so none is made, and this host says it is partitioned
  (``AppStatus.partitioned_at``) until Redis is back. Inside WeChat's ~5-minute overlap a probe
  proves nothing (see the README).
- Suspect: a late fetch (this host's, answered after its lease ran out) may retire the fleet's
  token even after the fleet fetched once more (a request held on the way, answered later
  still). Once WeChat's overlap is over a retired token is refused, so this host asks WeChat
  about the fleet's token then, a few times, and remembers a refused one as refused
  (fleet-wide: the status), so the run, or the lease holder's, replaces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wxtoken.config import AppConfig
from wxtoken.errors import UpstreamError
from wxtoken.logs import mask
from wxtoken.record import TokenRecord
from wxtoken.schedule import Outcome, RefreshModel, State
from wxtoken.status import AppStatus, fingerprint
from wxtoken.upstream import WeChatClient

if TYPE_CHECKING:
    from wxtoken.fleet.store import FleetStore

PARTITION_RECHECK = 300.0  # a partitioned host looks again this often (Redis back wakes it)
REMOVED_RECHECK = 300.0  # a removed identity too (an authorization since wakes it)
# after a late fetch, the fleet's token is asked about at these multiples of WeChat's overlap
# (300 s: at 5.5, 11, 22 and 44 minutes), so a request answered later still is caught too
VERIFY_AFTER = (1.1, 2.2, 4.4, 8.8)


class FleetChecks:
    """The partition probe and the checks after a late fetch, for one FleetStore."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        self.log = store.log
        self.verify_times: list[float] = []  # when to ask WeChat about the fleet's token

    def due(self, now: float) -> bool:
        """Whether a check is due (the run must then take the lock)."""
        return bool(self.verify_times) and self.verify_times[0] <= now

    def reschedule(self, outcome: Outcome, now: float) -> Outcome:
        """After a run: a late fetch seen since makes checks due later; the next one moves the
        run's next time earlier when it comes first."""
        if self.store.suspect:
            self.store.suspect = False
            config = self.store.fleet.config.redis
            overlap = config.overlap if config else 300.0
            # a request held on the way lands at an unknown time: ask a few times, each past
            # the overlap of a token issued since the last
            self.verify_times = [now + overlap * k for k in VERIFY_AFTER]
        if self.verify_times and self.verify_times[0] < outcome.next_at:
            return Outcome(outcome.state, self.verify_times[0], outcome.expires_at)
        return outcome

    def verify(self, app: AppConfig, client: object, record: TokenRecord | None,
               status: AppStatus, now: float) -> None:
        """The check reschedule() set, when it is due: a refused token is remembered as
        refused, so this run, or the lease holder's, replaces it."""
        if not self.due(now):
            return
        while self.verify_times and self.verify_times[0] <= now:
            self.verify_times.pop(0)
        if self.store.degraded or record is None or record.expires_at <= now or \
                not isinstance(client, WeChatClient) or \
                client.model(app) is not RefreshModel.NEW_EACH_CALL:
            return
        try:
            accepted = client.token_accepted(app, record.access_token)
        except UpstreamError as exc:
            self.log.warning("fleet.verify_failed", error=str(exc))
            return
        if accepted:
            self.log.info("fleet.verified", token=mask(record.access_token))
            return
        self.log.warning("fleet.token_retired", token=mask(record.access_token),
                         reason="a late fetch retired the fleet's token after it was fetched "
                         "once more: replacing it now")
        status.refused_token = fingerprint(record.access_token)
        self.store.write_status(status, durable=False)

    def settle(self, status: AppStatus) -> None:
        """Redis is back: a partition is over (the record is the fleet's again)."""
        if status.partitioned_at and not self.store.degraded:
            status.partitioned_at = 0.0
            self.store.write_status(status)
            self.log.info("fleet.partition_ended")

    def before_fetch(self, app: AppConfig, client: object, record: TokenRecord | None,
                     status: AppStatus, now: float) -> Outcome | None:
        """Just before a scheduled fetch: an Outcome when this host must not fetch (it is
        partitioned, or the identity was removed from the fleet), None when the fetch may go
        ahead."""
        if self.store.removed and self.store.still_removed(quiet=True):
            # an authorizer that cancelled: its refresher goes with the platform's resync; no
            # call and nothing counted meanwhile
            return Outcome(State.WAITING, now + REMOVED_RECHECK,
                           record.expires_at if record else None)
        if not self.store.degraded or not isinstance(client, WeChatClient) or \
                client.model(app) is not RefreshModel.NEW_EACH_CALL:
            return None
        if status.partitioned_at:
            # known to be cut off: no fetch, not even once the token has expired (an expired
            # token cannot be asked about, and the fleet's is still live elsewhere)
            return Outcome(State.WAITING, now + PARTITION_RECHECK,
                           record.expires_at if record else None)
        if record is None or record.expires_at <= now:
            return None
        try:
            accepted = client.token_accepted(app, record.access_token)
        except UpstreamError as exc:
            self.log.warning("refresh.probe_failed", error=str(exc),
                             reason="cannot tell whether another host refreshed: fetching")
            return None
        if accepted:
            return None
        status.partitioned_at = now
        self.store.write_status(status)
        self.log.error("fleet.partitioned", token=mask(record.access_token),
                       reason="Redis is unreachable and WeChat refuses this host's token: "
                       "another host holds a newer one; no fetch here (it would retire "
                       "that one); readers here get the refused token until Redis is back")
        return Outcome(State.WAITING, now + PARTITION_RECHECK, record.expires_at)
