"""The daemon's control endpoint: HTTP/1.1 on a Unix socket (mode 0660, the daemon's group).

    GET  /v1/apps                 health of every app
    GET  /v1/apps/NAME            the app's token, expires_at, expires_in (and tickets)
    POST /v1/apps/NAME/refresh    passive refresh; body {"invalid_token": "…"} is optional

Usable with ``curl --unix-socket /run/wxtoken/control.sock http://localhost/v1/apps``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler
from typing import Any

from wxtoken.errors import StoreError
from wxtoken.health import app_health
from wxtoken.logs import get_logger
from wxtoken.record import TokenRecord
from wxtoken.refresher import Forced, Refresher

SOCKET_MODE = 0o660
MAX_BODY = 4096
HTTP_STATUS = {"rate_limited": 429, "budget": 429, "failed": 502}


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of reports after a token change must not see EAGAIN
    refreshers: dict[str, Refresher]
    on_forced: Callable[[str, Forced], None]
    working: Callable[[], AbstractContextManager[bool]]


def _token_body(record: TokenRecord, now: float) -> dict[str, Any]:
    body: dict[str, Any] = {"app": record.app, "access_token": record.access_token,
                            "expires_at": record.expires_at,
                            "expires_in": int(record.expires_at - now)}
    for kind, (ticket, expires_at) in record.tickets.items():
        body[f"{kind}_ticket"] = ticket
        body[f"{kind}_ticket_expires_at"] = expires_at
    return body


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # one write per response

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines can carry tokens; the refresher logs what matters

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _refresher(self, name: str) -> Refresher | None:
        refresher = self.server.refreshers.get(name)
        if refresher is None:
            self._send(404, {"error": f"no app named {name!r}", "error_class": "not_found"})
        return refresher

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        now = time.time()
        if parts == ["v1", "apps"]:
            apps = [app_health(r.config, r.app, now) for r in self.server.refreshers.values()]
            self._send(200, {"apps": apps})
        elif len(parts) == 3 and parts[:2] == ["v1", "apps"]:
            if (refresher := self._refresher(parts[2])) is None:
                return
            try:
                record = refresher.store.read()
            except (OSError, ValueError) as exc:
                self._send(503, {"error": f"no valid token: {exc}", "error_class": "unavailable"})
                return
            if record.expires_at <= now:
                self._send(503, {"error": "the token has expired", "error_class": "unavailable"})
                return
            self._send(200, _token_body(record, now))
        else:
            self._send(404, {"error": "not found", "error_class": "not_found"})

    def do_POST(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if not (len(parts) == 4 and parts[:2] == ["v1", "apps"] and parts[3] == "refresh"):
            self._send(404, {"error": "not found", "error_class": "not_found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(413, {"error": "body too large", "error_class": "bad_request"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            invalid = body.get("invalid_token") if isinstance(body, dict) else None
            if invalid is not None and not isinstance(invalid, str):
                raise ValueError
        except ValueError:
            self._send(400, {"error": 'body must be {"invalid_token": "…"}',
                             "error_class": "bad_request"})
            return
        if (refresher := self._refresher(parts[2])) is None:
            return
        with self.server.working() as ok:  # the daemon's stop waits for a refresh in progress
            if not ok:
                self._send(503, {"error": "the daemon is stopping", "error_class": "stopping"})
                return
            try:
                forced = refresher.force(invalid or None)
            except StoreError as exc:
                self._send(503, {"error": str(exc), "error_class": "store"})
                return
            self.server.on_forced(parts[2], forced)
        now = time.time()
        if forced.state in ("current", "refreshed") and forced.record is not None:
            self._send(200, {**_token_body(forced.record, now),
                             "refreshed": forced.state == "refreshed"})
            return
        answer: dict[str, Any] = {"error_class": forced.state}
        if forced.error is not None:
            answer.update(error=str(forced.error), error_class=forced.error.kind.value,
                          errcode=forced.error.errcode, errmsg=forced.error.errmsg)
        elif forced.state == "budget":
            answer["error"] = "the daily budget of upstream calls is spent"
        else:
            answer["error"] = f"refresh rate-limited; retry in {forced.retry_after:.0f} s"
        if forced.retry_after:
            answer["retry_after"] = round(forced.retry_after, 1)
        self._send(HTTP_STATUS.get(forced.state, 502), answer)


class ControlServer:
    """Serves the control endpoint in a background thread."""

    def __init__(self, path: str, refreshers: dict[str, Refresher],
                 on_forced: Callable[[str, Forced], None],
                 working: Callable[[], AbstractContextManager[bool]]) -> None:
        self.path = path
        self.log = get_logger()
        self._take_over_stale_socket()
        self.server = _Server(path, _Handler, bind_and_activate=False)
        self.server.refreshers = refreshers
        self.server.on_forced = on_forced
        self.server.working = working
        old_umask = os.umask(0o117)  # never a moment with a wider mode than 0660
        try:
            self.server.server_bind()
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        self.server.server_activate()
        # no polling: the loop sleeps in select() until a client connects (stop() wakes it)
        self._thread = threading.Thread(target=self.server.serve_forever, name="control",
                                        kwargs={"poll_interval": None}, daemon=True)

    def _take_over_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # left by a crash: nobody listens
                return
        raise OSError(f"{self.path} is served by another running daemon")

    def start(self) -> None:
        self._thread.start()
        self.log.info("control.listening", socket=self.path)

    def stop(self) -> None:
        if self._thread.is_alive():
            stopper = threading.Thread(target=self.server.shutdown, daemon=True)
            stopper.start()
            deadline = time.monotonic() + 10
            while stopper.is_alive() and time.monotonic() < deadline:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke, \
                        contextlib.suppress(OSError):
                    poke.connect(self.path)  # wakes select() so it sees the request
                stopper.join(0.05)
        self.server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
