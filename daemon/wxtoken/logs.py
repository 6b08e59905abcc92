"""structlog configured in one place: console, JSON, or journald entries.

Under systemd (log_format "journal", or "auto" when stderr is the journal stream) each entry goes
to journald over its native protocol (journal.py): MESSAGE is the logfmt line, with PRIORITY,
SYSLOG_IDENTIFIER=wxtoken, EVENT and every simple key as a field of its own (APP, APPID,
ERRCODE…), so ``journalctl -u wxtoken APP=main`` selects an app. When journald cannot take an
entry it is written to the stream instead as ``<N>`` + the same line (never both).

Stable keys: event, app, appid, api, expires_in, took_ms, errcode, errmsg, attempt, next_in;
rid (WeChat's request id of a failed call, for `wxtoken rid`).
Secrets never appear: every secret the config resolved is registered here and scrubbed from any
value as a last line of defence; tokens are logged only through :func:`mask`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, NamedTuple, TextIO

import structlog

from wxtoken import journal

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
IDENTIFIER = "wxtoken"
_secrets: set[str] = set()
_journal: journal.Journal | None = None  # the socket of the last configure("journal")


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


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_scrubbed(item) for item in value)
    if type(value) is dict:
        return {key: _scrubbed(item) for key, item in value.items()}
    return value


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every registered secret out of every value (strings, and strings inside lists, tuples,
    sets and dicts) before any renderer sees it: the journal's fields, its MESSAGE and the
    stream's lines all come from the scrubbed values."""
    if _secrets:
        for key, value in event.items():
            event[key] = _scrubbed(value)
    return event


class _Entry(NamedTuple):
    """One journal entry: the stream's ``<N>`` line is priority + message."""

    priority: int
    message: str
    fields: list[tuple[str, str]]


def _journal_line(method: str, event: MutableMapping[str, Any]) -> tuple[int, str]:
    """The priority and the logfmt line (event first) of an entry; takes ``level`` and
    ``event`` out of ``event`` (the renderer pops what it orders)."""
    level = str(event.pop("level", method))
    body = structlog.processors.LogfmtRenderer(key_order=["event"], drop_missing=True)(
        None, method, event)
    return _PRIORITY.get(level, 6), body


def _journal_fields(event: Mapping[str, Any]) -> list[tuple[str, str]]:
    """EVENT, APP, APPID, ERRCODE…: a field for every key whose value is a string, number or
    bool (lists and dicts are in MESSAGE only)."""
    fields = []
    for key, value in event.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text = str(value)
        else:
            continue
        name = journal.field_name(str(key))
        if name is not None:
            fields.append((name, text))
    return fields


def _journal_entry(_: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    own = _journal_fields({k: v for k, v in event.items() if k != "level"})
    priority, message = _journal_line(method, event)
    fields = [("MESSAGE", message), ("PRIORITY", str(priority)),
              ("SYSLOG_IDENTIFIER", IDENTIFIER), *own]
    return (_Entry(priority, message, fields),), {}


class _JournalLogger:
    """Sends each entry to journald; an entry journald did not take goes to the stream as the
    ``<N>`` line journald's stream reader understands, so nothing is lost or logged twice."""

    def __init__(self, sink: journal.Journal, stream: TextIO) -> None:
        self._journal = sink
        self._fallback = structlog.PrintLogger(stream)

    def msg(self, entry: _Entry) -> None:
        if not self._journal.send(journal.encode(entry.fields)):
            self._fallback.msg(f"<{entry.priority}>{entry.message}")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def __call__(self, *_: Any) -> _JournalLogger:  # its own logger factory
        return self


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


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None,
              journal_socket: str = journal.SOCKET) -> str:
    """Set up structlog for the whole process; return the format chosen. ``journal_socket``
    is journald's native socket, for the "journal" format."""
    global _journal
    out = stream or sys.stderr
    fmt = resolve_format(log_format, out)
    shared: list[Any] = [structlog.processors.add_log_level, _scrub]
    renderer: Any
    factory: Any = structlog.PrintLoggerFactory(out)
    if _journal is not None:
        _journal.close()
        _journal = None
    if fmt == "journal":
        processors = [*shared, _journal_entry]
        _journal = journal.Journal(journal_socket)
        factory = _JournalLogger(_journal, out)  # one logger (and socket) for the process
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
        logger_factory=factory,
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
