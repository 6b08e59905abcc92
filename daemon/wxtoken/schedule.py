"""When a token is due for replacement. Standard library only: `wxtoken status` uses it too."""

from __future__ import annotations

from wxtoken.record import TokenRecord

# stable_token: fetch between these fractions of the lead before expiry (inside WeChat's window)
STABLE_EARLIEST, STABLE_LATEST = 0.8, 0.6


def lead(record: TokenRecord, renew_before: float) -> float:
    """How long before expiry the token must be replaced (never more than half its life)."""
    return min(renew_before, (record.expires_at - record.refreshed_at) / 2)


def due_at(record: TokenRecord, api: str, refresh_interval: float, renew_before: float,
           refreshed_at: float | None = None) -> float:
    """The latest moment the record should be replaced (the refresher jitters earlier).

    ``refreshed_at`` may give the file's whole-second ``refreshed_at`` its fraction back.
    """
    ahead = lead(record, renew_before)
    if api == "stable_token":
        # WeChat hands out the next stable token only in its last window before expiry:
        # call inside it (renew_before is that window), early enough to retry there.
        return record.expires_at - ahead * STABLE_LATEST
    start = record.refreshed_at if refreshed_at is None else refreshed_at
    return min(start + refresh_interval, record.expires_at - ahead)


def overdue_by(record: TokenRecord, api: str, refresh_interval: float, renew_before: float,
               now: float) -> float:
    """Seconds past the latest due time, beyond a grace of a quarter of the lead (<= 0: fine)."""
    grace = max(1.0, lead(record, renew_before) / 4)
    return now - due_at(record, api, refresh_interval, renew_before) - grace
