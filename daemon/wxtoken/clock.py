"""WeChat's day: quotas reset at 00:00 Asia/Shanghai (UTC+8, no daylight saving); quota resets
are counted per month there."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")


def wechat_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, SHANGHAI).date().isoformat()


def wechat_month(ts: float) -> str:
    """The month WeChat counts quota resets in, e.g. "2026-11"."""
    return datetime.fromtimestamp(ts, SHANGHAI).strftime("%Y-%m")


def next_wechat_month(ts: float) -> float:
    """The start of the next month in Asia/Shanghai."""
    now = datetime.fromtimestamp(ts, SHANGHAI)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=SHANGHAI).timestamp()


def next_wechat_midnight(ts: float) -> float:
    day = datetime.fromtimestamp(ts, SHANGHAI).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=SHANGHAI).timestamp()


def human_delta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
