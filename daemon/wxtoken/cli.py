"""The ``wxtoken`` command. Exit codes: 0 ok, 78 (EX_CONFIG) bad config, 1 anything else.

Reader commands (token, status) import neither the scheduler nor the HTTP client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from wxtoken import __version__
from wxtoken.clock import human_delta, wechat_day
from wxtoken.config import Config, default_config_path, load_config
from wxtoken.errors import ConfigError, StoreError, TokenCorrupt, TokenUnavailable, WxtokenError
from wxtoken.reader import read_token
from wxtoken.record import parse_record, token_path
from wxtoken.schedule import overdue_by

EX_CONFIG = 78


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from wxtoken import logs  # the daemon's modules load only when the daemon runs
    logs.configure(config.log_format)
    logs.register_secrets(app.secret for app in config.apps)
    log = logs.get_logger()
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)
    _ensure_state_dir(config.state_dir)
    from wxtoken.daemon import run
    return run(config)


def _ensure_state_dir(state_dir: str) -> None:
    try:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(f"state_dir {state_dir} is not writable by this user")


def _cmd_token(args: argparse.Namespace) -> int:
    if args.state_dir:
        state_dir = args.state_dir
    else:
        config = load_config(args.config, resolve_secrets=False)
        config.app(args.app)  # a clear error for an app that is not configured
        state_dir = config.state_dir
    token = read_token(args.app, state_dir)
    if args.ticket:
        tickets = token.record.tickets
        if args.ticket not in tickets:
            raise TokenUnavailable(args.app, f"no {args.ticket} ticket in the token file")
        ticket, expires_at = tickets[args.ticket]
        if expires_at <= time.time():
            raise TokenUnavailable(args.app, f"the {args.ticket} ticket has expired")
        print(ticket)
    else:
        print(token)
    return 0


def app_health(config: Config, name: str, now: float) -> dict[str, Any]:
    """One app's health as `wxtoken status` reports it (from the files, no daemon needed)."""
    from wxtoken.store import AppStatus  # stdlib + filelock only

    app = config.app(name)
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
    status = AppStatus()
    status_path = os.path.join(config.state_dir, f"{name}.status.json")
    try:
        with open(status_path, "rb") as fh:
            status = AppStatus.from_json(fh.read())
    except (OSError, ValueError, TypeError):
        pass
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


def _cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config, resolve_secrets=False)
    now = time.time()
    apps = [app_health(config, app.name, now) for app in config.apps]
    healthy = all(a["healthy"] for a in apps)
    if args.json:
        print(json.dumps({"healthy": healthy, "apps": apps}, indent=2, ensure_ascii=False))
        return 0 if healthy else 1
    rows = [("APP", "API", "AGE", "EXPIRES IN", "LAST", "CALLS TODAY", "HEALTH")]
    for a in apps:
        rows.append((
            a["app"], a["api"],
            human_delta(a["token_age"]) if "token_age" in a else "-",
            human_delta(a["expires_in"]) if a.get("expires_in", 0) > 0 else "-",
            a["last_result"], f"{a['calls_today']}/{a['daily_budget']}",
            "ok" if a["healthy"] else "; ".join(a["problems"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0 if healthy else 1


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"# {config.path}: OK")
    for key in ("state_dir", "refresh_interval", "renew_before", "api_base", "ca_bundle",
                "log_format", "daily_budget", "control_socket", "metrics_file"):
        value = getattr(config, key)
        print(f"{key} = {json.dumps(value)}" if value is not None else f"# {key} unset")
    if config.redis:
        print("[redis]\nurl = \"(set, hidden)\"")
        print(f"key_prefix = {json.dumps(config.redis.key_prefix)}")
    for app in config.apps:
        print(f"\n[apps.{app.name}]")
        print(f"api = {json.dumps(app.api)}")
        if app.api == "wecom":
            print(f"corpid = {json.dumps(app.appid)}\nagentid = {json.dumps(app.agentid)}")
        else:
            print(f"appid = {json.dumps(app.appid)}")
        print(f"secret = \"***\"  # from {app.secret_source}")
        print(f"file_mode = \"{app.file_mode:04o}\"")
        if app.file_group:
            print(f"file_group = {json.dumps(app.file_group)}")
    for warning in config.warnings:
        print(f"wxtoken: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from wxtoken.demo import run_demo
    return run_demo(args.duration)


def build_parser() -> argparse.ArgumentParser:
    help_config = f"config file (default: $WXTOKEN_CONFIG or {default_config_path()})"
    # SUPPRESS on the subcommands, so `wxtoken --config X run` is not reset by run's default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help=help_config)
    parser = argparse.ArgumentParser(prog="wxtoken",
                                     description="WeChat access_token central control server")
    parser.add_argument("--config", default=None, metavar="PATH", help=help_config)
    parser.add_argument("--version", action="version", version=f"wxtoken {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("token", parents=[common], help="print an app's valid token (no network)")
    p.add_argument("app")
    p.add_argument("--ticket", choices=["jsapi", "wx_card"], help="print a ticket instead")
    p.add_argument("--state-dir", help="read from this state dir instead of the config's")
    p.set_defaults(func=_cmd_token)
    p = sub.add_parser("status", parents=[common], help="health of every app (exit 1 if unhealthy)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate and print the config, secrets masked")
    p.set_defaults(func=_cmd_check_config)
    p = sub.add_parser("demo", help="emulator + daemon on a temporary state dir, no WeChat needed")
    p.add_argument("--duration", type=float, default=45.0,
                   help="seconds to run (0 = until Ctrl-C; default 45)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"wxtoken: {problem}", file=sys.stderr)
        return EX_CONFIG
    except WxtokenError as exc:
        message = str(exc)
        print(message if message.startswith("wxtoken:") else f"wxtoken: {message}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
