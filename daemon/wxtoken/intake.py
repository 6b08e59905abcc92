"""Taking HTTP requests in without a thread per connection: the Open Platform's callback
(``callback_listen``) sits on it.

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
from typing import Any

from wxtoken.logs import get_logger

UNIX = "unix:"  # a Unix socket is given as ("unix:/path", 0)
SOCKET_MODE = 0o660
MAX_HEAD = 16384  # the request line and headers together (431 beyond)
REQUEST_DEADLINE = 5.0  # seconds from the connection for the whole request (WeChat waits 5 s)
WRITE_TIMEOUT = 5.0  # for an answer (a few hundred bytes: the socket buffer takes it at once)
MAX_HANDLING = 64  # whole requests handled at once, a thread each (503 beyond)
MAX_ARRIVING = 256  # connections whose request is still arriving (no thread each)...
MAX_BUFFERED = 8 << 20  # ...and their bytes, all together
BACKLOG = 1024  # connections the kernel queues until accepted (the intake accepts at once)
SLOW_NOTE_EVERY = 600.0  # seconds between callback.slow_clients lines
_HEAD_END = re.compile(rb"\r?\n\r?\n")  # the blank line after the headers


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


def request_size(head: bytes, max_body: int) -> tuple[int, bool]:
    """The length of a request (its ``head``, blank line included, and the body it announces)
    and whether the client waits for ``100 Continue`` before sending the body. A body the
    handler refuses anyway (not a POST; no, several or a bad Content-Length; chunked; over
    ``max_body``) is not waited for."""
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
            or int(raw) > max_body:
        return len(head), False
    # an HTTP/1.0 client's Expect is ignored (RFC 9110 10.1.1): it sends its body anyway
    expects = headers.get("Expect", "").lower() == "100-continue" and \
        not line.rstrip().endswith(b"HTTP/1.0")
    return len(head) + int(raw), expects


def refusal(status: int, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def close_socket(sock: socket.socket, answer: bytes = b"") -> None:
    """Answer (best effort: never blocks) and close, FIN first, as socketserver does."""
    with contextlib.suppress(OSError):
        if answer:
            sock.send(answer)
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def _listener(listen: tuple[str, int]) -> tuple[socket.socket, str | None]:
    """The listening socket for ``listen`` (``("unix:/path", 0)`` for a Unix socket), and the
    Unix socket's path (None for TCP). OSError (the daemon's ConfigError) when it cannot be
    had."""
    host, port = listen
    if port == 0 and host.startswith(UNIX):
        path = host[len(UNIX):]
        take_over_stale_socket(path)
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


def take_over_stale_socket(path: str) -> None:
    """A socket a crash left at ``path`` is removed; a live one, or another file, is an
    OSError (nothing is removed; the caller's message names the path). The control socket's
    and the callback's."""
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


class IntakeServer(socketserver.BaseServer):
    """The listener and the one thread that takes requests in (the module's docstring says
    how); each whole request is answered by ``handler(sock, peer, server, data)`` on a thread
    of its own. ``name`` prefixes the log events (``<name>.slow_clients``). Its loop is
    serve(), not socketserver's."""

    def __init__(self, listen: tuple[str, int], handler: Any, name: str,
                 max_body: int) -> None:
        self.listener, self.path = _listener(listen)
        super().__init__(self.listener.getsockname(), handler)
        if self.path is not None:
            st = os.stat(self.path)
            self._inode: tuple[int, int] = (st.st_dev, st.st_ino)
        self.listener.setblocking(False)
        self.name, self.max_body = name, max_body
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
                    self.log.error(f"{self.name}.crashed", error=str(exc) or type(exc).__name__)
                    if isinstance(key.data, _Arriving) \
                            and self._arriving.get(key.data.sock) is key.data:
                        self._forget(key.data)
                        close_socket(key.data.sock)
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
            close_socket(a.sock)
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
                close_socket(a.sock, refusal(431, f"the request line and headers may be at most "
                                             f"{MAX_HEAD} bytes"))
                return
            a.size, expects = request_size(bytes(a.data[:end.end()]),
                                             self.max_body)
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
            close_socket(a.sock, refusal(503, "busy; retry shortly"))
            return
        thread = threading.Thread(target=self._handle, args=(a.sock, a.peer, bytes(a.data)),
                                  name=f"{self.name}-request", daemon=True)
        with self._handlers_lock:
            self._handlers.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had now
            with self._handlers_lock:
                self._handlers.discard(thread)
            self._slots.release()
            close_socket(a.sock, refusal(503, "busy; retry shortly"))

    def _forget(self, a: _Arriving) -> None:
        self._selector.unregister(a.sock)
        del self._arriving[a.sock]
        self._buffered -= len(a.data)

    def _drop(self, a: _Arriving) -> None:
        """Close an arriving request unfinished, to make room (the oldest goes)."""
        self._forget(a)
        close_socket(a.sock, refusal(503, "too many requests arriving; retry shortly"))
        self._dropped += 1

    def _expire(self, now: float) -> None:
        while self._arriving:  # oldest first: deadlines come in accept order
            a = next(iter(self._arriving.values()))
            if a.deadline > now:
                return
            self._forget(a)
            close_socket(a.sock, refusal(408, f"the request did not arrive whole within "
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
        self.log.warning(f"{self.name}.slow_clients", timed_out=self._late, dropped=self._dropped,
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
            self.RequestHandlerClass(sock, peer, self, data)  # type: ignore[call-arg,arg-type]
        except Exception:  # noqa: S110 - a client that went away; the handler logs the rest
            pass
        finally:
            close_socket(sock)
            self._slots.release()
            with self._handlers_lock:
                self._handlers.discard(threading.current_thread())

    # -- from the daemon's thread -----------------------------------------------------------
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
            close_socket(a.sock)
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
