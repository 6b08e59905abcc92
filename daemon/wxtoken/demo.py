"""``wxtoken demo``: one Official Account against the built-in emulator, lifetimes scaled down.

Tokens live 30 s instead of 7200 s, so a minute shows what a day would. The account ``main``
uses ``stable_token``, as ``config.example.toml`` recommends: the daemon fetches its token, and
fetches the next one inside WeChat's last window before expiry (old and new both valid then).
A business program reads the token (``read_token``) twice a second and calls WeChat's business
API with it; a line every few seconds sums up its reads. Nine seconds in, WeChat drops the token
(as when another system forces a refresh of the same appid): the program gets 42001, reports it
with ``report_invalid`` and goes on with the token the daemon fetched for it.

An Open Platform (第三方平台) is configured beside it and waits quietly for its first
component_verify_ticket; from 14 s the emulator pushes one every 5 s to the daemon's callback
endpoint, three merchants authorize the platform, and the program reads each authorizer's token
too. The run ends with the commands that set up the same for a real account.

The demo writes to stdout; when its reader goes away (``wxtoken demo | head``) it stops and
cleans up (daemon, emulator, temporary directory) without a traceback, and exits 141 as a
process killed by SIGPIPE would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import Any, TextIO, cast

import requests

from wxtoken import logs
from wxtoken.config import load_config
from wxtoken.daemon import Daemon
from wxtoken.emulator import Emulator
from wxtoken.errcodes import business_token_invalid
from wxtoken.errors import TokenMissing, TokenUnavailable, WxtokenError
from wxtoken.reader import read_token, report_invalid
from wxtoken.serve import start

APPID = "wx000000000000de01"
# every secret a test sees contains s3cr3t (the suite's leak checks look for it)
SECRET = "demo-s3cr3t-main-0001"  # noqa: S105 - the emulator's, made up
COMPONENT = ("wx000000000000dec0", "demo-s3cr3t-component-0003", "demo-msg-token",
             "DemoEncodingAESKey0123456789abcdefghijklmno")
AUTHORIZERS = ("wx0000000merchant1", "wx0000000merchant2", "wx0000000merchant3")

READ_EVERY = 0.5  # seconds between the business program's reads
SUMMARY_EVERY = 5.0  # seconds between its summary lines
DROP_AT = 9.0  # WeChat drops main's token
PLATFORM_AT = 14.0  # the Open Platform's first ticket is pushed
SIGPIPE_EXIT = 128 + signal.SIGPIPE

DEMO_CONFIG = """\
# written by `wxtoken demo`: one Official Account (and an Open Platform) against the emulator
state_dir = "{state_dir}"
api_base = "{api_base}"
refresh_interval = 12     # seconds (production default: 3600)
renew_before = 8          # seconds (production default: 300)
log_format = "console"
control_socket = "{control_socket}"
callback_listen = "127.0.0.1:{callback_port}"

[apps.main]
appid = "{appid}"
api = "stable_token"
secret_env = "WXTOKEN_DEMO_SECRET_MAIN"

# an Open Platform: tickets and authorization events arrive at callback_listen (above)
[components.platform]
component_appid = "{component_appid}"
secret_env = "WXTOKEN_DEMO_COMPONENT_SECRET"
msg_token_env = "WXTOKEN_DEMO_MSG_TOKEN"
encoding_aes_key_env = "WXTOKEN_DEMO_AES_KEY"
"""

INTRO = f"""\
wxtoken demo: the daemon keeps one Official Account's access_token fresh (app "main",
api = "stable_token") against the built-in WeChat emulator. Tokens live 30 s here, 7200 s on
WeChat; the daemon fetches the next one in stable_token's last window before expiry, while the
old one is still good. A business program reads the token twice a second and calls WeChat with
it; demo.reader sums that up every {SUMMARY_EVERY:g} s. At {DROP_AT:g} s WeChat drops the \
token: the program gets
42001, reports it and goes on with the daemon's new one. At {PLATFORM_AT:g} s an Open Platform
(第三方平台) gets its first component_verify_ticket, and three merchants authorize it.

"""

WHAT_NEXT = """\

