"""Reading a request body by its Content-Length, the one way both of the daemon's HTTP servers
(the control socket, the Open Platform's callback) take one: no chunked body, exactly one
length, a cap, and optionally a deadline for a body that trickles in."""

from __future__ import annotations

import time
from email.message import Message
from typing import Any


class BodyError(Exception):
    """The body cannot be taken: answer ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_body(headers: Message, rfile: Any, limit: int, deadline: float | None = None,
              chunked: str = "Content-Length is required",
              missing: str = "Content-Length is required") -> bytes:
    """The body of at most ``limit`` bytes; ``deadline``: seconds it may take to arrive (read
    as it comes); ``chunked`` and ``missing``: the 411 answers' words."""
    if headers.get("Transfer-Encoding") is not None:
        raise BodyError(411, chunked)
    lengths = headers.get_all("Content-Length") or []
    if not lengths:
        raise BodyError(411, missing)
    raw = lengths[0].strip()
    if len(lengths) > 1 or not (raw.isascii() and raw.isdigit()):
        raise BodyError(400, "Content-Length must be one number of bytes")
    length = int(raw)
    if length > limit:
        raise BodyError(413, f"the body may be at most {limit} bytes")
    if deadline is None:
        body: bytes = rfile.read(length) if length else b""
        if len(body) < length:
            raise BodyError(400, "the body is shorter than its Content-Length")
        return body
    end = time.monotonic() + deadline
    body = b""
    while len(body) < length:
        if time.monotonic() > end:
            raise BodyError(408, "the body did not arrive in time")
        chunk = rfile.read1(length - len(body))
        if not chunk:
            raise BodyError(400, "the body is shorter than its Content-Length")
        body += chunk
    return body
