"""The commands that ask the running daemon over its control socket: refresh, reload,
quota, rid, clear-quota and component."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from datetime import datetime
from typing import Any
from urllib.parse import quote

from wxtoken.cli.run import EX_CONFIG
from wxtoken.clock import SHANGHAI
from wxtoken.config import UTF8_BOM, Config, default_config_path, load_config
from wxtoken.errors import ControlError, WxtokenError
from wxtoken.record import APP_NAME_RE, DEFAULT_SOCKET


def configured(args: argparse.Namespace) -> Config:
    """The config (secrets not read), checked to name ``args.app`` (or ``--component``): a
    clear error for one that is not configured."""
    config = load_config(args.config, resolve_secrets=False)
    if args.component:
        config.component(args.component)
    else:
        config.app(args.app)
    return config


def cmd_refresh(args: argparse.Namespace) -> int:
    # http.client only for the commands that talk to the daemon (`wxtoken token` stays light)
    from wxtoken.control_client import refresh
    control_socket = args.socket or configured(args).control_socket
    try:
        answer = refresh(args.app, args.invalid, control_socket, component=args.component)
    except ControlError as exc:
        # WeChat's own errmsg says more than our hint (40164 names the IP to whitelist)
        errmsg = exc.answer.get("errmsg")
        if isinstance(errmsg, str) and errmsg and errmsg not in str(exc):
            raise ControlError(f"{exc} (WeChat: {errmsg})") from None
        raise
    print(answer["access_token"])
    return 0


def _socket_of(args: argparse.Namespace) -> str:
    """The control socket: --socket, else the config's control_socket, read leniently (the
    config may be the broken one a reload is about to refuse), else the default."""
    if args.socket:
        return str(args.socket)
    return lenient(args, "control_socket", DEFAULT_SOCKET)


def lenient(args: argparse.Namespace, key: str, default: str) -> str:
    """A top-level path from a config that may not pass (a reload or a restart would refuse
    it), else the default."""

    try:
        with open(args.config or default_config_path(), "rb") as fh:
            value = tomllib.loads(fh.read().removeprefix(UTF8_BOM).decode()).get(key)
    except (OSError, ValueError):
        value = None
    return value if isinstance(value, str) and value else default


def cmd_reload(args: argparse.Namespace) -> int:
    # http.client only for the commands that talk to the daemon (`wxtoken token` stays light)
    from wxtoken.control_client import request
    try:
        answer = request("POST", "/v1/reload", {}, _socket_of(args), timeout=120)
    except ControlError as exc:
        if exc.error_class != "refused":
            raise
        problems = exc.answer.get("problems")
        for line in problems if isinstance(problems, list) else [str(exc)]:
            print(f"wxtoken: {line}", file=sys.stderr)
        print("wxtoken: reload refused; the running config stays", file=sys.stderr)
        return EX_CONFIG
    print("reloaded: " + "; ".join(answer.get("changes", [])))
    return 0


def _op_request(method: str, path: str, args: argparse.Namespace,
                timeout: float = 60.0) -> dict[str, Any]:
    """A quota tool's request to the daemon; its refusal as one line (with WeChat's errcode,
    errmsg and rid when WeChat refused)."""
    # http.client only for the commands that talk to the daemon (`wxtoken token` stays light)
    from wxtoken.control_client import request
    if not APP_NAME_RE.match(args.app):
        raise WxtokenError(f"{args.app!r} is not a valid app name")
    try:
        return request(method, path, {} if method == "POST" else None, _socket_of(args),
                       timeout=timeout)
    except ControlError as exc:
        errmsg = str(exc.answer.get("errmsg") or "")
        extra = [f"errmsg: {errmsg}"] if errmsg else []
        rid = exc.answer.get("rid")
        if rid and str(rid) not in errmsg:  # WeChat's errmsg usually ends with it already
            extra.append(f"rid: {rid}")
        if exc.retry_after:
            extra.append(f"retry in {exc.retry_after:.0f} s")
        raise WxtokenError(f"{args.command}: {args.app}: {exc}"
                           + (f" ({'; '.join(extra)})" if extra else "")) from None


def cmd_quota(args: argparse.Namespace) -> int:
    answer = _op_request("GET", f"/v1/apps/{args.app}/quota?path={quote(args.path, safe='/')}",
                         args)
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0
    resets = answer.get("resets") or {}
    print(f"{answer['app']} ({answer['appid']}) {answer['path']}: "
          f"{answer['used']:,} of {answer['daily_limit']:,} used today, "
          f"{answer['remain']:,} left (WeChat's day ends 00:00 Asia/Shanghai)")
    if resets:
        print(f"quota resets in {resets['month']}: {resets['used']} of {resets['limit']} used "
              "(as counted by wxtoken)")
    return 0


def cmd_rid(args: argparse.Namespace) -> int:
    answer = _op_request("GET", f"/v1/apps/{args.app}/rid/{quote(args.rid, safe='')}", args)
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0
    asked = answer.get("request") or {}
    for key, value in asked.items():
        if key == "invoke_time" and isinstance(value, int):
            value = f"{datetime.fromtimestamp(value, SHANGHAI):%Y-%m-%d %H:%M:%S} Asia/Shanghai"
        print(f"{key:<14}{value if value not in ('', None) else '(none)'}")
    return 0


def cmd_clear_quota(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise WxtokenError("clear-quota: not confirmed: run it in a terminal, or pass --yes")
        print(f"Reset WeChat's daily API quota of {args.app}? It spends one of the account's "
              "10 resets this month (WeChat counts those of clear_quota and clear_quota/v2 "
              "together).", file=sys.stderr)
        try:
            reply = input("Type yes to go on: ")
        except EOFError:
            reply = ""
        if reply.strip().lower() != "yes":
            print("wxtoken: clear-quota: not confirmed; nothing was done", file=sys.stderr)
            return 1
    try:
        answer = _op_request("POST", f"/v1/apps/{args.app}/clear-quota", args, timeout=90)
    except WxtokenError as exc:
        if "control request failed" in str(exc) or "no answer from the wxtoken daemon" in \
                str(exc):
            raise WxtokenError(f"{exc}: the reset may have been made; see `wxtoken quota "
                               f"{args.app}` (resets used) before trying again") from None
        raise
    print(f"cleared: the daily quota of {answer['app']} ({answer['appid']}) is reset; "
          f"{answer['resets_used']} of 10 resets used in {answer['month']}, "
          f"{answer['resets_left']} left")
    return 0


def cmd_component(args: argparse.Namespace) -> int:
    """wxtoken component ticket NAME TICKET|- / wxtoken component import NAME FILE|-"""
    # http.client only for the commands that talk to the daemon (`wxtoken token` stays light)
    from wxtoken.control_client import request, request_raw
    if not APP_NAME_RE.match(args.name):
        raise WxtokenError(f"{args.name!r} is not a valid component name")
    if args.action == "ticket":
        ticket = sys.stdin.readline().strip() if args.value == "-" else args.value.strip()
        answer = request("POST", f"/v1/components/{args.name}/ticket", {"ticket": ticket},
                         _socket_of(args))
        print("ticket stored" + ("" if answer.get("new") else " (it was the one kept)"))
        return 0
    if args.value == "-":
        raw = sys.stdin.buffer.read()
    else:
        try:
            with open(args.value, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise WxtokenError(f"component import: cannot read {args.value}: "
                               f"{exc.strerror}") from None
    answer = request_raw("POST", f"/v1/components/{args.name}/import", raw, _socket_of(args),
                         timeout=300)
    print(f"imported {answer['imported']} authorizers ({answer['with_token']} with a valid "
          "token: no call until it is due)")
    return 0