What next: the same for your Official Account on a server (README: "Quick start"), as root:
  deploy/systemd/install.sh           # from this checkout (or apt install ./dist/wxtoken_*.deb,
                                      # built by deploy/debian/build.sh)
  $EDITOR /etc/wxtoken/config.toml    # [apps.main] appid = your AppID: 微信公众平台 →
                                      # 设置与开发 → 基本配置 (开发者ID, 开发者密码, IP白名单)
  install -m 0600 /dev/stdin /etc/wxtoken/main.secret <<< 'your AppSecret'
  systemctl edit wxtoken              # add: [Service]
                                      #      LoadCredential=main:/etc/wxtoken/main.secret
  # add the server's public IP to the IP whitelist (IP白名单), or WeChat answers 40164
  wxtoken check-config                # secrets masked; exit 0 when the service can start
  systemctl enable --now wxtoken
  wxtoken token main                  # programs read /var/lib/wxtoken/main.json (group wxtoken)
Here, after ./dev.sh demo, the command is .venv/bin/wxtoken (or: source .venv/bin/activate).
"""


class _Output:
    """The demo's stdout. When its reader goes away (``wxtoken demo | head``) every later
    write, from whichever thread logs, is dropped and ``gone`` is set: the demo then stops and
    cleans up instead of dying mid-write with a traceback."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone = threading.Event()

    def write(self, text: str) -> int:
        if not self.gone.is_set():
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self.gone.is_set():
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._lost()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def _lost(self) -> None:
        self.gone.set()
        # the interpreter flushes stdout once more at exit: let that go nowhere, quietly
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM, SIGHUP: stop and clean up, as Ctrl-C does


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_demo(duration: float = 45.0) -> int:
    out = _Output(sys.stdout)
    logs.configure("console", stream=cast(TextIO, out))
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(out, duration)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(out: _Output, duration: float) -> int:
    log = logs.get_logger()
    component_appid, component_secret, msg_token, aes_key = COMPONENT
    os.environ.update({"WXTOKEN_DEMO_SECRET_MAIN": SECRET,
                       "WXTOKEN_DEMO_COMPONENT_SECRET": component_secret,
                       "WXTOKEN_DEMO_MSG_TOKEN": msg_token, "WXTOKEN_DEMO_AES_KEY": aes_key})
    logs.register_secrets([SECRET, component_secret, msg_token, aes_key])
    callback_port = _free_port()
    out.write(INTRO)
    with tempfile.TemporaryDirectory(prefix="wxtoken-demo-") as tmp, \
            Emulator({APPID: SECRET}, token_ttl=30, overlap=8, stable_window=8) as emulator:
        state_dir = os.path.join(tmp, "state")
        os.mkdir(state_dir, 0o750)
        control_socket = os.path.join(tmp, "control.sock")
        config_path = os.path.join(tmp, "config.toml")
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(DEMO_CONFIG.format(state_dir=state_dir, api_base=emulator.url,
                                        control_socket=control_socket,
                                        callback_port=callback_port, appid=APPID,
                                        component_appid=component_appid))
        log.info("demo.start", emulator=emulator.url, state_dir=state_dir,
                 duration=duration or "until Ctrl-C")
        daemon = Daemon(load_config(config_path))
        reader = _Reader(emulator, state_dir, control_socket, log)
        interrupted = False
        try:
            start(daemon)
            daemon.ready.wait(10)
            _story(out, emulator, reader, log, duration,
                   f"http://127.0.0.1:{callback_port}/components/platform/callback")
        except KeyboardInterrupt:
            interrupted = True
        finally:
            daemon.stop()
            reader.session.close()
        stats = emulator.stats()
    if out.gone.is_set():
        return SIGPIPE_EXIT
    log.info("demo.done", upstream_calls=stats["total_calls"],
             tokens_issued=sum(stats["issued"].values()),
             business_calls_accepted=stats["accepted"],
             business_calls_refused=stats["rejected"], passive_refreshes=reader.reported,
             unresolved=reader.unresolved)
    out.write(WHAT_NEXT)
    out.flush()
    if out.gone.is_set():
        return SIGPIPE_EXIT
    if interrupted:
        return 130
    return 0 if reader.unresolved == 0 else 1


