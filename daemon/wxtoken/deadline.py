"""A whole-call deadline for requests (upstream.py's WeChat calls).

requests' timeouts bound each read, not the call: a server that drips a byte every few seconds
would keep it open for good. ``deadline(seconds)`` starts a timer; every socket the call's
connections open or reuse registers with it (``DeadlineAdapter``'s pools), and when the
deadline passes the timer shuts them down, so the blocked read or write returns at once and the
call fails. Name resolution happens before there is a socket; the daemon's watchdog covers a
hang there.

``Call.connected`` also says whether a connection was up (TCP, a proxy's CONNECT and the TLS
handshake done): from then on WeChat may have received, counted and answered the request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class Call:
    """The sockets one call uses, so that a timer can cut them when its deadline passes."""

    def __init__(self) -> None:
        self.expired = False
        self.connected = False  # a connection was up: the request may have reached WeChat
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket | None) -> None:
        """Watch ``sock`` through a duplicate descriptor of our own: shutting that down ends
        any read or write on the socket, even after TLS has wrapped (and detached) the
        original object, and closing it later never touches a descriptor number reused since."""
        if sock is None:
            return
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with self._lock:
            self._socks.append(dup)
            if self.expired:
                self._cut(dup)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._cut(sock)

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()


_current = threading.local()


def _attach(sock: socket.socket | None) -> None:
    call: Call | None = getattr(_current, "call", None)
    if call is not None:
        call.attach(sock)


def _connected() -> None:
    call: Call | None = getattr(_current, "call", None)
    if call is not None:
        call.connected = True


class _Connection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach(sock)
        return sock

    def connect(self) -> None:
        super().connect()  # TCP, and through a proxy its CONNECT
        _connected()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)  # a kept-alive connection: its socket predates this call
        if self.sock is not None:
            _connected()
        super().request(*args, **kwargs)


class _TLSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach(sock)  # before the handshake, which can be dripped too
        return sock

    def connect(self) -> None:
        super().connect()  # TCP, the proxy's CONNECT and the TLS handshake
        _connected()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)
        if self.sock is not None:
            _connected()
        super().request(*args, **kwargs)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter whose connections register their sockets with the current call."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> urllib3.PoolManager:
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        return manager


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Call]:
    """The call made inside the block is cut ``seconds`` from now."""
    call = Call()
    timer = threading.Timer(seconds, call.expire)
    timer.daemon = True
    _current.call = call
    timer.start()
    try:
        yield call
    finally:
        timer.cancel()
        _current.call = None
        call.close()
