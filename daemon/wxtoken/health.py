"""One app's health from its files, as `wxtoken status` and the control endpoint report it.

It reads only the files, so no daemon needs to be running.
"""

from __future__ import annotations

from typing import Any

from wxtoken.clock import human_delta, wechat_day
from wxtoken.config import AppConfig, Config
from wxtoken.errors import TokenCorrupt
from wxtoken.record import parse_record, token_path
from wxtoken.schedule import overdue_by
from wxtoken.store import read_status, status_path


def app_health(config: Config, app: AppConfig, now: float) -> dict[str, Any]:
    """One app's health as `wxtoken status` reports it (from the files, no daemon needed)."""
    name = app.name
    info: dict[str, Any] = {"app": name, "api": app.api, "appid": app.appid,
                            "daily_budget": config.daily_budget}
    problems: list[str] = []
    path = token_path(config.state_dir, name)
    try:
        with open(path, "rb") as fh:
            record = parse_record(fh.read(), name)
        info.update(refreshed_at=record.refreshed_at, expires_at=record.expires_at,
                    token_age=int(now - record.refreshed_at),
                    expires_in=int(record.expires_at - now))
        if record.expires_at <= now:
            problems.append("token expired")
        elif (late := overdue_by(record, app.api, config.refresh_interval, config.renew_before,
                                 now)) > 0:
            problems.append(f"stale: refresh overdue by {human_delta(late)} "
                            "(is the daemon running?)")
    except FileNotFoundError:
        problems.append("no token file yet")
    except (OSError, TokenCorrupt) as exc:
        problems.append(f"token file unusable: {getattr(exc, 'reason', None) or exc}")
    status = read_status(status_path(config.state_dir, name))
    calls = status.calls_today if status.calls_day == wechat_day(now) else 0
    info.update(last_result=status.last_result, calls_today=calls,
                last_attempt_at=status.last_attempt_at or None,
                last_success_at=status.last_success_at or None)
    if status.retry_at > now:
        info["next_attempt_in"] = int(status.retry_at - now)
    if status.last_result == "error":
        info["last_error"] = {"class": status.error_class, "errcode": status.errcode,
                              "errmsg": status.errmsg, "message": status.error}
        problems.append(f"last refresh failed: {status.error}")
    if status.last_result == "budget" or calls >= config.daily_budget:
        problems.append(f"daily budget of {config.daily_budget} calls reached")
    info["healthy"] = not problems
    info["problems"] = problems
    return info
