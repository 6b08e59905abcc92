"""The WeChat API emulator: a real HTTP server on 127.0.0.1 for tests, benchmarks and the demo.

It follows the documented behaviour that matters for token sharing:

- ``GET /cgi-bin/token``: every call issues a new token; the previous ones stay valid only
  ``overlap`` seconds more.
- ``POST /cgi-bin/stable_token``: normal mode returns the same token until the last
  ``stable_window`` seconds of its life, then the next one (old and new both valid);
  ``force_refresh`` issues a new one, at most ``force_per_day`` a day and ``force_spacing`` apart.
- ``GET /cgi-bin/gettoken`` (WeCom): one token per (corpid, secret), the same one while valid.
- ``GET /cgi-bin/ticket/getticket?access_token=&type=jsapi|wx_card``: a new ticket per call (the
  previous one valid ``overlap`` more), only for a valid token.
- ``GET /cgi-bin/get_api_domain_ip`` and ``/cgi-bin/getcallbackip`` with ``?access_token=``:
  business APIs answering 40001/42001 for a bad or expired token, so tests can prove a token
  really works.
- ``POST /cgi-bin/openapi/quota/get``, ``/cgi-bin/clear_quota`` (with a token),
  ``/cgi-bin/clear_quota/v2`` (appid + appsecret) and ``/cgi-bin/openapi/rid/get``: see ops.py;
  every error answer's errmsg ends in `` rid: <id>``, which rid/get looks up.
- daily quotas (45009), and fault injection: busy (-1), minute_quota (45011), quota (45009),
  ip (40164), errcode:N, 5xx, garbage, reset, hang, drip (the answer one byte at a time, each
  within any read timeout), redirect (307 to ``location``), empty_token, lost (a component API
  carries the request out, then resets the connection; elsewhere as reset); a fault may target one
  app (``appid``) and one endpoint (``api``: token, stable_token, wecom, ticket_jsapi, …).

Time comes from ``clock`` (``time.time`` unless a test drives a simulated day).

Control endpoints: ``GET /_emu/stats``, ``POST /_emu/faults`` (``DELETE`` clears),
``POST /_emu/settings``, ``POST /_emu/apps``. Run it with ``python -m wxtoken.emulator``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wxtoken.emulator import component, ops, tokens
from wxtoken.emulator.state import (
    FAULT_MODES,
    Fault,
    Reply,
    Settings,
    State,
    check_token,
    err,
    stats,
)

OPS = {"/cgi-bin/openapi/quota/get": ops.quota_get, "/cgi-bin/clear_quota": ops.clear_quota_v1,
       "/cgi-bin/clear_quota/v2": ops.clear_quota_v2, "/cgi-bin/openapi/rid/get": ops.rid_get}


class Emulator:
    """The emulator server; ``start()`` serves in a background thread on 127.0.0.1."""

    def __init__(self, apps: dict[str, str] | None = None,
                 corps: dict[str, set[str]] | None = None, host: str = "127.0.0.1",
                 port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time, **settings: Any) -> None:
        self.state = State(settings=Settings(**settings), apps=dict(apps or {}),
                           corps={k: set(v) for k, v in (corps or {}).items()}, clock=clock)
        self.server = _Server((host, port), _Handler)
        self.server.state = self.state
        self.platforms = self.server.platforms = component.Platforms(self.state)
        self.scheme = "http"
        if ssl_context is not None:  # HTTPS, for TLS and ca_bundle tests
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host!s}:{port}"

    def start(self) -> Emulator:
        self._thread = threading.Thread(target=self.server.serve_forever, name="emulator",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.platforms.stop()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for in-process tests --------------------------------------------------------
    def calls(self, appid: str | None = None, api: str | None = None) -> int:
        with self.state.lock:
            return sum(n for a, per in self.state.calls.items() if appid in (None, a)
                       for k, n in per.items() if api in (None, k))

    def add_fault(self, mode: str, count: int = -1, rate: float = 1.0,
                  appid: str | None = None, api: str | None = None,
                  location: str = "") -> None:
        if mode not in FAULT_MODES and not mode.startswith("errcode:"):
            raise ValueError(f"unknown fault mode {mode!r}")
        with self.state.lock:
            self.state.faults.append(Fault(mode, count, rate, appid, api, location))

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def token_status(self, token: str) -> int:
        """0 when the business API would accept the token, else its errcode (40001 / 42001)."""
        return check_token(self.state, token, count=False)

    def ticket_status(self, ticket: str) -> int:
        """0 when a JS-SDK signature with this ticket would be accepted, else 40001 / 42001."""
        with self.state.lock:
            issued = self.state.tickets.get(ticket)
            if issued is None:
                return 40001
            return 42001 if self.state.clock() >= issued.expires_at else 0

    def invalidate(self, token: str) -> None:
        """Make WeChat drop a token early (as a token fetched elsewhere would)."""
        with self.state.lock:
            self.state.tokens[token].expires_at = self.state.clock()

    def stats(self) -> dict[str, Any]:
        return {**stats(self.state), "components": self.platforms.stats()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: State
    platforms: component.Platforms

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # injected resets and client hang-ups are expected here


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    _raw: bytes | None = None  # the request's body, once read
    wbufsize = -1  # headers and body in one send: no Nagle + delayed-ACK stall on keep-alive

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: request lines would carry secrets

    def _send(self, status: int, raw: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        if not self.server.state.settings.keep_alive:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    def _json_body(self) -> Any:
        if self._raw is None:
            length = int(self.headers.get("Content-Length") or 0)
            self._raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(self._raw or b"{}")
        except ValueError:
            raise err(47001, "data format error") from None

    def _account(self, state: State, query: dict[str, str]) -> str:
        """The appid (or corpid) a call was made for, as far as it says."""
        named = query.get("appid") or query.get("corpid")
        if named:
            return named
        with contextlib.suppress(Reply):
            body = self._json_body()
            if isinstance(body, dict) and isinstance(body.get("appid"), str):
                return str(body["appid"])
        with state.lock:
            issued = state.tokens.get(query.get("access_token", ""))
            return issued.key[1].split(":")[0] if issued is not None else ""

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._raw = None
        started = time.monotonic()
        try:
            try:
                self._route(method, parts.path, query, state)
            except Reply as reply:
                body = reply.body
                if isinstance(body, dict) and body.get("errcode") not in (0, None):
                    ops.remember(state, self._account(state, query), parts.query,
                                 self._raw or b"", body,
                                 int((time.monotonic() - started) * 1000))
                raise
        except Reply as reply:
            if reply.action == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if reply.action == "hang":
                time.sleep(state.settings.hang_seconds)
                self.close_connection = True
                return
            if reply.action == "drip":
                self._drip(state.settings)
                return
            if reply.action and reply.action.startswith("redirect:"):
                self.send_response(307)
                self.send_header("Location", reply.action.split(":", 1)[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            raw = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
            ctype = "application/json" if reply.raw is None else "text/html"
            self._send(reply.status, raw, ctype)

    def _route(self, method: str, path: str, query: dict[str, str], state: State) -> None:
        """Answer by raising Reply."""
        if path.startswith("/_emu/"):
            raise Reply(self._control(method, path, state))
        route = (method, path)
        if state.settings.latency:
            with state.lock:
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
            try:
                time.sleep(state.settings.latency)
            finally:
                with state.lock:
                    state.inflight -= 1
        if route == ("GET", "/cgi-bin/token"):
            raise Reply(tokens.token(state, query))
        if route == ("POST", "/cgi-bin/stable_token"):
            raise Reply(tokens.stable_token(state, self._json_body()))
        if route == ("GET", "/cgi-bin/gettoken"):
            raise Reply(tokens.wecom(state, query))
        if route == ("GET", "/cgi-bin/ticket/getticket"):
            raise Reply(tokens.ticket(state, query))
        if route in (("GET", "/cgi-bin/get_api_domain_ip"), ("GET", "/cgi-bin/getcallbackip")):
            code = check_token(state, query.get("access_token", ""))
            if code == 42001:
                raise err(42001, "access_token expired")
            if code:
                raise err(40001, "invalid credential, access_token is invalid or not latest")
            ops.count_business(state, self._account(state, query), path)
            raise Reply({"ip_list": ["127.0.0.1"]})
        if method == "POST" and path in component.ROUTES:
            handler = getattr(self.server.platforms, component.ROUTES[path])
            raise Reply(handler(query, self._json_body()))
        if method == "POST" and path in OPS:
            with state.lock:
                state.ops[path] = state.ops.get(path, 0) + 1
            raise Reply(OPS[path](state, query, self._json_body()))
        raise Reply(status=404, raw=b'{"errcode":404,"errmsg":"not found"}')

    def _drip(self, settings: Settings) -> None:
        """A valid answer sent one byte at a time: every read gets data before any read timeout,
        so only an overall deadline ends the call."""
        self.close_connection = True
        body = json.dumps({"access_token": "drip-" + "x" * 60, "expires_in": 7200}).encode()
        raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + settings.hang_seconds
        try:
            for i in range(len(raw)):
                if time.monotonic() >= deadline:
                    return
                self.wfile.write(raw[i:i + 1])
                self.wfile.flush()
                time.sleep(settings.drip_interval)
        except OSError:
            pass  # the client gave up

    def _control(self, method: str, path: str, state: State) -> Any:
        if path == "/_emu/stats":
            return {**stats(state), "components": self.server.platforms.stats()}
        if path == "/_emu/faults" and method == "DELETE":
            with state.lock:
                state.faults.clear()
            return {"ok": True}
        body = self._json_body() if method == "POST" else {}
        if path == "/_emu/faults" and method == "POST":
            specs = body if isinstance(body, list) else [body]
            names = {f.name for f in fields(Fault)}
            with state.lock:
                for spec in specs:
                    state.faults.append(Fault(**{k: v for k, v in spec.items() if k in names}))
            return {"ok": True}
        if path == "/_emu/settings" and method == "POST":
            with state.lock:
                for key, value in body.items():
                    if hasattr(state.settings, key):
                        setattr(state.settings, key, value)
            return asdict(state.settings)
        platforms = self.server.platforms
        if path == "/_emu/components" and method == "POST":
            platforms.add(str(body["component_appid"]), str(body["secret"]),
                          str(body["msg_token"]), str(body["encoding_aes_key"]),
                          str(body.get("callback", "")), float(body.get("push_every", 600)))
            return {"ok": True}
        if path == "/_emu/authorize" and method == "POST":
            code = platforms.authorize(str(body["component_appid"]),
                                       str(body["authorizer_appid"]), bool(body.get("push", True)))
            return {"ok": True, "authorization_code": code}
        if path == "/_emu/unauthorize" and method == "POST":
            platforms.unauthorize(str(body["component_appid"]), str(body["authorizer_appid"]),
                                  bool(body.get("push", True)))
            return {"ok": True}
        if path == "/_emu/apps" and method == "POST":
            with state.lock:
                state.apps[str(body["appid"])] = str(body["secret"])
            return {"ok": True}
        raise Reply(status=404, raw=b'{"errcode":404,"errmsg":"not found"}')

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


def _pair(text: str) -> tuple[str, str]:
    key, sep, secret = text.partition(":")
    if not sep or not key or not secret:
        raise argparse.ArgumentTypeError(f"expected ID:SECRET, not {text!r}")
    return key, secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wxtoken.emulator",
                                     description="WeChat token API emulator on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--app", action="append", type=_pair, default=[],
                        metavar="APPID:SECRET")
    parser.add_argument("--wecom", action="append", type=_pair, default=[],
                        metavar="CORPID:SECRET")
    for f in fields(Settings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                            type=type(getattr(Settings(), f.name)), default=None)
    args = parser.parse_args(argv)
    settings = {f.name: getattr(args, f.name) for f in fields(Settings)
                if getattr(args, f.name) is not None}
    corps: dict[str, set[str]] = {}
    for corpid, secret in args.wecom:
        corps.setdefault(corpid, set()).add(secret)
    emu = Emulator(dict(args.app), corps, host=args.host, port=args.port, **settings)
    print(emu.url, flush=True)
    try:
        emu.server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        emu.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
