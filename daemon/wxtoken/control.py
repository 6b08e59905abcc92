"""The daemon's control endpoint: HTTP/1.1 on a Unix socket (mode 0660, the daemon's group).

    GET  /v1/apps                 health of every app
    GET  /v1/apps/NAME            the app's token, expires_at, expires_in (and tickets)
    POST /v1/apps/NAME/refresh    passive refresh; body {} or {"invalid_token": "…"}

Usable with ``curl --unix-socket /run/wxtoken/control.sock http://localhost/v1/apps``.

Any member of the group can connect, so nothing a client sends may cost the daemon more than a
little: at most ``MAX_CONNECTIONS`` at once (more are answered 503 at once), each request must
arrive whole within ``READ_TIMEOUT`` seconds, bodies need a Content-Length of at most
``MAX_BODY`` bytes (400 bad, 411 missing or chunked, 413 too large), and no request ever ends in a
traceback. The peer's credentials (SO_PEERCRED) tell the operator (root, or the daemon's own
user) from a token reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from wxtoken.config import Config
from wxtoken.errors import TokenUnavailable, UpstreamError
from wxtoken.health import app_health_from_files
from wxtoken.logs import get_logger
from wxtoken.passive import ForcedState
from wxtoken.record import APP_NAME_RE, TokenRecord, load_record, token_path
from wxtoken.refresher import Forced

SOCKET_MODE = 0o660
MAX_BODY = 4096
MAX_CONNECTIONS = 32
READ_TIMEOUT = 5.0
HTTP_STATUS = {
    ForcedState.CURRENT: 200, ForcedState.REFRESHED: 200, ForcedState.RATE_LIMITED: 429,
    ForcedState.WAITING: 429, ForcedState.BUDGET: 429, ForcedState.FAILED: 502,
    ForcedState.STORE_FAILED: 503,
}
# force(name, invalid_token, privileged) -> the answer; None once the daemon is stopping
Force = Callable[[str, str | None, bool], Forced | None]


class _Reaper:
    """One thread that shuts down connections whose request has not arrived by its deadline.
    It sleeps without a timeout while no request is being read (no polling)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._thread = threading.Thread(target=self._loop, name="control-reaper", daemon=True)
        self._thread.start()

    def watch(self, key: int, sock: socket.socket, seconds: float) -> None:
        with self._cond:
            self._due[key] = (time.monotonic() + seconds, sock)
            self._cond.notify()

    def forget(self, key: int) -> None:
        with self._cond:
            self._due.pop(key, None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                if not self._due:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                for key, (at, sock) in list(self._due.items()):
                    if at <= now:
                        del self._due[key]
                        with contextlib.suppress(OSError):
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)
                if self._due:
                    self._cond.wait(min(at for at, _ in self._due.values()) - now)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of reports after a token change must not see EAGAIN
    config: Config
    force: Force

    def __init__(self, path: str) -> None:
        super().__init__(path, _Handler, bind_and_activate=False)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.reaper = _Reaper()
        self.log = get_logger()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread per connection
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):  # a client that hangs up is no news
            self.log.warning("control.error", error=type(exc).__name__)


