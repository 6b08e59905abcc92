"""Reading a parsed TOML document: the problem collector, the value checks, and where secrets
come from. Used by config.py (the core keys and apps) and fleet/config.py (``[redis]``)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


class Checker:
    """Collects problems (one line each: file, key, problem) and warnings."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def bad(self, key: str, problem: str) -> None:
        if not key.isprintable():  # one problem, one line, whatever the key holds
            key = key.encode("unicode_escape").decode()
        self.problems.append(f"{self.path}: {key}: {problem}")

    def warn(self, key: str, problem: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {problem}")

    def unknown(self, table: dict[str, Any], allowed: frozenset[str], prefix: str) -> None:
        for key in sorted(set(table) - allowed):
            self.bad(f"{prefix}{key}", "unknown key")

    def string(self, table: dict[str, Any], key: str, prefix: str, default: str | None = None,
               check: Callable[[str], str | None] | None = None) -> str | None:
        value = table.get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, str) or not value.strip():
            self.bad(prefix + key, "must be a non-empty string")
            return default
        if check is not None and (problem := check(value)) is not None:
            self.bad(prefix + key, problem)
            return default
        return value

    def strings(self, table: dict[str, Any], key: str, prefix: str,
                choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """A list of distinct non-empty strings (from ``choices`` when given)."""
        value = table.get(key, [])
        what = f"one of {', '.join(choices)}" if choices else "non-empty strings"
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                                  for v in value):
            self.bad(prefix + key, f"must be a list of {what}")
            return ()
        if choices and (wrong := [v for v in value if v not in choices]):
            self.bad(prefix + key, f"must be a list of {what}, not {wrong[0]!r}")
            return ()
        if len(set(value)) != len(value):
            self.bad(prefix + key, "lists a value twice")
            return ()
        return tuple(value)

    def number(self, table: dict[str, Any], key: str, default: float, minimum: float,
               maximum: float, integer: bool = False, prefix: str = "") -> float:
        value: Any = table.get(key, default)
        key = prefix + key
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (integer and not isinstance(value, int))):
            self.bad(key, f"must be {'an integer' if integer else 'a number'}, not {value!r}")
            return default
        if not value >= minimum:  # also rejects NaN
            self.bad(key, f"must be at least {minimum}, not {value!r}")
            return default
        if not value <= maximum:  # also rejects inf
            self.bad(key, f"must be at most {maximum}, not {value!r}")
            return default
        return float(value)


def check_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. "http://[::1": an unclosed IPv6 address
        return f"must be an http(s) URL, not {value!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s) URL, not {value!r}"
    return check_port(parts.netloc)


def check_port(netloc: str) -> str | None:
    """A problem with the port in ``netloc`` (None when there is none, or it is fine)."""
    try:
        port = urlsplit(f"//{netloc}").port
    except ValueError:
        raw = netloc.rsplit(":", 1)[-1]
        return (f"port {raw} is out of range" if raw.isdigit() else
                f"port {raw!r} is not a number")
    if port == 0:
        return "port 0 is out of range"
    return None


def check_abs_path(value: str) -> str | None:
    if "\0" in value:
        return "must not contain a NUL character"
    return None if os.path.isabs(value) else f"must be an absolute path, not {value!r}"


def check_metrics_path(value: str) -> str | None:
    if not value.endswith(".prom"):
        return "must end in .prom (the textfile collector reads only those)"
    return check_abs_path(value)


def check_socket_path(value: str) -> str | None:
    if len(os.fsencode(value)) > 107:  # sun_path is 108 bytes with its NUL
        return "is too long for a Unix socket (at most 107 bytes)"
    return check_abs_path(value)


def check_ca(value: str) -> str | None:
    return check_abs_path(value) or (None if os.path.isfile(value) else f"no such file {value!r}")


def read_secret_file(path: str) -> str:
    # O_NONBLOCK + a regular-file check: a FIFO or device must not hang or flood the daemon
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", path)
        return fh.read(65536).decode("utf-8", "replace").strip()


def inline_secret_problem(config_mode: int, kind: str = "secret") -> str | None:
    """The one rule for every secret written inside a config file (an app's ``secret``, a
    password in the Redis URL, …): only the file's owner may be able to read the file (the
    installed layout lets the readers' group read the config)."""
    mode = stat.S_IMODE(config_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"an inline {kind} in a config file that others can read (mode {mode:04o}); "
                f"use {kind}_credential, {kind}_file or {kind}_env, or make the file readable "
                "by its owner only")
    return None


def source_keys(kind: str, inline: bool) -> tuple[str, ...]:
    """The keys a secret of ``kind`` may come from: ``<kind>_file``, ``_env``, ``_credential``
    and, when ``inline``, ``<kind>`` itself."""
    return (f"{kind}_file", f"{kind}_env", f"{kind}_credential", *((kind,) if inline else ()))


def resolve_secret(ck: Checker, table: dict[str, Any], prefix: str, kind: str,
                   config_mode: int, inline: bool, required: bool) -> tuple[str | None, str]:
    """(secret, where it came from) from the one source ``table`` names; (None, "") when none
    is named and none is required. Problems are reported on the checker."""
    keys = source_keys(kind, inline)
    sources = [key for key in keys if key in table]
    if len(sources) != 1 and (sources or required):
        ck.bad(prefix + f"{kind}_*", f"exactly one of {', '.join(keys)} is "
               + ("required" if required else "allowed")
               + (f", found {', '.join(sources)}" if sources else ""))
        return "", ""
    if not sources:
        return None, ""
    key = sources[0]
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        ck.bad(prefix + key, "must be a non-empty string")
        return "", ""
    secret = ""
    try:
        if key == kind:  # inline
            if problem := inline_secret_problem(config_mode, kind):
                ck.bad(prefix + key, problem)
                return "", ""
            return value.strip(), "inline"
        if key.endswith("_file"):
            if problem := check_abs_path(value):
                ck.bad(prefix + key, problem)
                return "", ""
            secret = read_secret_file(value)
            if os.stat(value).st_mode & (stat.S_IRGRP | stat.S_IROTH):
                ck.warn(prefix + key, f"{value} is readable by others than its owner (token "
                        "readers may be in its group); make it readable by the daemon's user "
                        "only")
        elif key.endswith("_env"):
            secret = os.environ.get(value, "").strip()
            if not secret:
                ck.bad(prefix + key, f"environment variable {value} is not set or empty")
                return "", ""
        else:  # _credential
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                ck.bad(prefix + key, "$CREDENTIALS_DIRECTORY is not set "
                       "(use LoadCredential= in the systemd unit)")
                return "", ""
            if "/" in value or "\0" in value or value in (".", ".."):
                ck.bad(prefix + key, f"must be a credential name, not a path: {value!r}")
                return "", ""
            secret = read_secret_file(os.path.join(creds, value))
    except OSError as exc:
        ck.bad(prefix + key, f"cannot read {exc.filename!r}: {exc.strerror}")
        return "", ""
    if not secret:
        ck.bad(prefix + key, f"the {kind} is empty")
    return secret, f"{key}={value}"
