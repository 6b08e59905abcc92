"""The Open Platform's callback endpoint: ``POST /components/<NAME>/callback`` on
``callback_listen``, the URL a platform registers with WeChat as its authorization event URL
(授权事件接收URL), meant to sit behind the platform's nginx: on loopback (``"127.0.0.1:8089"``)
or on a Unix socket (``"unix:/run/wxtoken-callback/callback.sock"``).

WeChat sends ``?timestamp=&nonce=&encrypt_type=aes&msg_signature=`` and
``<xml><AppId>…</AppId><Encrypt>…</Encrypt></xml>``. The signature is verified, the message
decrypted (and checked to be for this component), and ``success`` answered at once (WeChat
retries what is not answered within 5 s); the work an event needs (exchanging an authorization
code) runs after the answer.

Refused with a 4xx and a warning, never a traceback: an unknown path (404), a method other than
POST (405), no Content-Length (411), a body over 64 KiB (413), a malformed or DTD-carrying body,
a query parameter that is not printable ASCII, a timestamp that is not ASCII digits (400), a
bad signature (403), a timestamp more than 10 minutes away from this host's clock (403:
a replay). The same message again (WeChat's retry, or a replay inside the window) is answered
``success`` without being handled twice.

A message this host cannot store (the component's directory cannot be written: disk full,
read-only) is answered 503, so that WeChat pushes it again; one error line says so when it
starts, an info line when a push is handled again, nothing per push in between.

Requests are taken in by wxtoken.intake: slow clients hold no thread, a whole request must
arrive within 5 s of its connection, and ``unix:PATH`` is a Unix socket (mode 0660, the
group of its setgid directory).

"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree

from wxtoken.component.crypto import CryptoError
from wxtoken.errors import StoreError, WxtokenError
from wxtoken.httpbody import BodyError, read_body
from wxtoken.intake import UNIX, IntakeServer
from wxtoken.logs import get_logger
from wxtoken.store import store_error

if TYPE_CHECKING:
    from wxtoken.component.platform import Platform

MAX_BODY = 65536
REFUSED_LINES = 20  # callback.refused lines a minute; more are counted
MAX_SKEW = 600.0  # seconds a message's timestamp may be away from this host's clock
SEEN = 4096  # signatures remembered (duplicates inside the window are answered, not handled)


class _Refused(Exception):
    def __init__(self, status: int, reason: str, warn: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.warn = warn


class _Unstored(Exception):
    """The event could not be stored (our disk, not the sender's fault): 503."""


def parse_xml(raw: bytes) -> dict[str, str]:
    """The direct children of a WeChat XML message, as text. No DTD (entities), no nesting
    tricks: anything else is a _Refused 400."""
    if b"\x00" in raw or not raw.lstrip().startswith(b"<"):
        raise _Refused(400, "the body is not UTF-8 XML")  # (UTF-16 would hide a DTD below)
    if b"<!DOCTYPE" in raw.upper() or b"<!ENTITY" in raw.upper():
        raise _Refused(400, "a DTD in the body is refused")
    try:
        root = ElementTree.fromstring(raw)  # noqa: S314 - no DTD (checked above), <= 64 KiB
    except ElementTree.ParseError:
        raise _Refused(400, "the body is not well-formed XML") from None
    if root.tag != "xml":
        raise _Refused(400, "the body is not a WeChat <xml> message")
    return {child.tag: (child.text or "").strip() for child in root}


class _Server(IntakeServer):
    """The intake (wxtoken.intake), and what the callback's handlers share."""

    platforms: dict[str, Platform]
    seen: OrderedDict[str, float]
    seen_lock: threading.Lock
    unstored: dict[str, int]  # component -> pushes answered 503 since its store failed

    def __init__(self, listen: tuple[str, int], platforms: dict[str, Platform]) -> None:
        super().__init__(listen, _Handler, "callback", MAX_BODY)
        self.platforms = platforms
        self.seen = OrderedDict()
        self.seen_lock = threading.Lock()
        self.unstored = {}
        # refusals logged one by one: REFUSED_LINES a minute, then counted (a flood of bad
        # requests must not bury the daemon's other lines under journald's rate limit)
        self._refused_window = 0.0
        self._refused_lines = 0
        self.refused_unlogged = 0

    def note_refused(self, log: Any, **fields: Any) -> None:
        """One ``callback.refused`` warning, unless REFUSED_LINES were logged this minute:
        then the refusal is counted, and ``callback.refused_unlogged`` says how many when the
        minute is over (at the next refusal, or at stop)."""
        now = time.monotonic()
        with self.seen_lock:
            if now - self._refused_window >= 60.0:
                unlogged, self.refused_unlogged = self.refused_unlogged, 0
                self._refused_window, self._refused_lines = now, 0
            else:
                unlogged = 0
            self._refused_lines += 1
            logged = self._refused_lines <= REFUSED_LINES
            if not logged:
                self.refused_unlogged += 1
        if unlogged:
            log.warning("callback.refused_unlogged", count=unlogged,
                        reason=f"more than {REFUSED_LINES} requests a minute were refused; "
                        "these were not logged one by one")
        if logged:
            log.warning("callback.refused", **fields)


class _Handler(BaseHTTPRequestHandler):
    """Answers one request that has arrived whole (``data``); only the answer goes to the
    socket."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def __init__(self, request: socket.socket, client_address: Any, server: _Server,
                 data: bytes = b"") -> None:
        self._data = data
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._data)
        self.wfile = self.connection.makefile("wb")  # flushed by finish()

    def handle_expect_100(self) -> bool:
        return True  # the intake said 100 Continue before the body came (if it had to)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the query carries signatures; events are logged by what they do

    def _answer(self, status: int, text: str) -> None:
        raw = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        self._answer(code, message or "bad request")

    def _not_allowed(self) -> None:
        self._answer(405, "only POST")

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _body(self) -> bytes:
        try:
            return read_body(self.headers, self.rfile, MAX_BODY)  # arrived whole (or short)
        except BodyError as exc:
            raise _Refused(exc.status, exc.message) from None

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        segments = unquote(parts.path).strip("/").split("/")
        platform = None
        if len(segments) == 3 and segments[0] == "components" and segments[2] == "callback":
            platform = self.server.platforms.get(segments[1])
        log = get_logger(component=segments[1] if platform else None)
        try:
            if platform is None:
                raise _Refused(404, "no such component callback", warn=False)
            done = self._handle(platform, parse_qs(parts.query))
        except _Refused as exc:
            if exc.warn:
                self.server.note_refused(
                    log, status=exc.status, reason=str(exc),
                    peer=self.client_address[0] if self.client_address else None)
            with contextlib.suppress(OSError):
                self._answer(exc.status, str(exc))
            return
        except _Unstored as exc:
            with self.server.seen_lock:
                refused = self.server.unstored.get(segments[1], 0)
                self.server.unstored[segments[1]] = refused + 1
            if refused:  # the operator was told once; WeChat pushes every 10 minutes
                log.debug("callback.store_failed", status=503, error=str(exc))
            else:
                log.error("callback.store_failed", status=503, error=str(exc),
                          reason="WeChat's pushes are answered 503 (it pushes again) until "
                          "the component's directory can be written; not repeated per push")
            with contextlib.suppress(OSError):
                self._answer(503, "cannot store the message now")
            return
        except Exception as exc:  # a bug: an answer and an error line, not a traceback
            log.error("callback.crashed", error=str(exc) or type(exc).__name__)
            with contextlib.suppress(OSError):
                self._answer(500, "internal error")
            return
        with contextlib.suppress(OSError):
            self._answer(200, "success")
        if done is not None:
            with self.server.seen_lock:
                refused = self.server.unstored.pop(segments[1], 0)
            if refused:
                log.info("callback.store_recovered", refused=refused,
                         reason="a push was handled again")
        if done:  # a ticket every 10 minutes is routine (component.ticket_received says when
            # tickets start or stop coming); other events are news
            (log.debug if done == "ticket" else log.info)("callback.event", kind=done)

    def _handle(self, platform: Platform, query: dict[str, list[str]]) -> str | None:
        def one(name: str) -> str:
            values = query.get(name) or [""]
            if len(values) != 1 or not values[0] or len(values[0]) > 128 \
                    or not (values[0].isascii() and values[0].isprintable()):
                raise _Refused(400, f"query parameter {name} is missing or malformed")
            return values[0]

        timestamp, nonce, signature = one("timestamp"), one("nonce"), one("msg_signature")
        if not timestamp.isdigit():  # ASCII (above): '²'.isdigit() is true, int('²') fails
            raise _Refused(400, "timestamp is not a number")
        if abs(time.time() - int(timestamp)) > MAX_SKEW:
            raise _Refused(403, "the timestamp is more than 10 minutes off (a replay, or this "
                           "host's clock is wrong)")
        outer = parse_xml(self._body())
        encrypt = outer.get("Encrypt", "")
        if not encrypt:
            raise _Refused(400, "no Encrypt in the body")
        try:
            platform.crypto.verify(signature, timestamp, nonce, encrypt)
        except CryptoError as exc:
            raise _Refused(403, str(exc)) from None
        with self.server.seen_lock:
            if signature in self.server.seen:
                return None  # WeChat's retry (or a replay inside the window): handled already
        try:
            inner = parse_xml(platform.crypto.decrypt(encrypt))
        except CryptoError as exc:
            raise _Refused(400, str(exc)) from None
        if inner.get("AppId") != platform.comp.component_appid:
            raise _Refused(400, "the message is for another component_appid")
        try:
            done = platform.on_event(inner)
        except OSError as exc:
            raise _Unstored(str(store_error("write", exc.filename or platform.files.dir,
                                            exc))) from None
        except StoreError as exc:
            raise _Unstored(str(exc)) from None
        except WxtokenError as exc:
            raise _Refused(400, str(exc)) from None
        with self.server.seen_lock:
            self.server.seen[signature] = time.monotonic()
            while len(self.server.seen) > SEEN:
                self.server.seen.popitem(last=False)
        return done


class CallbackServer:
    """Serves the callback endpoint in a background thread."""

    def __init__(self, listen: tuple[str, int], platforms: dict[str, Platform]) -> None:
        self.listen = listen
        self.log = get_logger()
        self.server = _Server(listen, platforms)
        self._thread = threading.Thread(target=self.server.serve, name="callback", daemon=True)

    @property
    def port(self) -> int:
        """The TCP port (0 on a Unix socket)."""
        return 0 if self.server.path is not None else int(self.server.listener.getsockname()[1])

    @property
    def address(self) -> str:
        if self.server.path is not None:
            return UNIX + self.server.path
        host = self.listen[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self.log.info("callback.listening", address=self.address,
                      components=sorted(self.server.platforms))

    def stop(self) -> None:
        """Stop taking requests; requests being handled get a few seconds to finish (a ticket
        being stored is not cut short)."""
        if self._thread.is_alive():
            self.server.stop()
            self._thread.join(10)
        self.server.close(wait=5.0)
        if self.server.refused_unlogged:
            get_logger().warning("callback.refused_unlogged", count=self.server.refused_unlogged,
                                 reason=f"more than {REFUSED_LINES} requests a minute were "
                                 "refused; these were not logged one by one")