def _refuse_busy(request: socket.socket) -> None:
    body = json.dumps({"error": "too many connections; retry shortly",
                       "error_class": "busy"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Retry-After: 1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    with contextlib.suppress(OSError):
        request.settimeout(0.5)
        request.sendall(head.encode() + body)


def _token_body(record: TokenRecord, now: float) -> dict[str, Any]:
    body: dict[str, Any] = {"app": record.app, "access_token": record.access_token,
                            "expires_at": record.expires_at,
                            "expires_in": int(record.expires_at - now)}
    for kind, (ticket, expires_at) in record.tickets.items():
        body[f"{kind}_ticket"] = ticket
        body[f"{kind}_ticket_expires_at"] = expires_at
    return body


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer junk with a status line, never bare HTML
    timeout = READ_TIMEOUT  # each read and write; the whole request has READ_TIMEOUT too
    wbufsize = -1  # one write per response

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines can carry tokens; the refresher logs what matters

    def handle_one_request(self) -> None:
        # the request (line, headers, body) must arrive within READ_TIMEOUT, however slowly
        # it drips: past that, the connection is shut down under the reading thread
        self.server.reaper.watch(id(self), self.connection, READ_TIMEOUT)
        try:
            super().handle_one_request()
        finally:
            self._arrived()

    def _arrived(self) -> None:
        self.server.reaper.forget(id(self))

    def _send(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's errors (bad request line, headers too long, …), as JSON."""
        reason = message or HTTPStatus(code).phrase
        self._send(code, {"error": reason, "error_class": "bad_request"}, close=True)

    def _route(self) -> tuple[list[str], str | None]:
        """The path's parts and the app name in it (None when there is no valid one)."""
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        name = parts[2] if len(parts) >= 3 and parts[:2] == ["v1", "apps"] else None
        return parts, name if name is not None and APP_NAME_RE.match(name) else None

    def _known(self, name: str | None) -> bool:
        if name is None or name not in {a.name for a in self.server.config.apps}:
            self._send(404, {"error": f"no app named {name!r}", "error_class": "not_found"})
            return False
        return True

    def do_GET(self) -> None:
        self._arrived()
        parts, name = self._route()
        config = self.server.config
        now = time.time()
        if parts == ["v1", "apps"]:
            apps = [app_health_from_files(config, app, now) for app in config.apps]
            self._send(200, {"apps": apps})
        elif len(parts) == 3 and parts[:2] == ["v1", "apps"]:
            if not self._known(name):
                return
            assert name is not None
            try:
                record = load_record(token_path(config.state_dir, name), name)[0]
            except TokenUnavailable as exc:
                self._send(503, {"error": f"no valid token: {exc.reason}",
                                 "error_class": "unavailable"})
                return
            if record.expires_at <= now:
                self._send(503, {"error": "the token has expired", "error_class": "unavailable"})
                return
            self._send(200, _token_body(record, now))
        else:
            self._send(404, {"error": "not found", "error_class": "not_found"})

    def _body(self) -> str | None:
        """The reported token from the body; _BadRequest for anything but {} or
        {"invalid_token": "<non-empty string>"} sent with a valid Content-Length."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _BadRequest(411, "chunked bodies are not accepted: send Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise _BadRequest(411, "Content-Length is required (use -d '{}' with curl)")
        raw_length = lengths[0].strip()
        if len(lengths) > 1 or not (raw_length.isascii() and raw_length.isdigit()):
            raise _BadRequest(400, "Content-Length must be one number of bytes")
        length = int(raw_length)
        if length > MAX_BODY:
            raise _BadRequest(413, f"the body may be at most {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            raise _BadRequest(400, "the body is shorter than its Content-Length")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise _BadRequest(400, 'body must be {"invalid_token": "…"}') from None
        if not isinstance(body, dict):
            raise _BadRequest(400, 'body must be {"invalid_token": "…"}')
        invalid = body.get("invalid_token")
        if invalid is None:
            return None
        if not isinstance(invalid, str):
            raise _BadRequest(400, "invalid_token must be a string")
        if not invalid:
            raise _BadRequest(400, "invalid_token is empty: report the token WeChat refused, "
                                   "or send {} to refresh unconditionally")
        return invalid

    def _privileged(self) -> bool:
        """Root or the daemon's own user (SO_PEERCRED): the operator, not a token reader."""
        try:
            creds = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i"))
        except OSError:
            return False
        uid = struct.unpack("3i", creds)[1]
        return uid in (0, os.geteuid())

    def do_POST(self) -> None:
        parts, name = self._route()
        try:
            invalid = self._body()
        except _BadRequest as exc:
            self._send(exc.status, {"error": str(exc), "error_class": "bad_request"}, close=True)
            return
        finally:
            self._arrived()
        if not (len(parts) == 4 and parts[:2] == ["v1", "apps"] and parts[3] == "refresh"):
            self._send(404, {"error": "not found", "error_class": "not_found"})
            return
        if not self._known(name):
            return
        assert name is not None
        forced = self.server.force(name, invalid, self._privileged())
        if forced is None:
            self._send(503, {"error": "the daemon is stopping", "error_class": "stopping"})
            return
        self._answer(forced)

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, POST")
        raw = json.dumps({"error": f"method {self.command} not allowed",
                          "error_class": "bad_request"}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _answer(self, forced: Forced) -> None:
        now = time.time()
        if forced.state in (ForcedState.CURRENT, ForcedState.REFRESHED) and forced.record:
            self._send(200, {**_token_body(forced.record, now),
                             "refreshed": forced.state is ForcedState.REFRESHED})
            return
        answer: dict[str, Any] = {"error_class": forced.state.value}
        if isinstance(forced.error, UpstreamError):
            answer.update(error=str(forced.error), error_class=forced.error.kind.value,
                          errcode=forced.error.errcode, errmsg=forced.error.errmsg)
        elif forced.error is not None:
            answer.update(error=str(forced.error), error_class="store")
        elif forced.state is ForcedState.BUDGET:
            answer["error"] = ("the share of daily_budget passive refreshes may use is spent "
                               "(the rest is kept for scheduled refreshes)")
        elif forced.state is ForcedState.WAITING:
            answer["error"] = ("WeChat's quota is exhausted or the app has a hard error: no "
                               f"call before the wait ends in {forced.retry_after:.0f} s")
        else:
            answer["error"] = f"refresh rate-limited; retry in {forced.retry_after:.0f} s"
        if forced.retry_after:
            answer["retry_after"] = round(forced.retry_after, 1)
        self._send(HTTP_STATUS[forced.state], answer)


class ControlServer:
    """Serves the control endpoint in a background thread."""

    def __init__(self, path: str, config: Config, force: Force) -> None:
        self.path = path
        self.log = get_logger()
        self._take_over_stale_socket()
        self.server = _Server(path)
        self.server.config = config
        self.server.force = force
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
