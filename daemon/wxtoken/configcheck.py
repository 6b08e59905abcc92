"""Reading a parsed TOML document: the problem collector, the value checks, and where secrets
come from. Used by config.py (the core keys and apps) and redis_config.py (``[redis]``)."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wxtoken.record import DEFAULT_SOCKET

if TYPE_CHECKING:
    from wxtoken.credentials import Service

# the directory systemd creates at start for the control socket (the unit's RuntimeDirectory=)
RUNTIME_DIR = os.path.dirname(DEFAULT_SOCKET)
# what an id the operator copies from WeChat's pages looks like, and where it is shown
IDS = {
    "appid": (re.compile(r"wx[0-9a-f]{16}"), '"wx" followed by 16 lowercase hex digits',
              "the AppID on the 开发 → 基本配置 page"),
    "component_appid": (re.compile(r"wx[0-9a-f]{16}"),
                        '"wx" followed by 16 lowercase hex digits',
                        "the platform's AppID in the Open Platform's 管理中心 → 第三方平台"),
    "corpid": (re.compile(r"w[wx][0-9a-f]{16}"),
               '"ww" or "wx" followed by 16 lowercase hex digits',
               "the 企业ID on the WeCom admin's 我的企业 page"),
}


class Checker:
    """Collects problems (one line each: file, key, problem) and warnings."""

    def __init__(self, path: str, service: Service | None = None) -> None:
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []
        # check-config: the installed service, where $CREDENTIALS_DIRECTORY is not set
        self.service = service

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


def digits(text: str) -> bool:
    """Only ASCII digits: str.isdigit() is true for '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


def check_port(netloc: str) -> str | None:
    """A problem with the port in ``netloc`` (None when there is none, or it is fine)."""
    try:
        port = urlsplit(f"//{netloc}").port
    except ValueError:
        raw = netloc.rsplit(":", 1)[-1]
        return (f"port {raw} is out of range" if digits(raw) else
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


def id_problem(value: str, key: str) -> str | None:
    """What is wrong with an ``appid``, ``component_appid`` or ``corpid`` the operator typed
    (WeChat answers 40013 to any other shape, and only at run time)."""
    shape, what, where = IDS[key]
    if shape.fullmatch(value):
        return None
    if value != value.strip():
        return f"{value!r} has spaces around it (it must be {what}: {where})"
    if value.startswith("gh_"):
        return (f"{value!r} is the account's original ID (原始ID), not its AppID: {where}, "
                f"{what}")
    return f"must be {what} ({where}), not {value!r}"


def socket_dir_problem(socket: str) -> str | None:
    """Why the control socket cannot be made where it is configured (None: it can). The daemon
    makes the socket, not its directory; systemd makes /run/wxtoken (RuntimeDirectory=)."""
    directory = os.path.dirname(os.path.normpath(socket))
    if directory == RUNTIME_DIR or os.path.isdir(directory):
        return None
    if os.path.lexists(directory):
        return f"{directory} is not a directory"
    return (f"the directory {directory} does not exist (the daemon makes the socket, not its "
            f"directory; systemd makes only {RUNTIME_DIR}, the unit's RuntimeDirectory=)")


def read_secret_file(path: str) -> tuple[str, os.stat_result]:
    """The secret in ``path`` (stripped) and the file's stat (OSError naming ``path``)."""
    # O_NONBLOCK + a regular-file check: a FIFO or device must not hang or flood the daemon
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file", path)
        data = b""
        while len(data) < 65536 and (chunk := os.read(fd, 65536 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace").strip(), st


def file_secret_problem(path: str, mode: int, kind: str, credential: bool = False) -> str | None:
    """The one rule for every secret kept in a file of its own (``secret_file``, a password
    file, a credential's source): only the file's owner may read it (token readers are in the
    daemon's group)."""
    mode = stat.S_IMODE(mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"{path} is readable by others than its owner (mode {mode:04o}); make it "
                + ("readable by its owner only (chmod 0600; systemd reads it as root)"
                   if credential else "readable by its owner only (the daemon's user: chmod "
                   f"0600), or use {kind}_credential"))
    return None


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
    if key == kind:  # inline
        if problem := inline_secret_problem(config_mode, kind):
            ck.bad(prefix + key, problem)
            return "", ""
        return value.strip(), "inline"
    if key.endswith("_env"):
        secret = os.environ.get(value, "").strip()
        if not secret and ck.service is not None and \
                (given := ck.service.env_source(value)) is not None:
            # check-config outside the service: the unit hands it to the daemon, not to this
            # shell (an upgrade's check must not refuse the config for it)
            ck.warn(prefix + key, f"environment variable {value} not checked: it is not set "
                    f"here; the service gets it from its unit's {given}")
            return "", f"{key}={value} (not checked)"
        if not secret:
            ck.bad(prefix + key, f"environment variable {value} is not set or empty")
            return "", ""
        return secret, f"{key}={value}"
    if key.endswith("_file"):
        if problem := check_abs_path(value):
            ck.bad(prefix + key, problem)
            return "", ""
        return _from_file(ck, prefix + key, kind, value, f"{key}={value}")
    # _credential
    if "/" in value or "\0" in value or value in (".", ".."):
        ck.bad(prefix + key, f"must be a credential name, not a path: {value!r}")
        return "", ""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        return _from_file(ck, prefix + key, kind, os.path.join(creds, value),
                          f"{key}={value}", rules=False)
    if ck.service is None:  # run: systemd hands the credentials over, or nothing does
        ck.bad(prefix + key, "$CREDENTIALS_DIRECTORY is not set "
               "(use LoadCredential= in the systemd unit)")
        return "", ""
    # check-config outside the service: the file the unit's LoadCredential= names
    found = ck.service.credential(value)
    if found is None:
        ck.bad(prefix + key, f"wxtoken.service has no LoadCredential={value}:PATH (add one: "
               "systemctl edit wxtoken)")
        return "", ""
    if found.unchecked:
        ck.warn(prefix + key, f"credential {value!r} not checked: {found.unchecked}")
        return "", f"{key}={value} (not checked)"
    return _from_file(ck, prefix + key, kind, found.path,
                      f"{key}={value} (LoadCredential={value}:{found.path})",
                      via=f"LoadCredential={value}")


def _from_file(ck: Checker, key: str, kind: str, path: str, where: str, via: str = "",
               rules: bool = True) -> tuple[str, str]:
    """A secret read from a file: readable, a regular file, not empty. With ``rules``, only its
    owner may read it, and (check-config as root) the service's user must be able to, unless
    systemd reads it (``via`` the unit's LoadCredential=)."""
    try:
        secret, st = read_secret_file(path)
    except OSError as exc:
        ck.bad(key, f"cannot read {path!r}{f' ({via})' if via else ''}: {exc.strerror}")
        return "", ""
    if rules and (problem := file_secret_problem(path, st.st_mode, kind, credential=bool(via))):
        ck.bad(key, problem)
        return "", ""
    if not secret:
        ck.bad(key, f"the {kind} is empty" + (f" ({path}, {via})" if via else ""))
        return "", ""
    if rules and not via and ck.service is not None:
        problem, unchecked = ck.service.reader_problem(path, st, kind)
        if problem:
            ck.bad(key, problem)
            return "", ""
        if unchecked:
            ck.warn(key, f"not checked whether the service can read {path}: {unchecked}")
    return secret, where
