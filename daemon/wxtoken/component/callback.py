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

Slow clients hold no thread. One thread takes every request in as its bytes arrive and hands
it to a handler thread only once it is whole (request line, headers, and the body its
Content-Length announces): a slowloris costs a socket and a few bytes, never one of the
MAX_HANDLING handlers (503 when all are busy). The whole request must arrive within
REQUEST_DEADLINE seconds of the connection, however it trickles (408 and closed after; no read
restarts the clock), its head within MAX_HEAD bytes (431). At most MAX_ARRIVING connections,
MAX_BUFFERED bytes in all, wait for their request; past that the one waiting longest is closed
(503), so a flood of slow connections cannot keep out a push that arrives whole at once, as
nginx sends it. One warning line at most every 10 minutes tells of connections so closed.

A Unix socket (``unix:PATH``) is made with mode 0660 in an existing directory: its group is
the daemon's, or the directory's when that directory is setgid (``2750 wxtoken www-data``, so
that nginx's group alone reaches it; the daemon need not be in that group, and under the
unit's PrivateUsers=yes could not chown to it). A socket a crash left there is replaced, a live
one or another file refused; the socket is removed at stop.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import os
import re
import resource
import selectors
import socket
import socketserver
import stat
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree

from wxtoken.component.crypto import CryptoError
from wxtoken.errors import StoreError, WxtokenError
from wxtoken.httpbody import BodyError, read_body
from wxtoken.logs import get_logger
from wxtoken.store import store_error

if TYPE_CHECKING:
    from wxtoken.component.platform import Platform

UNIX = "unix:"  # callback_listen = "unix:/path": config.py gives it as ("unix:/path", 0)
SOCKET_MODE = 0o660
MAX_BODY = 65536
MAX_HEAD = 16384  # the request line and headers together (431 beyond)
REQUEST_DEADLINE = 5.0  # seconds from the connection for the whole request (WeChat waits 5 s)
WRITE_TIMEOUT = 5.0  # for an answer (a few hundred bytes: the socket buffer takes it at once)
MAX_HANDLING = 64  # whole requests handled at once, a thread each (503 beyond)
MAX_ARRIVING = 256  # connections whose request is still arriving (no thread each)...
MAX_BUFFERED = 8 << 20  # ...and their bytes, all together
BACKLOG = 1024  # connections the kernel queues until accepted (the intake accepts at once)
SLOW_NOTE_EVERY = 600.0  # seconds between callback.slow_clients lines
REFUSED_LINES = 20  # callback.refused lines a minute; more are counted
MAX_SKEW = 600.0  # seconds a message's timestamp may be away from this host's clock
SEEN = 4096  # signatures remembered (duplicates inside the window are answered, not handled)
_HEAD_END = re.compile(rb"\r?\n\r?\n")  # the blank line after the headers


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


class _Arriving:
    """A connection whose request is still arriving: no thread, only its bytes so far."""

    __slots__ = ("data", "deadline", "peer", "scanned", "size", "sock")

    def __init__(self, sock: socket.socket, peer: Any, deadline: float) -> None:
        self.sock, self.peer, self.deadline = sock, peer, deadline
        self.data = bytearray()
        self.scanned = 0  # where the search for the end of the head goes on
        self.size: int | None = None  # head and body, once the head is in


def arriving_cap() -> int:
    """MAX_ARRIVING, or a quarter of this process's descriptors when that is less (run by hand
    under a low `ulimit -n`): a flood of connections must not take the descriptors the token
    files and the rest of the daemon need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_ARRIVING
    return max(8, min(MAX_ARRIVING, soft // 4))


def request_size(head: bytes) -> tuple[int, bool]:
    """The length of a request (its ``head``, blank line included, and the body it announces)
    and whether the client waits for ``100 Continue`` before sending the body. A body the
    handler refuses anyway (not a POST; no, several or a bad Content-Length; chunked; over
    MAX_BODY) is not waited for."""
    line, _, fields = head.partition(b"\n")
    if not line.startswith(b"POST "):
        return len(head), False
    try:
        headers = http.client.parse_headers(io.BytesIO(fields))
    except http.client.HTTPException:
        return len(head), False
    lengths = headers.get_all("Content-Length") or []
    raw = lengths[0].strip() if len(lengths) == 1 else ""
    if headers.get("Transfer-Encoding") is not None or not (raw.isascii() and raw.isdigit()) \
            or int(raw) > MAX_BODY:
        return len(head), False
    # an HTTP/1.0 client's Expect is ignored (RFC 9110 10.1.1): it sends its body anyway
    expects = headers.get("Expect", "").lower() == "100-continue" and \
        not line.rstrip().endswith(b"HTTP/1.0")
    return len(head) + int(raw), expects


def _refusal(status: int, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _close(sock: socket.socket, answer: bytes = b"") -> None:
    """Answer (best effort: never blocks) and close, FIN first, as socketserver does."""
    with contextlib.suppress(OSError):
        if answer:
            sock.send(answer)
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def _listener(listen: tuple[str, int]) -> tuple[socket.socket, str | None]:
    """The listening socket for ``callback_listen``, and the Unix socket's path (None for
    TCP). OSError (the daemon's ConfigError) when it cannot be had."""
    host, port = listen
    if port == 0 and host.startswith(UNIX):
        path = host[len(UNIX):]
        _take_over_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            try:
                # nobody can connect before listen(): the mode is right before anyone can
                os.chmod(path, SOCKET_MODE)
                sock.listen(BACKLOG)
            except BaseException:
                os.unlink(path)
                raise
        except BaseException:
            sock.close()
            raise
        return sock, path
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock, None


def _take_over_stale_socket(path: str) -> None:
    """A socket a crash left at ``path`` is removed; a live one, or another file, is an
    OSError (nothing is removed; the daemon's message names the path)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError("a file that is not a socket is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # bounded: a process that listens but does not accept (a frozen instance, its backlog
        # full) would otherwise hold the start for good
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nobody listens: left by a crash
            os.unlink(path)
            return
        except (TimeoutError, BlockingIOError):
            raise OSError("another process listens on that socket (it does not accept)") \
                from None
        except OSError as exc:
            raise OSError(f"a socket is there that cannot be tried ({exc.strerror or exc})") \
                from None
    raise OSError("another running process serves that socket")


class _Server(socketserver.BaseServer):
    """The listener and the one thread that takes requests in (the module's docstring says
    how); what the handlers share. Its loop is serve(), not socketserver's."""

    platforms: dict[str, Platform]
    seen: OrderedDict[str, float]
    seen_lock: threading.Lock
    unstored: dict[str, int]  # component -> pushes answered 503 since its store failed

    def __init__(self, listen: tuple[str, int], platforms: dict[str, Platform]) -> None:
        self.listener, self.path = _listener(listen)
        super().__init__(self.listener.getsockname(), _Handler)
        if self.path is not None:
            st = os.stat(self.path)
            self._inode: tuple[int, int] = (st.st_dev, st.st_ino)
        self.listener.setblocking(False)
        self.platforms = platforms
        self.seen = OrderedDict()
        self.seen_lock = threading.Lock()
        self.unstored = {}
        # refusals logged one by one: REFUSED_LINES a minute, then counted (a flood of bad
        # requests must not bury the daemon's other lines under journald's rate limit)
        self._refused_window = 0.0
        self._refused_lines = 0
        self.refused_unlogged = 0
        self.log = get_logger()
        self._slots = threading.BoundedSemaphore(MAX_HANDLING)
        self._arriving: OrderedDict[socket.socket, _Arriving] = OrderedDict()  # oldest first
        self.max_arriving = arriving_cap()
        self._buffered = 0  # bytes held for arriving requests
        self._handlers: set[threading.Thread] = set()
        self._handlers_lock = threading.Lock()
        self._wake, self._waker = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._stopping = False
        self._late = self._dropped = 0  # connections closed unfinished, since the last note
        self._noted = -SLOW_NOTE_EVERY

    # -- the intake thread ------------------------------------------------------------------
    def serve(self) -> None:
        """Take requests in until stop(): sleeps in select() until a connection or its bytes
        come, or the oldest arriving request's deadline passes (no polling)."""
        while not self._stopping:
            timeout = None
            if self._arriving:
                oldest = next(iter(self._arriving.values()))
                timeout = max(0.0, oldest.deadline - time.monotonic())
            for key, _ in self._selector.select(timeout):
                try:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif isinstance(key.data, _Arriving):
                        self._read(key.data)
                except Exception as exc:  # a bug: one error line, and the endpoint goes on
                    self.log.error("callback.crashed", error=str(exc) or type(exc).__name__)
                    if isinstance(key.data, _Arriving) \
                            and self._arriving.get(key.data.sock) is key.data:
                        self._forget(key.data)
                        _close(key.data.sock)
            self._expire(time.monotonic())
            self._note_slow()

    def _accept(self) -> None:
        for _ in range(64):  # then the arriving requests' bytes get their turn
            try:
                sock, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    continue  # e.g. ECONNABORTED: that client is gone, the next one
                if not self._arriving:
                    time.sleep(0.05)  # out of descriptors, none of ours to give back: no spin
                    return
                self._drop(next(iter(self._arriving.values())))
                continue
            sock.setblocking(False)
            if len(self._arriving) >= self.max_arriving:
                self._drop(next(iter(self._arriving.values())))
            arriving = _Arriving(sock, peer, time.monotonic() + REQUEST_DEADLINE)
            self._arriving[sock] = arriving
            self._selector.register(sock, selectors.EVENT_READ, arriving)

    def _read(self, a: _Arriving) -> None:
        if self._arriving.get(a.sock) is not a:
            return  # closed earlier in this round (a newer connection needed its place)
        try:
            chunk = a.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client gave up
            self._forget(a)
            _close(a.sock)
            return
        a.data += chunk
        self._buffered += len(chunk)
        if a.size is None:
            end = _HEAD_END.search(a.data, a.scanned)
            if end is None and len(a.data) <= MAX_HEAD:
                a.scanned = max(0, len(a.data) - 3)
                return
            if end is None or end.end() > MAX_HEAD:
                self._forget(a)
                _close(a.sock, _refusal(431, f"the request line and headers may be at most "
                                             f"{MAX_HEAD} bytes"))
                return
            a.size, expects = request_size(bytes(a.data[:end.end()]))
            if expects and len(a.data) < a.size:
                with contextlib.suppress(OSError):
                    a.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(a.data) >= a.size:
            self._hand_over(a)
        while self._buffered > MAX_BUFFERED:
            self._drop(next(iter(self._arriving.values())))

    def _hand_over(self, a: _Arriving) -> None:
        """The request is whole: a handler thread answers it (503 while MAX_HANDLING are)."""
        self._forget(a)
        if not self._slots.acquire(blocking=False):
            _close(a.sock, _refusal(503, "busy; retry shortly"))
            return
        thread = threading.Thread(target=self._handle, args=(a.sock, a.peer, bytes(a.data)),
                                  name="callback-request", daemon=True)
        with self._handlers_lock:
            self._handlers.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had now
            with self._handlers_lock:
                self._handlers.discard(thread)
            self._slots.release()
            _close(a.sock, _refusal(503, "busy; retry shortly"))

    def _forget(self, a: _Arriving) -> None:
        self._selector.unregister(a.sock)
        del self._arriving[a.sock]
        self._buffered -= len(a.data)

    def _drop(self, a: _Arriving) -> None:
        """Close an arriving request unfinished, to make room (the oldest goes)."""
        self._forget(a)
        _close(a.sock, _refusal(503, "too many requests arriving; retry shortly"))
        self._dropped += 1

    def _expire(self, now: float) -> None:
        while self._arriving:  # oldest first: deadlines come in accept order
            a = next(iter(self._arriving.values()))
            if a.deadline > now:
                return
            self._forget(a)
            _close(a.sock, _refusal(408, f"the request did not arrive whole within "
                                         f"{REQUEST_DEADLINE:g} s"))
            self._late += 1

    def _note_slow(self) -> None:
        """At most one line every SLOW_NOTE_EVERY seconds about connections closed before
        their request arrived (slow or stalled clients, or a flood of them), never one each."""
        if not (self._late or self._dropped):
            return
        now = time.monotonic()
        if now - self._noted < SLOW_NOTE_EVERY:
            return
        self.log.warning("callback.slow_clients", timed_out=self._late, dropped=self._dropped,
                         reason="connections closed before their request arrived whole "
                         f"(within {REQUEST_DEADLINE:g} s of connecting; slow or stalled "
                         "clients, or a flood of them); requests that arrive whole are still "
                         f"answered; at most one such line every {SLOW_NOTE_EVERY:g} s")
        self._late = self._dropped = 0
        self._noted = now

    # -- a handler thread -------------------------------------------------------------------
    def _handle(self, sock: socket.socket, peer: Any, data: bytes) -> None:
        try:
            sock.settimeout(WRITE_TIMEOUT)
            _Handler(sock, peer, self, data)
        except Exception:  # noqa: S110 - a client that went away; the handler logs the rest
            pass
        finally:
            _close(sock)
            self._slots.release()
            with self._handlers_lock:
                self._handlers.discard(threading.current_thread())

    # -- from the daemon's thread -----------------------------------------------------------
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

    def stop(self) -> None:
        """Ends serve() (it wakes at once)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._waker.send(b"x")

    def close(self, wait: float) -> None:
        """After serve() has ended: close every connection and the listener, remove the Unix
        socket (if it is still ours), and give requests being handled ``wait`` seconds."""
        for a in list(self._arriving.values()):
            self._forget(a)
            _close(a.sock)
        self._selector.close()
        self.listener.close()
        self._wake.close()
        self._waker.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
        end = time.monotonic() + wait
        with self._handlers_lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, end - time.monotonic()))


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
