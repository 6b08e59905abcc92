"""``wxtoken demo``: the emulator and the daemon on a temporary state dir, lifetimes scaled down.

Tokens live 30 s instead of 7200 s, so a minute shows several refreshes, the stable_token window,
and a business program (``read_token``) whose calls WeChat accepts. Nine seconds in, WeChat drops
the main token (as when another process fetches its own): the program sees 42001, reports it with
``report_invalid`` and carries on with the token the daemon fetched for it.

A small Open Platform runs beside them: the emulator pushes encrypted component_verify_tickets to
the daemon's callback endpoint every 5 s, three merchants authorize the platform, and the
program reads each authorizer's token with ``read_token(appid, component="platform")``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any

import requests

from wxtoken import logs
from wxtoken.config import load_config
from wxtoken.daemon import Daemon
from wxtoken.emulator import Emulator
from wxtoken.errcodes import business_token_invalid
from wxtoken.errors import TokenUnavailable, WxtokenError
from wxtoken.reader import read_token, report_invalid

DEMO_APPS = {"wx000000000000de01": "demo-secret-main-0001",
             "wx000000000000de02": "demo-secret-mini-0002"}

DEMO_CONFIG = """\
# written by `wxtoken demo`: two apps against the built-in emulator
state_dir = "{state_dir}"
api_base = "{api_base}"
refresh_interval = 12     # seconds (production default: 3600)
renew_before = 8          # seconds (production default: 300)
log_format = "console"
control_socket = "{control_socket}"
callback_listen = "127.0.0.1:{callback_port}"

[apps.main]
appid = "wx000000000000de01"
secret_env = "WXTOKEN_DEMO_SECRET_MAIN"

[apps.mini]
appid = "wx000000000000de02"
api = "stable_token"
secret_env = "WXTOKEN_DEMO_SECRET_MINI"

# an Open Platform: tickets and authorization events arrive at callback_listen (above)
[components.platform]
component_appid = "{component_appid}"
secret_env = "WXTOKEN_DEMO_COMPONENT_SECRET"
msg_token_env = "WXTOKEN_DEMO_MSG_TOKEN"
encoding_aes_key_env = "WXTOKEN_DEMO_AES_KEY"
"""
DEMO_COMPONENT = ("wx000000000000dec0", "demo-secret-component-0003", "demo-msg-token",
                  "DemoEncodingAESKey0123456789abcdefghijklmno")
DEMO_AUTHORIZERS = ("wx0000000merchant1", "wx0000000merchant2", "wx0000000merchant3")


def run_demo(duration: float = 45.0) -> int:
    logs.configure("console")
    log = logs.get_logger(component="demo")
    emulator = Emulator(DEMO_APPS, token_ttl=30, overlap=8, stable_window=8).start()
    os.environ["WXTOKEN_DEMO_SECRET_MAIN"] = DEMO_APPS["wx000000000000de01"]
    os.environ["WXTOKEN_DEMO_SECRET_MINI"] = DEMO_APPS["wx000000000000de02"]
    component_appid, component_secret, msg_token, aes_key = DEMO_COMPONENT
    os.environ["WXTOKEN_DEMO_COMPONENT_SECRET"] = component_secret
    os.environ["WXTOKEN_DEMO_MSG_TOKEN"] = msg_token
    os.environ["WXTOKEN_DEMO_AES_KEY"] = aes_key
    with socket.socket() as probe:  # a free port for the callback endpoint
        probe.bind(("127.0.0.1", 0))
        callback_port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="wxtoken-demo-") as tmp:
        state_dir = os.path.join(tmp, "state")
        os.mkdir(state_dir, 0o750)
        control_socket = os.path.join(tmp, "control.sock")
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(DEMO_CONFIG.format(state_dir=state_dir, api_base=emulator.url,
                                        control_socket=control_socket,
                                        callback_port=callback_port,
                                        component_appid=component_appid))
        config = load_config(config_path)
        logs.register_secrets([*DEMO_APPS.values(), component_secret, msg_token, aes_key])
        log.info("demo.start", emulator=emulator.url, state_dir=state_dir,
                 duration=duration or "until Ctrl-C")
        daemon = Daemon(config)
        daemon.start()
        emulator.platforms.add(component_appid, component_secret, msg_token, aes_key,
                               f"http://127.0.0.1:{callback_port}/components/platform/callback",
                               push_every=5)
        reader = _Reader(emulator, state_dir, control_socket, log)
        deadline = time.monotonic() + duration if duration > 0 else float("inf")
        rounds = 0
        try:
            while time.monotonic() < deadline:
                time.sleep(3)
                rounds += 1
                if rounds == 1:
                    for appid in DEMO_AUTHORIZERS:  # merchants authorize the platform
                        emulator.platforms.authorize(component_appid, appid)
                        log.info("demo.merchant_authorizes", authorizer=appid)
                if rounds == 3:
                    # as when some other process fetches its own token: WeChat drops ours
                    token = read_token("main", state_dir)
                    emulator.invalidate(token)
                    log.info("demo.wechat_drops_token", app="main", token=logs.mask(token))
                for app in ("main", "mini"):
                    reader.use(app)
                for appid in DEMO_AUTHORIZERS:
                    reader.use(appid, component="platform")
        except KeyboardInterrupt:
            pass
        finally:
            daemon.stop()
            stats = emulator.stats()
            emulator.stop()
            reader.session.close()
        log.info("demo.done", upstream_calls=stats["total_calls"],
                 tokens_issued=sum(stats["issued"].values()),
                 business_calls_accepted=stats["accepted"],
                 business_calls_refused=stats["rejected"], passive_refreshes=reader.reported,
                 unresolved=reader.unresolved)
    return 0 if reader.unresolved == 0 else 1


class _Reader:
    """What a business program does: read the token, call WeChat, report a refused token."""

    def __init__(self, emulator: Emulator, state_dir: str, control_socket: str,
                 log: Any) -> None:
        self.emulator = emulator
        self.state_dir = state_dir
        self.control_socket = control_socket
        self.log = log
        self.session = requests.Session()
        self.reported = 0
        self.unresolved = 0

    def call(self, token: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.session.get(
            f"{self.emulator.url}/cgi-bin/get_api_domain_ip", params={"access_token": token},
            timeout=5).json()
        return answer

    def use(self, app: str, component: str | None = None) -> None:
        try:
            token = read_token(app, self.state_dir, component)
        except TokenUnavailable as exc:
            self.log.info("demo.reader", app=app, result=exc.reason)
            return
        answer = self.call(token)
        if business_token_invalid(answer.get("errcode", 0)):
            self.log.info("demo.reader", app=app, token=logs.mask(token),
                          wechat_says=answer["errcode"], action="report_invalid")
            self.reported += 1
            try:
                token = report_invalid(app, token, self.state_dir, self.control_socket,
                                       component=component)
            except WxtokenError as exc:
                self.unresolved += 1
                self.log.error("demo.reader", app=app, error=str(exc))
                return
            answer = self.call(token)
            if "ip_list" not in answer:
                self.unresolved += 1
        self.log.info("demo.reader", app=app, token=logs.mask(token),
                      expires_in=int(token.expires_at - time.time()),
                      wechat_accepts="yes" if "ip_list" in answer else answer)
