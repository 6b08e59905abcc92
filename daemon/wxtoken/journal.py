"""systemd's native journal protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/), client side.

One datagram to journald's socket is one entry: a ``KEY=value\\n`` line per field, or, for a
value holding a newline, ``KEY\\n``, its length as a little-endian 64-bit integer, the value and
``\\n``. An entry too large for a datagram goes in a sealed memfd passed with SCM_RIGHTS (the
datagram itself empty). Standard library only; logs.py decides what the fields are.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Iterable

SOCKET = "/run/systemd/journal/socket"
# Entries larger than this go through a memfd. The socket's default send buffer (wmem_default,
# 208 KiB) bounds a datagram; staying well under it makes the choice the same on every host.
INLINE_MAX = 128 * 1024
# A longer value is cut (journald would keep it; a megabyte of one log field helps nobody).
VALUE_MAX = 1024 * 1024
# How long one entry may wait for room in journald's queue before it goes to the stream instead.
SEND_TIMEOUT = 1.0
# Fields journald or journalctl give a meaning: a log key that would land on one is prefixed.
RESERVED = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO",
    "INVOCATION_ID", "USER_INVOCATION_ID", "SYSLOG_FACILITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID",
    "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "DOCUMENTATION", "TID", "UNIT", "USER_UNIT",
})
_INVALID = re.compile(r"[^A-Z0-9_]")


def field_name(key: str) -> str | None:
    """A journal field name for a log key: upper case, [A-Z0-9_] only, not starting with ``_``
    (journald's trusted fields) or a digit, at most 64 characters; None when nothing is left.
    A key that would name one of journald's own fields (``unit``, ``tid``…) gets ``WXTOKEN_``."""
    name = _INVALID.sub("_", key.upper()).lstrip("_0123456789")
    if not name:
        return None
    if name in RESERVED or name.startswith(("OBJECT_", "COREDUMP_")):
        name = "WXTOKEN_" + name
    return name[:64]


def clip(data: bytes) -> bytes:
    """``data`` cut to :data:`VALUE_MAX` bytes on a character boundary, saying how much went."""
    if len(data) <= VALUE_MAX:
        return data
    kept = data[:VALUE_MAX - 64].decode("utf-8", "ignore").encode()
    return kept + f"… [{len(data) - len(kept)} more bytes cut]".encode()


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """One entry in the native format; ``fields`` must have valid names (:func:`field_name`)."""
    out = bytearray()
    for name, value in fields:
        data = clip(value.encode("utf-8", "replace"))
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """A connection to journald's socket that sends entries and says whether each arrived.

    :meth:`send` never raises: False means the caller should write the entry elsewhere (no
    socket, journald gone, or its queue full for :data:`SEND_TIMEOUT`). A journald that
    restarted is reconnected to on the next entry.
    """

    def __init__(self, path: str = SOCKET, timeout: float = SEND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, payload: bytes) -> bool:
        for _attempt in range(2):  # a socket connected to a journald that restarted: once more
            sock = self._connect()
            if sock is None:
                return False
            try:
                if len(payload) <= INLINE_MAX:
                    try:
                        sock.send(payload)
                        return True
                    except OSError as exc:
                        if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                            raise
                self._send_memfd(sock, payload)
                return True
            except TimeoutError:  # journald's queue stayed full
                return False
            except OSError:
                self._drop(sock)
        return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _connect(self) -> socket.socket | None:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(self.timeout)  # connected: a full queue is waited on by poll
                try:
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    return None
                self._sock = sock
            return self._sock

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None
        sock.close()

    @staticmethod
    def _send_memfd(sock: socket.socket, payload: bytes) -> None:
        fd = os.memfd_create("wxtoken-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            # journald takes only sealed memfds (Linux only, as the rest: looked up here)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)
