"""One app's health, rendered in one place for `wxtoken status`, the control endpoint, the
daemon's STATUS= line and the metrics file.

:func:`app_health` is a pure function of a record and a status; `wxtoken status` feeds it from
the files (:func:`app_health_from_files`, no daemon needed), the daemon from what its refreshers
last saw (no file reads, which matters at 10,000 apps).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from wxtoken.clock import human_delta, wechat_day
from wxtoken.config import Api, AppConfig, ComponentConfig, Config
from wxtoken.errors import TokenMissing, TokenUnavailable
from wxtoken.record import TokenRecord, load_record, token_path
from wxtoken.schedule import model_of, overdue_by
from wxtoken.status import FLEET_ROLES, AppStatus, LastResult, Role, read_status, status_path

if TYPE_CHECKING:
    from wxtoken.component.platform import Platform
    from wxtoken.fleet.node import FleetNode
    from wxtoken.refresher import Refresher


def app_health(config: Config, app: AppConfig, record: TokenRecord | None, status: AppStatus,
               now: float, unusable: str | None = None, problem: str | None = None,
               role: Role | None = None, running: bool = True) -> dict[str, Any]:
    """One app's health as `wxtoken status --json` reports it. ``unusable`` says why there is
    no record when the file is there but cannot be used; ``problem`` is one the daemon knows of
    (the state dir cannot be written, say); ``running`` whether a daemon runs on the state dir
    (a stale token then has another cause than a stopped daemon)."""
    info: dict[str, Any] = {"app": app.name, "api": app.api, "appid": app.appid,
                            "daily_budget": config.daily_budget}
    if role is not None:
        info["role"] = role
    problems: list[str] = []
    if record is not None:
        info.update(refreshed_at=record.refreshed_at, expires_at=record.expires_at,
                    token_age=max(0, int(now - record.refreshed_at)),
                    expires_in=int(record.expires_at - now))
        if record.expires_at <= now:
            problems.append("token expired")
        elif (late := overdue_by(record, model_of(app.api), config.refresh_interval,
                                 config.renew_before, now)) > 0:
            problems.append(f"stale: refresh overdue by {human_delta(late)}" + (
                "" if running else " (is the daemon running?)"))
    elif unusable:
        problems.append(f"token file unusable: {unusable}")
    else:
        problems.append("no token file yet")
    calls = status.calls_today if status.calls_day == wechat_day(now) else 0
    info.update(last_result=status.last_result, calls_today=calls,
                last_attempt_at=status.last_attempt_at or None,
                last_success_at=status.last_success_at or None)
    if status.retry_at > now:
        info["next_attempt_in"] = int(status.retry_at - now)
    if status.last_result is LastResult.ERROR:
        info["last_error"] = {"class": status.error_class, "errcode": status.errcode,
                              "errmsg": status.errmsg, "rid": status.rid,
                              "message": status.error}
        problems.append(f"last refresh failed: {status.error}")
    # from the day's count and the current config (a raised daily_budget ends it), as the
    # refresher decides it: the next refresh would not fit
    if calls + 1 + len(app.tickets) > config.daily_budget:
        problems.append(f"daily budget of {config.daily_budget} calls reached")
    if status.partitioned_at:
        info["partitioned"] = True
        problems.append("partitioned: Redis is unreachable and WeChat refuses this host's token "
                        "(another host holds a newer one); no fetch here, which would retire "
                        "it; readers on this host get the refused token until Redis is back")
    if problem:
        problems.append(problem)
    info["healthy"] = not problems
    info["problems"] = problems
    return info


def app_health_from_files(config: Config, app: AppConfig, now: float,
                          running: bool = True) -> dict[str, Any]:
    """One app's health from its files (what `wxtoken status` shows)."""
    record: TokenRecord | None = None
    unusable: str | None = None
    try:
        record = load_record(token_path(config.state_dir, app.name), app.name)[0]
    except TokenMissing:
        pass
    except TokenUnavailable as exc:
        unusable = exc.reason
    status = read_status(status_path(config.state_dir, app.name))
    return app_health(config, app, record, status, now, unusable, running=running)


def summary(healths: Iterable[Mapping[str, Any]], next_runs: Mapping[str, float],
            now: float) -> str:
    """One line for systemd's STATUS=, e.g. "2/2 apps fresh; next: main in 59m"."""
    healths = list(healths)
    failing = sorted(h["app"] for h in healths if not h["healthy"])
    text = f"{len(healths) - len(failing)}/{len(healths)} apps fresh"
    fleet = [h for h in healths if h.get("role") in FLEET_ROLES]
    if fleet:
        leading = sum(1 for h in fleet if h.get("role") == Role.LEADER)
        text += f"; leader for {leading}/{len(fleet)} apps"
    if failing:
        text += f"; failing: {', '.join(failing[:3])}" + ("…" if len(failing) > 3 else "")
    if next_runs:
        name, at = min(next_runs.items(), key=lambda kv: kv[1])
        text += f"; next: {name} in {human_delta(at - now)}"
    return text