def _story(out: _Output, emulator: Emulator, reader: _Reader, log: Any, duration: float,
           callback: str) -> None:
    """The business program's reads, and what happens to the account meanwhile, until the
    duration is over or nobody reads the output any more."""
    component_appid, component_secret, msg_token, aes_key = COMPONENT
    start = time.monotonic()
    end = start + duration if duration > 0 else float("inf")
    dropped = pushing = authorized = False
    ready_at = 0.0  # when the component token came
    next_summary = start + SUMMARY_EVERY
    while not out.gone.is_set():
        now = time.monotonic()
        if now >= end:
            break
        if not dropped and now - start >= DROP_AT:
            # as when another system forces a refresh of the same appid: WeChat drops ours
            with contextlib.suppress(TokenUnavailable):  # none to drop: the daemon logged why
                token = read_token("main", reader.state_dir)
                emulator.invalidate(token)
                log.info("demo.wechat_drops_token", app="main", token=logs.mask(token))
            dropped = True
        if not pushing and now - start >= PLATFORM_AT:
            emulator.platforms.add(component_appid, component_secret, msg_token, aes_key,
                                   callback, push_every=5)
            log.info("demo.platform_pushes", component="platform",
                     note="WeChat pushes a component_verify_ticket to the callback now and "
                          "every 5 s (every 10 minutes on WeChat)")
            pushing = True
        if pushing and not ready_at and _has_token(reader, component_appid):
            ready_at = now  # the component token: the daemon reads the authorizer list now
        if ready_at and not authorized and now - ready_at >= READ_EVERY:
            for appid in AUTHORIZERS:  # merchants authorize the platform
                emulator.platforms.authorize(component_appid, appid)
                log.info("demo.merchant_authorizes", component="platform", authorizer=appid)
            authorized = True
        reader.use("main")
        if authorized:
            for appid in AUTHORIZERS:
                reader.use(appid, component="platform")
        if now >= next_summary:
            reader.summarize()
            next_summary += SUMMARY_EVERY
        out.gone.wait(max(0.0, min(READ_EVERY, end - time.monotonic())))
    if not out.gone.is_set():
        reader.summarize()


def _has_token(reader: _Reader, appid: str) -> bool:
    try:
        read_token(appid, reader.state_dir, "platform")
    except TokenUnavailable:
        return False
    return True


class _Tally:
    """One reader's reads since its last summary line."""

    def __init__(self) -> None:
        self.reads = self.accepted = self.refused = self.reported = 0
        self.apps: set[str] = set()
        self.tokens: list[str] = []
        self.expires_in: int | None = None

    def add(self, app: str, token: str, expires_at: float, accepted: bool) -> None:
        self.reads += 1
        self.apps.add(app)
        self.accepted += accepted
        self.refused += not accepted
        if logs.mask(token) not in self.tokens:
            self.tokens.append(logs.mask(token))
        self.expires_in = int(expires_at - time.time())


class _Reader:
    """What a business program does: read the token, call WeChat, report a refused token.
    Reads are summed up in one line per app every few seconds; a refused token is told at once."""

    def __init__(self, emulator: Emulator, state_dir: str, control_socket: str,
                 log: Any) -> None:
        self.emulator = emulator
        self.state_dir = state_dir
        self.control_socket = control_socket
        self.log = log
        self.session = requests.Session()
        self.reported = 0
        self.unresolved = 0
        self.main = _Tally()
        self.platform = _Tally()
        self.waiting: dict[str, str] = {}  # app -> why there was no token to read

    def call(self, token: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.session.get(
            f"{self.emulator.url}/cgi-bin/get_api_domain_ip", params={"access_token": token},
            timeout=5).json()
        return answer

    def use(self, app: str, component: str | None = None) -> None:
        tally = self.platform if component else self.main
        try:
            token = read_token(app, self.state_dir, component)
        except TokenMissing:
            # an authorizer whose code the daemon is still exchanging: nothing to read yet
            return
        except TokenUnavailable as exc:
            self.waiting[app] = exc.reason
            return
        answer = self.call(token)
        if business_token_invalid(answer.get("errcode", 0)):
            self.log.info("demo.reader", app=app, token=logs.mask(token),
                          wechat_says=answer["errcode"], action="report_invalid")
            self.reported += 1
            tally.reported += 1
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
                          wechat_accepts="yes" if "ip_list" in answer else answer,
                          note="the daemon's new token")
        tally.add(app, token, token.expires_at, "ip_list" in answer)

    def summarize(self) -> None:
        for app, tally in (("main", self.main), ("platform", self.platform)):
            if not tally.reads:
                continue
            fields: dict[str, Any] = {"reads": tally.reads, "wechat_accepted": tally.accepted}
            if tally.refused:
                fields["wechat_refused"] = tally.refused
            if tally.reported:
                fields["reported_invalid"] = tally.reported
            if app == "main":
                self.log.info("demo.reader", app=app, **fields, tokens=",".join(tally.tokens),
                              expires_in=tally.expires_in)
            else:
                self.log.info("demo.reader", component=app, authorizers=len(tally.apps),
                              **fields)
        for app, why in sorted(self.waiting.items()):
            self.log.info("demo.reader", app=app, result=why)
        self.main, self.platform, self.waiting = _Tally(), _Tally(), {}
