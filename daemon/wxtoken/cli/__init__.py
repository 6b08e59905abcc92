"""The ``wxtoken`` command. Exit codes: 0 ok, 78 (EX_CONFIG) bad config, 1 anything else.

The commands are in run.py (run, demo), show.py (token, status, check-config: files only) and
ops.py (what asks the running daemon). Reader commands (token, status) import neither the
scheduler nor the HTTP client.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wxtoken import __version__
from wxtoken.cli.ops import (
    cmd_clear_quota,
    cmd_component,
    cmd_quota,
    cmd_refresh,
    cmd_reload,
    cmd_rid,
)
from wxtoken.cli.run import EX_CONFIG, cmd_demo, cmd_run
from wxtoken.cli.show import cmd_check_config, cmd_status, cmd_token
from wxtoken.config import default_config_path
from wxtoken.errors import ConfigError, WxtokenError


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
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("token", parents=[common], help="print an app's valid token (no network)")
    p.add_argument("app", help="the app (with --component: an authorizer appid, or the "
                   "component_appid for the component token)")
    p.add_argument("--component", metavar="NAME", help="an Open Platform component's token")
    p.add_argument("--ticket", choices=["jsapi", "wx_card"], help="print a ticket instead")
    p.add_argument("--state-dir", help="read from this state dir instead of the config's")
    p.set_defaults(func=cmd_token)
    p = sub.add_parser("refresh", parents=[common],
                       help="passive refresh through the running daemon; prints the new token")
    p.add_argument("app", help="the app (with --component: an authorizer appid, or the "
                   "component_appid for the component token)")
    p.add_argument("--component", metavar="NAME", help="an Open Platform component's token")
    p.add_argument("--invalid", metavar="TOKEN",
                   help="the token WeChat refused: no upstream call if it was already replaced")
    p.add_argument("--socket", metavar="PATH", help="the daemon's control socket "
                   "(default: control_socket from the config)")
    p.set_defaults(func=cmd_refresh)
    p = sub.add_parser("reload", parents=[common],
                       help="make the running daemon re-read its config (exit 78: refused)")
    p.add_argument("--socket", metavar="PATH", help="the daemon's control socket "
                   "(default: control_socket from the config)")
    p.set_defaults(func=cmd_reload)
    help_socket = "the daemon's control socket (default: control_socket from the config)"
    p = sub.add_parser("quota", parents=[common],
                       help="WeChat's daily quota of an API path for an app (openapi/quota/get)")
    p.add_argument("app", help="the app whose token asks WeChat (the quota is its account's)")
    p.add_argument("--path", default="/cgi-bin/token", metavar="CGI_PATH",
                   help="the API path (default: /cgi-bin/token)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=cmd_quota)
    p = sub.add_parser("rid", parents=[common],
                       help="what WeChat saw of a failed call, by the rid in its errmsg")
    p.add_argument("app", help="the app whose call failed (the rid must be of its account)")
    p.add_argument("rid", help="the rid at the end of WeChat's errmsg (rid: …)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=cmd_rid)
    p = sub.add_parser("clear-quota", parents=[common],
                       help="reset an app's daily quota (clear_quota/v2; 10 a month; root or "
                            "the daemon's user)")
    p.add_argument("app", help="the app whose account's daily quota is reset")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--socket", metavar="PATH", help=help_socket)
    p.set_defaults(func=cmd_clear_quota)
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
    p.set_defaults(func=cmd_component)
    p = sub.add_parser("status", parents=[common], help="health of every app (exit 1 if unhealthy)")
    p.add_argument("--json", action="store_true", help="print the health as JSON (for monitoring)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate and print the config, secrets masked")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("demo", help="emulator + daemon on a temporary state dir, no WeChat needed")
    p.add_argument("--duration", type=float, default=45.0,
                   help="seconds to run (0 = until Ctrl-C; default 45)")
    p.set_defaults(func=cmd_demo)
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
