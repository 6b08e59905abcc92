"""The commands that read files and need no daemon: token, status and check-config."""

from __future__ import annotations

import argparse
import grp
import json
import os
import stat
import sys
import time
from typing import Any

from wxtoken import __version__
from wxtoken.cli.ops import configured, lenient
from wxtoken.clock import human_delta
from wxtoken.config import Config, load_config
from wxtoken.errors import ConfigError, TokenUnavailable
from wxtoken.health import app_health_from_files, component_health_from_files
from wxtoken.reader import read_token
from wxtoken.record import DEFAULT_STATE_DIR
from wxtoken.runinfo import running


def cmd_token(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or configured(args).state_dir
    token = read_token(args.app, state_dir, args.component)
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


def cmd_status(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, resolve_secrets=False)
    except ConfigError as exc:
        # the running daemon keeps the config it last loaded: say so, beside the refusal (not
        # when this user merely cannot read the config: that is no refusal)
        info = running(lenient(args, "state_dir", DEFAULT_STATE_DIR))
        if info is None or any(": cannot read config: " in p for p in exc.problems):
            raise
        line = (f"running {info.version} (pid {info.pid}) on the config it last loaded; "
                f"installed {__version__} refuses the config: {exc.problems[0]}; a restart "
                "would fail: fix the config first (wxtoken check-config)")
        if args.json:
            print(json.dumps({"healthy": False, "daemon": {
                "version": info.version, "pid": info.pid, "installed": __version__,
                "upgrade": line}, "config_problems": exc.problems}, indent=2,
                ensure_ascii=False))
            return 1
        for problem in exc.problems:
            print(f"wxtoken: {problem}", file=sys.stderr)
        print(line)
        return 1
    now = time.time()
    daemon = running(config.state_dir)
    upgrade = _upgrade_line(args, daemon.version) if daemon else None
    apps = [app_health_from_files(config, app, now, daemon is not None) for app in config.apps]
    components = [component_health_from_files(config, comp, now, daemon is not None)
                  for comp in config.components]
    fleet = _fleet_status(config, now, daemon is not None) if config.redis else None
    for a in apps:  # one host alone is "standalone"; on a fleet, as the daemon last said
        a["role"] = fleet["roles"].get(a["app"], "unknown") if fleet else "standalone"
    healthy = all(a["healthy"] for a in apps) and (fleet is None or not fleet["problems"]) \
        and all(c["healthy"] for c in components) and (upgrade is None or upgrade[0])
    if args.json:
        out: dict[str, Any] = {"healthy": healthy, "apps": apps, "daemon": None}
        if daemon is not None:
            out["daemon"] = {"version": daemon.version, "pid": daemon.pid,
                             "installed": __version__,
                             **({"upgrade": upgrade[1]} if upgrade else {})}
        if components:
            out["components"] = components
        if fleet is not None:
            out["fleet"] = fleet
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0 if healthy else 1
    if upgrade is not None:
        print(upgrade[1])
    for c in components:
        fresh = sum(1 for a in c["authorizers"] if a["healthy"])
        ticket = (f"last ticket {human_delta(now - c['ticket_received_at'])} ago"
                  if c["ticket_received_at"] else "no ticket yet")
        print(f"component {c['component']} ({c['component_appid']}): {ticket}; "
              f"{fresh}/{len(c['authorizers'])} authorizers fresh"
              + "".join(f"; {p}" for p in c["problems"]))
        # every app's row below, and the authorizers that are not healthy
        apps += [c["token"]] + [a for a in c["authorizers"] if not a["healthy"]]
    if fleet is not None:
        print(f"fleet: redis {'up' if fleet['redis_up'] else 'DOWN'}, last sync "
              + (f"{human_delta(now - fleet['last_sync'])} ago" if fleet["last_sync"] else "never")
              + f", clock skew {fleet['clock_skew']:+.1f} s"
              + "".join(f"; {p}" for p in fleet["problems"]))
    rows = [("APP", "API", "ROLE", "AGE", "EXPIRES IN", "LAST", "CALLS TODAY", "HEALTH")]
    for a in apps:
        rows.append((
            a["app"], a["api"], a["role"],
            human_delta(a["token_age"]) if "token_age" in a else "-",
            human_delta(a["expires_in"]) if a.get("expires_in", 0) > 0 else "-",
            a["last_result"], f"{a['calls_today']}/{a['daily_budget']}",
            "ok" if a["healthy"] else "; ".join(a["problems"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0 if healthy else 1


def _upgrade_line(args: argparse.Namespace, version: str) -> tuple[bool, str] | None:
    """When the running daemon is another version than this program (installed since): whether
    this version accepts the config (checked with the secrets as root, else without), and the
    line that says so. None when the versions agree."""
    if version == __version__:
        return None
    try:
        load_config(args.config, resolve_secrets=os.geteuid() == 0, service=True)
    except ConfigError as exc:
        return False, (f"running {version}; installed {__version__} refuses the config: "
                       f"{exc.problems[0]}; fix it, then: systemctl restart wxtoken")
    return True, (f"running {version}; installed {__version__}: restart to run it "
                  "(systemctl restart wxtoken)")


def _fleet_status(config: Config, now: float, running: bool = True) -> dict[str, Any]:
    """What the daemon last wrote about the fleet (``<state_dir>/.fleet.json``)."""
    from wxtoken.fleet.node import STATUS_FILE  # redis-py only when there is a fleet
    try:
        with open(os.path.join(config.state_dir, STATUS_FILE), "rb") as fh:
            doc = json.loads(fh.read(65536))
        assert isinstance(doc, dict)
    except (OSError, ValueError, AssertionError):
        return {"redis_up": False, "last_sync": None, "clock_skew": 0.0, "roles": {},
                "problems": ["no fleet state yet" + (
                    " (the daemon is starting)" if running else " (is the daemon running?)")]}
    problems = []
    if not doc.get("redis_up"):
        problems.append("the fleet's Redis is unreachable")
    if now - float(doc.get("written_at") or 0) > 300:
        problems.append("the fleet state is old" + (
            "" if running else " (is the daemon running?)"))
    if abs(float(doc.get("clock_skew") or 0)) > 2:
        problems.append(f"this host's clock is {doc['clock_skew']:+.1f} s off Redis TIME")
    return {**doc, "problems": problems}


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config, service=True)
    print(f"# {config.path}: OK")
    for key in ("state_dir", "refresh_interval", "renew_before", "api_base", "ca_bundle",
                "log_format", "daily_budget", "control_socket", "metrics_file"):
        value = getattr(config, key)
        print(f"{key} = {json.dumps(value)}" if value is not None else f"# {key} unset")
    if config.redis:
        r = config.redis
        print("\n[redis]\nurl = \"(set, hidden)\"")
        if r.password_source:
            print(f"password = \"***\"  # from {r.password_source}")
        print(f"key_prefix = {json.dumps(r.key_prefix)}")
        print(f"lease_timeout = {json.dumps(r.lease_timeout)}" if r.lease_timeout
              else "# lease_timeout: half of renew_before")
        if r.sentinels:
            print(f"sentinels = {json.dumps([f'{h}:{p}' for h, p in r.sentinels])}")
            print(f"service_name = {json.dumps(r.service_name)}")
        if r.mirror:
            print(f"mirror = {json.dumps(list(r.mirror))}")
    for app in config.apps:
        print(f"\n[apps.{app.name}]")
        print(f"api = {json.dumps(app.api)}")
        if app.api == "wecom":
            print(f"corpid = {json.dumps(app.appid)}\nagentid = {json.dumps(app.agentid)}")
        else:
            print(f"appid = {json.dumps(app.appid)}")
        if app.secret_source:
            print(f"secret = \"***\"  # from {app.secret_source}")
        else:
            print("# no secret: this host follows the app (fleet mode)")
        if app.tickets:
            print(f"tickets = {json.dumps(list(app.tickets))}")
        print(f"file_mode = \"{app.file_mode:04o}\"")
        if app.file_group:
            print(f"file_group = {json.dumps(app.file_group)}")
        if app.quota_watch:
            print(f"quota_watch = {json.dumps(list(app.quota_watch))}")
    if config.callback_listen is not None:
        host, port = config.callback_listen
        if port == 0:  # "unix:/path", mode 0660: its group is its directory's when setgid
            directory = os.path.dirname(host[len("unix:"):]) or "/"
            try:
                st = os.stat(directory)
                gid = st.st_gid if st.st_mode & stat.S_ISGID else None
            except OSError:
                gid = None
            try:
                group = f"group {grp.getgrgid(gid).gr_name}" if gid is not None else ""
            except KeyError:
                group = f"gid {gid}"
            print(f"\ncallback_listen = {json.dumps(host)}\n# the socket: mode 0660, "
                  + (f"{group} ({directory} is setgid)" if group else "the daemon's group ("
                     f"{directory} is not setgid: the README says how nginx's group alone can "
                     "open it)"))
        else:
            print(f"\ncallback_listen = \"{f'[{host}]' if ':' in host else host}:{port}\"")
    for comp in config.components:
        print(f"\n[components.{comp.name}]")
        print(f"component_appid = {json.dumps(comp.component_appid)}")
        if comp.secret_source:
            print(f"secret = \"***\"  # from {comp.secret_source}")
        else:
            print("# no secret: this host follows the platform (fleet mode)")
        print("msg_token = \"***\"\nencoding_aes_key = \"***\"")
        if comp.tickets:
            print(f"tickets = {json.dumps(list(comp.tickets))}")
    for warning in config.warnings:
        print(f"wxtoken: warning: {warning}", file=sys.stderr)
    return 0
