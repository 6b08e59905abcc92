"""The daemon's control endpoint: HTTP/1.1 on a Unix socket (mode 0660, the daemon's group).

    GET  /v1/apps                 health of every app
    GET  /v1/apps/NAME            the app's token, expires_at, expires_in (and tickets)
    POST /v1/apps/NAME/refresh    passive refresh; body {} or {"invalid_token": "…"}
    POST /v1/reload               re-read the config (the operator only): 200, or 422 refused
    GET  /v1/apps/NAME/quota?path=/cgi-bin/…   WeChat's daily_limit, used, remain of that API
    GET  /v1/apps/NAME/rid/RID    what WeChat saw of a failed call (secrets and tokens masked)
    POST /v1/apps/NAME/clear-quota   reset the account's daily quota (the operator only)
    GET  /v1/components/NAME/APPID           an authorizer's (or the component's) token
    POST /v1/components/NAME/APPID/refresh   passive refresh of it, as for an app
    POST /v1/components/NAME/ticket          {"ticket": "…"}: a component_verify_ticket (the
                                             operator only)
    POST /v1/components/NAME/import          JSON lines of refresh tokens (the operator only)

Usable with ``curl --unix-socket /run/wxtoken/control.sock http://localhost/v1/apps``.

Any member of the group can connect, so nothing a client sends may cost the daemon more than a
little: at most ``MAX_CONNECTIONS`` at once and ``MAX_PER_USER`` per user (more are answered 503
at once; a few more are kept for the operator), each request must arrive whole within
``READ_TIMEOUT`` seconds with at most ``MAX_HEAD`` bytes of request line and headers (431 beyond),
bodies need a Content-Length of at most ``MAX_BODY`` bytes (400 bad, 411 missing or chunked, 413
too large), the health list is computed at most once a second, quota and rid lookups (each an
upstream call) are limited per app, and no request ever ends in a traceback. The peer's
credentials (SO_PEERCRED) tell the operator (root, or the daemon's own user) from a token
reader: only the operator may reload or reset the quota.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wxtoken.config import Config
from wxtoken.control_routes import Force, Handler, Reload, peer_uid
from wxtoken.health import app_health_from_files
from wxtoken.intake import take_over_stale_socket
from wxtoken.logs import get_logger
from wxtoken.quota import Operations

if TYPE_CHECKING:
    from wxtoken.component.platform import Platform

SOCKET_MODE = 0o660
MAX_CONNECTIONS = 32  # token readers' connections at once, all users together...
MAX_PER_USER = 16  # ...and of one user
OPERATOR_CONNECTIONS = 4  # more, for root and the daemon's user only
HEALTH_TTL = 1.0  # GET /v1/apps reads every app's files: at most once a second


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


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of reports after a token change must not see EAGAIN
    current: Callable[[], Config]  # the daemon's config (a reload replaces it)
    force: Force
    reload: Reload
    ops: Operations | None = None
    platforms: dict[str, Platform] | None = None  # the Open Platform's components

    @property
    def config(self) -> Config:
        return self.current()

    def __init__(self, path: str) -> None:
        super().__init__(path, Handler, bind_and_activate=False)
        self.reaper = _Reaper()
        self.log = get_logger()
        self._slots = threading.Lock()
        self._per_user: Counter[int] = Counter()  # open connections by peer uid
        self._health: tuple[float, bytes] = (-HEALTH_TTL, b"")

    def _take_slot(self, uid: int) -> bool:
        """A connection slot for a peer: readers share MAX_CONNECTIONS, at most MAX_PER_USER
        each; the operator may use OPERATOR_CONNECTIONS more, so no reader can lock it out."""
        with self._slots:
            total = sum(self._per_user.values())
            if uid in (0, os.geteuid()):
                ok = total < MAX_CONNECTIONS + OPERATOR_CONNECTIONS
            else:
                readers = total - self._per_user[0] - self._per_user[os.geteuid()]
                ok = readers < MAX_CONNECTIONS and self._per_user[uid] < MAX_PER_USER
            if ok:
                self._per_user[uid] += 1
            return ok

    def _give_slot(self, uid: int) -> None:
        with self._slots:
            self._per_user[uid] -= 1
            if not self._per_user[uid]:
                del self._per_user[uid]

    def process_request(self, request: Any, client_address: Any) -> None:
        uid = peer_uid(request)
        if not self._take_slot(uid):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            # a thread per connection
            threading.Thread(target=self._serve, args=(request, client_address, uid),
                             daemon=True).start()
        except BaseException:
            self._give_slot(uid)
            raise

    def _serve(self, request: Any, client_address: Any, uid: int) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._give_slot(uid)

    def health_body(self) -> bytes:
        """GET /v1/apps, computed from the files at most once per HEALTH_TTL."""
        with self._slots:
            at, body = self._health
        if time.monotonic() - at < HEALTH_TTL:
            return body
        now = time.time()
        body = json.dumps({"apps": [app_health_from_files(self.config, app, now)
                                    for app in self.config.apps]}).encode()
        with self._slots:
            self._health = (time.monotonic(), body)
        return body

    def handle_error(self, request: Any, client_address: Any) -> None:
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


class ControlServer:
    """Serves the control endpoint in a background thread."""

    def __init__(self, path: str, config: Callable[[], Config], force: Force,
                 reload: Reload, ops: Operations | None = None,
                 platforms: dict[str, Platform] | None = None) -> None:
        self.path = path
        self.log = get_logger()
        take_over_stale_socket(path)
        self.server = Server(path)
        self.server.current = config
        self.server.force = force
        self.server.reload = reload
        self.server.ops = ops
        self.server.platforms = platforms
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
