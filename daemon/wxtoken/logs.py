"""structlog configured in one place: console, JSON, or journald lines with ``<N>`` priorities.

Stable keys: event, app, appid, api, expires_in, took_ms, errcode, errmsg, attempt, next_in;
rid (WeChat's request id of a failed call, for `wxtoken rid`).
Secrets never appear: every secret the config resolved is registered here and scrubbed from any
value as a last line of defence; tokens are logged only through :func:`mask`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_secrets: set[str] = set()


def mask(token: str | None) -> str:
    """A token shortened to a prefix that identifies it in logs without being usable."""
    if not token:
        return ""
    return token[:6] + "…"


def register_secrets(secrets: Iterable[str]) -> None:
    _secrets.update(s for s in secrets if len(s) >= 4)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ***."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event.items():
            if isinstance(value, str):
                for secret in _secrets:
                    if secret in value:
                        value = value.replace(secret, "***")
                event[key] = value
    return event


def _journal_renderer(_: Any, method: str, event: MutableMapping[str, Any]) -> str:
    level = str(event.pop("level", method))
    body = structlog.processors.LogfmtRenderer(key_order=["event"], drop_missing=True)(
        _, method, event)
    return f"<{_PRIORITY.get(level, 6)}>{body}"


def under_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd advertised in $JOURNAL_STREAM."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def resolve_format(log_format: str, stream: TextIO) -> str:
    if log_format != "auto":
        return log_format
    if under_journal(stream):
        return "journal"
    return "console"


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Set up structlog for the whole process; return the format chosen."""
    out = stream or sys.stderr
    fmt = resolve_format(log_format, out)
    shared: list[Any] = [structlog.processors.add_log_level, _scrub]
    renderer: Any
    if fmt == "journal":
        processors = [*shared, _journal_renderer]
    elif fmt == "json":
        processors = [*shared, structlog.processors.TimeStamper(fmt="iso", utc=True),
                      structlog.processors.JSONRenderer(ensure_ascii=False)]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False)
        processors = [*shared, structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S"),
                      renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    lib = logging.getLogger("apscheduler")
    lib.handlers[:] = [_ToStructlog()]
    lib.setLevel(logging.WARNING)
    lib.propagate = False
    return fmt


class _ToStructlog(logging.Handler):
    """Sends third-party stdlib logging (APScheduler's warnings) through the same renderer."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger().bind(logger=record.name)
        level = record.levelname.lower()
        getattr(log, level if level in _PRIORITY else "warning")(record.getMessage())


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger().bind(**bind)
