"""The passive refresh, under the writers' lock: a reader reported the token invalid, or an
operator asked for a new one (`wxtoken refresh`, the control socket's POST /refresh).

It takes the scheduled run's steps (the Refresher's fetch, store and failure bookkeeping) behind
the limits of passive.py: the spacing between forced refreshes, stable_token's 20 a day, a reserve
of the budget for scheduled refreshes, and the quota and hard-error waits. A report of a token
already replaced is answered with the current one and no call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wxtoken import passive, schedule
from wxtoken.errors import UpstreamError
from wxtoken.logs import mask
from wxtoken.passive import Forced, ForcedState
from wxtoken.schedule import RefreshModel
from wxtoken.status import fingerprint

if TYPE_CHECKING:
    from wxtoken.refresher import Refresher

FLEET_DOWN = "the fleet's Redis is unreachable: no forced refresh (the day's counts live there)"


def forced_refresh(r: Refresher, invalid_token: str | None, privileged: bool) -> Forced:
    """The passive refresh of ``r``'s token; the caller holds the lock."""
    now = r.clock()
    record = r._read()
    status = r.store.read_status()
    r.record, r.status = record, status
    valid = record is not None and record.expires_at > now
    if invalid_token is not None and valid and record is not None and \
            record.access_token != invalid_token:
        return Forced(ForcedState.CURRENT, record)  # already replaced: no upstream call
    if r.pending is not None and (written := r._write_pending(record, status, now)):
        return Forced(ForcedState.REFRESHED, r.record, written)  # fetched already
    if r.store.degraded:
        r.log.warning("refresh.refused", state=ForcedState.WAITING, reason=FLEET_DOWN)
        return Forced(ForcedState.WAITING, record, retry_after=10.0, reason=FLEET_DOWN)
    if (parent := r.parent.look()) is not None:
        # no call can be made (and none is counted or failed): it goes when the parent comes
        reason = f"the token it is fetched with ({parent}) is not there yet"
        r.log.warning("refresh.refused", state=ForcedState.WAITING, reason=reason)
        return Forced(ForcedState.WAITING, record, r.parent.waits(parent, record, now),
                      retry_after=10.0, reason=reason)
    # WeChat refused the file's token: if it cannot be replaced now (the call fails, or a
    # quota or hard-error wait holds it back), the next run replaces it. Not for a report
    # the spacing or the budget refuses: those limits hold back readers that report
    # freshly issued tokens, and a restart must not make the call for them.
    remember = invalid_token is not None and record is not None \
        and r.model is RefreshModel.NEW_EACH_CALL and record.access_token == invalid_token
    calls = 1 + len(r.app.tickets)
    refusal = passive.refusal(status, now, r.app.api, r.config.daily_budget, calls,
                              privileged, r.wait_end(status, now, calls))
    if refusal is not None and refusal.state is ForcedState.WAITING and remember:
        assert invalid_token is not None
        status.refused_token = fingerprint(invalid_token)
        r.store.write_status(status, durable=False)
    if refusal is not None:
        log = r.log.error if refusal.retry_after > 3600 else r.log.warning
        log("refresh.refused", state=refusal.state, reason=refusal.reason,
            retry_after=round(refusal.retry_after, 1))
        return Forced(refusal.state, record, retry_after=refusal.retry_after,
                      reason=refusal.reason)
    passive.count_forced(status, now, calls, record.refreshed_at if record else None)
    r.store.write_status(status, durable=False)
    r.log.info("refresh.forced", reported=mask(invalid_token) or None,
               streak=status.forced_streak)
    if status.forced_streak >= 2:
        r.log.warning("refresh.reported_again", streak=status.forced_streak,
                      next_spacing=schedule.force_spacing(status.forced_streak),
                      reason="freshly issued tokens keep being reported invalid: a "
                      "reader bug, or another process fetching tokens for this appid")
    r._still_holding()
    try:
        fetched = r._fetch(r.model is RefreshModel.FINAL_WINDOW)
    except UpstreamError as exc:
        status.calls_today -= len(r.app.tickets)
        if not exc.called:  # nothing reached WeChat: neither the budget nor its 20 a day
            status.calls_today -= 1
            status.forced_today -= 1
        if remember:
            assert invalid_token is not None
            status.refused_token = fingerprint(invalid_token)
        outcome = r._failed(exc, status, record, now)
        return Forced(ForcedState.FAILED, record if valid else None, outcome, error=exc)
    outcome = r._store_fetched(fetched, record, status, now, forced=True)
    return Forced(ForcedState.REFRESHED, r.record, outcome)
