"""The ``wxtoken`` command. Exit codes: 0 ok, 78 (EX_CONFIG) bad config, 1 anything else.

Reader commands (token, status) import neither the scheduler nor the HTTP client.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import stat
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from wxtoken import __version__
from wxtoken.clock import SHANGHAI, human_delta
from wxtoken.config import UTF8_BOM, Config, default_config_path, load_config
from wxtoken.errors import ConfigError, ControlError, StoreError, TokenUnavailable, WxtokenError
from wxtoken.health import app_health_from_files, component_health_from_files
from wxtoken.reader import read_token
from wxtoken.record import APP_NAME_RE, DEFAULT_SOCKET, DEFAULT_STATE_DIR
from wxtoken.runinfo import running

EX_CONFIG = 78


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from wxtoken import logs  # the daemon's modules load only when the daemon runs
    logs.configure(config.log_format)
    logs.register_secrets(app.secret for app in config.apps)
    log = logs.get_logger()
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)
    _check_state_dir(config, args.allow_other_owner)
    _check_file_groups(config)
    from wxtoken.serve import run  # the scheduler and the HTTP client: only for `run`
    return run(config)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_state_dir(config: Config, allow_other_owner: bool) -> None:
    """The state dir exists (created if need be), is a directory, is writable, and belongs to
    this user: the daemon owns it. A run as another user (root by hand, say) would leave files
    the service cannot read."""
    state_dir = config.state_dir
    try:
        created = not os.path.lexists(state_dir)
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        if created:  # makedirs' mode is masked by the umask (077 by hand or in a container)
            os.chmod(state_dir, 0o750)  # noqa: S103 - the readers' group traverses it
        st = os.stat(state_dir)
    except FileExistsError:
        raise ConfigError([f"{config.path}: state_dir: {state_dir} is not a directory"]) from None
    except OSError as exc:
        raise StoreError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError([f"{config.path}: state_dir: {state_dir} is not a directory"])
    if st.st_uid != os.geteuid() and not allow_other_owner:
        raise ConfigError([f"{config.path}: state_dir: {state_dir} belongs to user "
                           f"{_user(st.st_uid)}, not {_user(os.geteuid())}: run wxtoken as that "
                           "user (systemctl start wxtoken), or pass --allow-other-owner"])
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(f"state_dir {state_dir} is not writable by this user")


def _check_file_groups(config: Config) -> None:
    """Every file_group is one this process can give files to, tried for real on a scratch
    file: under the shipped unit (PrivateUsers=yes) no group but the daemon's is mapped, and a
    daemon that cannot chown would fail every write."""
    problems = []
    tried: dict[str, str | None] = {}
    for app in config.apps:
        if app.file_group is None:
            continue
        if app.file_group not in tried:
            tried[app.file_group] = _chown_problem(config.state_dir, app.file_group)
        if (problem := tried[app.file_group]) is not None:
            problems.append(f"{config.path}: apps.{app.name}.file_group: {problem}")
    if problems:
        raise ConfigError(problems)


def _chown_problem(state_dir: str, group: str) -> str | None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"group {group!r} does not exist"
    with tempfile.TemporaryFile(dir=state_dir) as probe:
        try:
            os.fchown(probe.fileno(), -1, gid)
        except OSError as exc:
            return (f"the daemon cannot give files to group {group!r} ({exc.strerror}): the "
                    "daemon's user is not in that group, or the service runs with "
                    "PrivateUsers=yes, which maps no other group; leave file_group unset and "
                    "add the readers to the daemon's group")
    return None


def _cmd_token(args: argparse.Namespace) -> int:
    if args.state_dir:
        state_dir = args.state_dir
    else:
        config = load_config(args.config, resolve_secrets=False)
        if args.component:
            config.component(args.component)
        else:
            config.app(args.app)  # a clear error for an app that is not configured
        state_dir = config.state_dir
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


def _cmd_refresh(args: argparse.Namespace) -> int:
    # http.client only for the commands that talk to the daemon (`wxtoken token` stays light)
    from wxtoken.control_client import refresh
    if args.socket:
        control_socket = args.socket
    else:
        config = load_config(args.config, resolve_secrets=False)
        if args.component:
            config.component(args.component)
        else:
            config.app(args.app)
        control_socket = config.control_socket
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
    return _lenient(args, "control_socket", DEFAULT_SOCKET)


def _lenient(args: argparse.Namespace, key: str, default: str) -> str:
    """A top-level path from a config that may not pass (a reload or a restart would refuse
    it), else the default."""

    try:
        with open(args.config or default_config_path(), "rb") as fh:
            value = tomllib.loads(fh.read().removeprefix(UTF8_BOM).decode()).get(key)
    except (OSError, ValueError):
        value = None
    return value if isinstance(value, str) and value else default


def _cmd_reload(args: argparse.Namespace) -> int:
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


def _cmd_quota(args: argparse.Namespace) -> int:
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


def _cmd_rid(args: argparse.Namespace) -> int:
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


def _cmd_clear_quota(args: argparse.Namespace) -> int:
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


def _cmd_component(args: argparse.Namespace) -> int:
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


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, resolve_secrets=False)
    except ConfigError as exc:
        # the running daemon keeps the config it last loaded: say so, beside the refusal (not
        # when this user merely cannot read the config: that is no refusal)
        info = running(_lenient(args, "state_dir", DEFAULT_STATE_DIR))
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


def _cmd_check_config(args: argparse.Namespace) -> int:
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from wxtoken.demo import run_demo  # the emulator and the daemon: only for the demo
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
    p.add_argument("--allow-other-owner", action="store_true",
                   help="run although the state dir belongs to another user (its files will "
                        "then belong to this one)")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("token", parents=[common], help="print an app's valid token (no network)")
    p.add_argument("app", help="the app (with --component: an authorizer appid, or the "
                   "component_appid for the component token)")
    p.add_argument("--component", metavar="NAME", help="an Open Platform component's token")
    p.add_argument("--ticket", choices=["jsapi", "wx_card"], help="print a ticket instead")
    p.add_argument("--state-dir", help="read from this state dir instead of the config's")
    p.set_defaults(func=_cmd_token)
    p = sub.add_parser("refresh", parents=[common],
                       help="passive refresh through the running daemon; prints the new token")
    p.add_argument("app", help="the app (with --component: an authorizer appid, or the "
                   "component_appid for the component token)")
    p.add_argument("--component", metavar="NAME", help="an Open Platform component's token")
    p.add_argument("--invalid", metavar="TOKEN",
                   help="the token WeChat refused: no upstream call if it was already replaced")
    p.add_argument("--socket", metavar="PATH", help="the daemon's control socket "
                   "(default: control_socket from the config)")
    p.set_defaults(func=_cmd_refresh)
    p = sub.add_parser("reload", parents=[common],
                       help="make the running daemon re-read its config (exit 78: refused)")
    p.add_argument("--socket", metavar="PATH", help="the daemon's control socket "
                   "(default: control_socket from the config)")
    p.set_defaults(func=_cmd_reload)
    help_socket = "the daemon's control socket (default: control_socket from the config)"
    p = sub.add_parser("quota", parents=[common],
                       help="WeChat's daily quota of an API path for an app (openapi/quota/get)")
    p.add_argument("app", help="the app whose token asks WeChat (the quota is its account's)")
    p.add_argument("--path", default="/cgi-bin/token", metavar="CGI_PATH",
                   help="the API path (default: /cgi-bin/token)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=_cmd_quota)
    p = sub.add_parser("rid", parents=[common],
                       help="what WeChat saw of a failed call, by the rid in its errmsg")
    p.add_argument("app", help="the app whose call failed (the rid must be of its account)")
    p.add_argument("rid", help="the rid at the end of WeChat's errmsg (rid: …)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=_cmd_rid)
    p = sub.add_parser("clear-quota", parents=[common],
                       help="reset an app's daily quota (clear_quota/v2; 10 a month; root or "
                            "the daemon's user)")
    p.add_argument("app", help="the app whose account's daily quota is reset")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=_cmd_clear_quota)
    p = sub.add_parser("component", parents=[common],
                       help="Open Platform: hand over a component_verify_ticket, or import "
                            "authorizers' refresh tokens (root or the daemon's user)")
    p.add_argument("action", choices=["ticket", "import"],
                   help="ticket: hand over a component_verify_ticket; import: seed authorizers' "
                   "refresh tokens")
    p.add_argument("name", help="the component ([components.NAME])")
    p.add_argument("value", help="ticket: the ticket (- reads it from stdin); import: a file of "
                   "JSON lines (- for stdin)")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=_cmd_component)
    p = sub.add_parser("status", parents=[common], help="health of every app (exit 1 if unhealthy)")
    p.add_argument("--json", action="store_true", help="print the health as JSON (for monitoring)")
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
