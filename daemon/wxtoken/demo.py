"""``wxtoken demo``: the emulator and the daemon on a temporary state dir, lifetimes scaled down.

Tokens live 30 s instead of 7200 s, so a minute shows several refreshes, the stable_token window,
and a business program (``read_token``) whose calls WeChat accepts. Nine seconds in, WeChat drops
the main token (as when another process fetches its own): the program sees 42001, reports it with
``report_invalid`` and carries on with the token the daemon fetched for it.
"""

from __future__ import annotations

import os
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

DEMO_APPS = {"wx00000000demo0001": "demo-secret-main-0001",
             "wx00000000demo0002": "demo-secret-mini-0002"}

DEMO_CONFIG = """\
# written by `wxtoken demo`: two apps against the built-in emulator
state_dir = "{state_dir}"
api_base = "{api_base}"
refresh_interval = 12     # seconds (production default: 3600)
renew_before = 8          # seconds (production default: 300)
log_format = "console"
control_socket = "{control_socket}"

[apps.main]
appid = "wx00000000demo0001"
secret_env = "WXTOKEN_DEMO_SECRET_MAIN"

[apps.mini]
appid = "wx00000000demo0002"
api = "stable_token"
secret_env = "WXTOKEN_DEMO_SECRET_MINI"
"""


def run_demo(duration: float = 45.0) -> int:
    logs.configure("console")
    log = logs.get_logger(component="demo")
    emulator = Emulator(DEMO_APPS, token_ttl=30, overlap=8, stable_window=8).start()
    os.environ["WXTOKEN_DEMO_SECRET_MAIN"] = DEMO_APPS["wx00000000demo0001"]
    os.environ["WXTOKEN_DEMO_SECRET_MINI"] = DEMO_APPS["wx00000000demo0002"]
    with tempfile.TemporaryDirectory(prefix="wxtoken-demo-") as tmp:
        state_dir = os.path.join(tmp, "state")
        os.mkdir(state_dir, 0o750)
        control_socket = os.path.join(tmp, "control.sock")
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(DEMO_CONFIG.format(state_dir=state_dir, api_base=emulator.url,
                                        control_socket=control_socket))
        config = load_config(config_path)
        logs.register_secrets(DEMO_APPS.values())
        log.info("demo.start", emulator=emulator.url, state_dir=state_dir,
                 duration=duration or "until Ctrl-C")
        daemon = Daemon(config)
        daemon.start()
        reader = _Reader(emulator, state_dir, control_socket, log)
        deadline = time.monotonic() + duration if duration > 0 else float("inf")
        rounds = 0
        try:
            while time.monotonic() < deadline:
                time.sleep(3)
                rounds += 1
                if rounds == 3:
                    # as when some other process fetches its own token: WeChat drops ours
                    token = read_token("main", state_dir)
                    emulator.invalidate(token)
                    log.info("demo.wechat_drops_token", app="main", token=logs.mask(token))
                for app in ("main", "mini"):
                    reader.use(app)
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

    def use(self, app: str) -> None:
        try:
            token = read_token(app, self.state_dir)
        except TokenUnavailable as exc:
            self.log.info("demo.reader", app=app, result=exc.reason)
            return
        answer = self.call(token)
        if business_token_invalid(answer.get("errcode", 0)):
            self.log.info("demo.reader", app=app, token=logs.mask(token),
                          wechat_says=answer["errcode"], action="report_invalid")
            self.reported += 1
            try:
                token = report_invalid(app, token, self.state_dir, self.control_socket)
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
