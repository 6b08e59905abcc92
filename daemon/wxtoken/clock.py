"""WeChat's day: quotas reset at 00:00 Asia/Shanghai (UTC+8, no daylight saving)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")


def wechat_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, SHANGHAI).date().isoformat()


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
