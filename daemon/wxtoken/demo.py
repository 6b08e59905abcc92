"""``wxtoken demo``: the emulator and the daemon on a temporary state dir, lifetimes scaled down.

Tokens live 30 s instead of 7200 s, so a minute shows several refreshes, the stable_token window
and a reader (``read_token``) whose every token the emulator's business API accepts.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import requests

from wxtoken import logs
from wxtoken.config import load_config
from wxtoken.daemon import Daemon
from wxtoken.emulator import Emulator
from wxtoken.errors import TokenUnavailable
from wxtoken.reader import read_token

DEMO_APPS = {"wx00000000demo0001": "demo-secret-main-0001",
             "wx00000000demo0002": "demo-secret-mini-0002"}

DEMO_CONFIG = """\
# written by `wxtoken demo`: two apps against the built-in emulator
state_dir = "{state_dir}"
api_base = "{api_base}"
refresh_interval = 12     # seconds (production default: 3600)
renew_before = 8          # seconds (production default: 300)
log_format = "console"

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
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(DEMO_CONFIG.format(state_dir=state_dir, api_base=emulator.url))
        config = load_config(config_path)
        logs.register_secrets(DEMO_APPS.values())
        log.info("demo.start", emulator=emulator.url, state_dir=state_dir,
                 duration=duration or "until Ctrl-C")
        daemon = Daemon(config)
        stop = threading.Event()
        daemon.start()
        session = requests.Session()
        deadline = time.monotonic() + duration if duration > 0 else float("inf")
        try:
            while time.monotonic() < deadline and not stop.wait(3):
                for app in ("main", "mini"):
                    try:
                        token = read_token(app, state_dir)
                    except TokenUnavailable as exc:
                        log.info("demo.reader", app=app, result=exc.reason)
                        continue
                    answer = session.get(f"{emulator.url}/cgi-bin/get_api_domain_ip",
                                         params={"access_token": token}, timeout=5).json()
                    log.info("demo.reader", app=app, token=logs.mask(token),
                             expires_in=int(token.expires_at - time.time()),
                             wechat_accepts="yes" if "ip_list" in answer else answer)
        except KeyboardInterrupt:
            pass
        finally:
            daemon.stop()
            stats = emulator.stats()
            emulator.stop()
            session.close()
        log.info("demo.done", upstream_calls=stats["total_calls"],
                 tokens_issued=sum(stats["issued"].values()),
                 business_calls_accepted=stats["accepted"],
                 business_calls_rejected=stats["rejected"])
    return 0 if stats["rejected"] == 0 else 1