def component_health_from_files(config: Config, comp: ComponentConfig,
                                now: float, running: bool = True) -> dict[str, Any]:
    """An Open Platform component's health from its files: its token, the last ticket, every
    authorizer's token, and the authorizers that need a new authorization."""
    # filelock only for a component (`wxtoken status` of plain apps stays light)
    from wxtoken.component.store import PLATFORM_FILE, component_dir
    from wxtoken.component.ticket_file import ticket_problem  # as above: status stays light
    directory = component_dir(config.state_dir, comp.name)

    def one(appid: str, role: Role) -> dict[str, Any]:
        app = AppConfig(name=appid, api=Api.TOKEN, appid=appid, secret="",
                        secret_source=comp.name)
        record: TokenRecord | None = None
        unusable: str | None = None
        try:
            record = load_record(token_path(directory, appid), appid)[0]
        except TokenMissing:
            pass
        except TokenUnavailable as exc:
            unusable = exc.reason
        info = app_health(config, app, record, read_status(status_path(directory, appid)),
                          now, unusable, role=role, running=running)
        info.update(app=f"{comp.name}/{appid}", component=comp.name)
        return info

    try:
        with open(os.path.join(directory, PLATFORM_FILE), "rb") as fh:
            platform = json.loads(fh.read(1 << 20))
        assert isinstance(platform, dict)
    except (OSError, ValueError, AssertionError):
        platform = {}
    token = one(comp.component_appid, Role.COMPONENT)
    problems = []
    # the newest ticket's first receipt (its age), and the last push (the same one again, or
    # a new one): WeChat pushes every 10 minutes, often the same ticket
    ticket_at = platform.get("ticket_received_at")
    ticket_at = ticket_at if isinstance(ticket_at, (int, float)) else None
    pushed_at = platform.get("ticket_pushed_at")
    pushed_at = max(pushed_at, ticket_at or 0) if isinstance(pushed_at, (int, float)) \
        else ticket_at
    if (ticket := ticket_problem(ticket_at, pushed_at, now)) is not None:
        problems.append(ticket)
    try:
        names = sorted(n[:-5] for n in os.listdir(directory)
                       if n.endswith(".json") and not n.endswith(".status.json")
                       and not n.startswith(".") and n[:-5] != comp.component_appid)
    except OSError:
        names = []
    authorizers = [one(appid, Role.AUTHORIZER) for appid in names]
    if token.get("expires_at", 0) <= now:  # no component token: what their refreshes wait for
        for info in authorizers:
            if info.get("expires_at", 0) <= now:
                info["problems"].append(f"waiting for the component token "
                                        f"({comp.name}/{comp.component_appid})")
                info["healthy"] = False
    raw_needs = platform.get("needs_reauth")
    needs: dict[str, str] = raw_needs if isinstance(raw_needs, dict) else {}
    for appid, reason in sorted(needs.items()):
        problems.append(f"{appid} needs a new authorization: {reason}")
    if not token["healthy"]:
        problems.append("component token: " + "; ".join(token["problems"]))
    failing = [a["app"] for a in authorizers if not a["healthy"]]
    if failing:
        problems.append(f"{len(failing)} authorizer(s) unhealthy: {', '.join(failing[:5])}"
                        + ("…" if len(failing) > 5 else ""))
    return {"component": comp.name, "component_appid": comp.component_appid,
            "ticket_received_at": ticket_at, "ticket_pushed_at": pushed_at,
            "last_reconcile": platform.get("last_reconcile"),
            "needs_reauthorization": needs, "token": token, "authorizers": authorizers,
            "healthy": not problems, "problems": problems}


def daemon_health(config: Config, refreshers: Mapping[str, Refresher], node: FleetNode | None,
                  platforms: Mapping[str, Platform], now: float) -> list[dict[str, Any]]:
    """Every token's health in a running daemon, from what its refresher last saw (no file
    reads; an app or a component this host follows from its file). ``now``: the daemon's
    clock (the fleet's, in the fleet mode)."""
    out = []
    for app in config.apps:
        role = node.role(app.name) if node else None
        refresher = refreshers.get(app.name)
        if refresher is None:
            assert node is not None
            out.append(app_health(config, app, node.record(app.name), AppStatus(), time.time(),
                                  role=role))
        else:
            out.append(app_health(config, app, refresher.record, refresher.status, now,
                                  problem=refresher.problem, role=role))
    for name, platform in platforms.items():
        ticket_problem = platform.ticket_problem(time.time())
        for key in sorted(platform.keys):
            refresher = refreshers.get(key)
            component = key == platform.component_key
            if refresher is None:
                if platform.following:  # a mirror: its health from its file
                    appid = key.partition("/")[2]
                    info = app_health(config, platform.app(appid), platform.record(appid),
                                      AppStatus(), time.time(), role=Role.FOLLOWER)
                    info.update(app=key, component=name)
                    out.append(info)
                continue
            info = app_health(config, refresher.app, refresher.record, refresher.status, now,
                              problem=refresher.problem,
                              role=Role.COMPONENT if component else Role.AUTHORIZER)
            info.update(app=key, component=name)
            if component and ticket_problem:
                info["problems"].append(ticket_problem)
                info["healthy"] = False
            out.append(info)
    return out
