"""Configuration: one TOML file parsed once into frozen dataclasses.

Every problem is collected and reported together as ``ConfigError`` (one line each, naming the file,
the key and the problem). Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import enum
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from wxtoken.errors import ConfigError, WxtokenError
from wxtoken.record import (
    APP_NAME_RE,
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    TICKET_TYPES,
)
from wxtoken.schedule import STABLE_WINDOW


class Api(enum.StrEnum):
    """Which WeChat endpoint hands out an app's token."""

    TOKEN = "token"  # noqa: S105 - cgi-bin/token (a name, not a password)
    STABLE_TOKEN = "stable_token"  # noqa: S105 - cgi-bin/stable_token
    WECOM = "wecom"  # WeCom gettoken


APIS = tuple(Api)
LOG_FORMATS = ("auto", "journal", "json", "console")
SECRET_SOURCES = ("secret_file", "secret_env", "secret_credential", "secret")
TOP_KEYS = frozenset({
    "state_dir", "refresh_interval", "renew_before", "api_base", "ca_bundle", "log_format",
    "daily_budget", "control_socket", "metrics_file", "redis", "apps",
})
APP_KEYS = frozenset({
    "appid", "corpid", "agentid", *SECRET_SOURCES, "api", "tickets", "file_mode", "file_group",
})
REDIS_KEYS = frozenset({"url", "key_prefix"})


@dataclass(frozen=True)
class AppConfig:
    """One ``[apps.NAME]`` table, resolved."""

    name: str
    api: Api
    appid: str  # the corpid for api = "wecom"
    secret: str = field(repr=False)
    secret_source: str = ""  # where the secret came from, for check-config (never the secret)
    agentid: str | None = None
    tickets: tuple[str, ...] = ()
    file_mode: int = 0o640
    file_group: str | None = None


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(repr=False)  # may carry a password
    key_prefix: str = "wxtoken:"


@dataclass(frozen=True)
class Config:
    """The whole configuration file, validated."""

    path: str
    apps: tuple[AppConfig, ...]
    state_dir: str = DEFAULT_STATE_DIR
    refresh_interval: float = 3600.0
    renew_before: float = 300.0
    api_base: str | None = None
    ca_bundle: str | None = None
    log_format: str = "auto"
    daily_budget: int = 1000
    control_socket: str = DEFAULT_SOCKET
    metrics_file: str | None = None
    redis: RedisConfig | None = None
    warnings: tuple[str, ...] = ()

    def app(self, name: str) -> AppConfig:
        for app in self.apps:
            if app.name == name:
                return app
        raise WxtokenError(f"{self.path}: no app named {name!r} "
                           f"(configured: {', '.join(a.name for a in self.apps)})")


def default_config_path() -> str:
    return os.environ.get("WXTOKEN_CONFIG") or DEFAULT_CONFIG


class _Checker:
    """Collects problems while reading a parsed TOML document."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def bad(self, key: str, problem: str) -> None:
        if not key.isprintable():  # one problem, one line, whatever the key holds
            key = key.encode("unicode_escape").decode()
        self.problems.append(f"{self.path}: {key}: {problem}")

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

    def number(self, table: dict[str, Any], key: str, default: float, minimum: float,
               maximum: float, integer: bool = False) -> float:
        value: Any = table.get(key, default)
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


def _check_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. "http://[::1": an unclosed IPv6 address
        return f"must be an http(s) URL, not {value!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s) URL, not {value!r}"
    try:
        port = parts.port
    except ValueError:
        raw = parts.netloc.rsplit(":", 1)[-1]
        return (f"port {raw} is out of range" if raw.isdigit() else
                f"port {raw!r} is not a number")
    if port == 0:
        return "port 0 is out of range"
    return None


def _check_abs_path(value: str) -> str | None:
    if "\0" in value:
        return "must not contain a NUL character"
    return None if os.path.isabs(value) else f"must be an absolute path, not {value!r}"


def _check_metrics_path(value: str) -> str | None:
    if not value.endswith(".prom"):
        return "must end in .prom (the textfile collector reads only those)"
    return _check_abs_path(value)


def _check_socket_path(value: str) -> str | None:
    if len(os.fsencode(value)) > 107:  # sun_path is 108 bytes with its NUL
        return "is too long for a Unix socket (at most 107 bytes)"
    return _check_abs_path(value)


def _check_ca(value: str) -> str | None:
    return _check_abs_path(value) or (None if os.path.isfile(value) else f"no such file {value!r}")


def _read_secret_file(path: str) -> str:
    # O_NONBLOCK + a regular-file check: a FIFO or device must not hang or flood the daemon
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", path)
        return fh.read(65536).decode("utf-8", "replace").strip()


def inline_secret_problem(config_mode: int) -> str | None:
    """The one rule for a secret written inside a config file: only the file's owner may be
    able to read the file (the installed layout lets the readers' group read the config)."""
    mode = stat.S_IMODE(config_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"an inline secret in a config file that others can read (mode {mode:04o}); "
                "use secret_credential, secret_file or secret_env, or make the file readable "
                "by its owner only")
    return None


def _resolve_secret(ck: _Checker, app: dict[str, Any], prefix: str,
                    config_mode: int) -> tuple[str, str]:
    """Return (secret, description of its source); report problems on the checker."""
    sources = [key for key in SECRET_SOURCES if key in app]
    if len(sources) != 1:
        ck.bad(prefix + "secret_*", f"exactly one of {', '.join(SECRET_SOURCES)} is required"
               + (f", found {', '.join(sources)}" if sources else ""))
        return "", ""
    key = sources[0]
    value = app[key]
    if not isinstance(value, str) or not value.strip():
        ck.bad(prefix + key, "must be a non-empty string")
        return "", ""
    secret = ""
    try:
        if key == "secret":
            if problem := inline_secret_problem(config_mode):
                ck.bad(prefix + key, problem)
                return "", ""
            return value.strip(), "inline"
        if key == "secret_file":
            if problem := _check_abs_path(value):
                ck.bad(prefix + key, problem)
                return "", ""
            secret = _read_secret_file(value)
            if os.stat(value).st_mode & (stat.S_IRGRP | stat.S_IROTH):
                ck.warnings.append(f"{ck.path}: {prefix}{key}: {value} is readable by others "
                                   "than its owner (token readers may be in its group); make "
                                   "it readable by the daemon's user only")
        elif key == "secret_env":
            secret = os.environ.get(value, "").strip()
            if not secret:
                ck.bad(prefix + key, f"environment variable {value} is not set or empty")
                return "", ""
        else:  # secret_credential
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                ck.bad(prefix + key, "$CREDENTIALS_DIRECTORY is not set "
                       "(use LoadCredential= in the systemd unit)")
                return "", ""
            if "/" in value or "\0" in value or value in (".", ".."):
                ck.bad(prefix + key, f"must be a credential name, not a path: {value!r}")
                return "", ""
            secret = _read_secret_file(os.path.join(creds, value))
    except OSError as exc:
        ck.bad(prefix + key, f"cannot read {exc.filename!r}: {exc.strerror}")
        return "", ""
    if not secret:
        ck.bad(prefix + key, "the secret is empty")
    return secret, f"{key}={value}"


def _file_mode(ck: _Checker, value: Any, key: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            ck.bad(key, f"must be an octal mode like \"0640\", not {value!r}")
            return 0o640
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        ck.bad(key, f"must be an octal mode like \"0640\", not {value!r}")
        return 0o640
    if value & 0o400 == 0:
        ck.bad(key, "must let the owner read the file")
    if value & 0o002:
        ck.bad(key, "must not be writable by others")
    return int(value)


def _parse_app(ck: _Checker, name: str, app: Any, config_mode: int,
               resolve_secrets: bool) -> AppConfig | None:
    prefix = f"apps.{name}."
    if not APP_NAME_RE.match(name):
        ck.bad(f"apps.{name}", "app names may use only letters, digits, '_' and '-' (max 64)")
        return None
    if not isinstance(app, dict):
        ck.bad(f"apps.{name}", "must be a table")
        return None
    n_before = len(ck.problems)
    ck.unknown(app, APP_KEYS, prefix)
    raw_api = app.get("api", "token")
    if raw_api not in APIS:
        ck.bad(prefix + "api", f"must be one of {', '.join(APIS)}, not {raw_api!r}")
        raw_api = "token"
    api = Api(raw_api)
    agentid: str | None = None
    if api == "wecom":
        if "appid" in app:
            ck.bad(prefix + "appid", "WeCom apps use corpid and agentid, not appid")
        appid = ck.string(app, "corpid", prefix) or ""
        if not appid:
            ck.bad(prefix + "corpid", "is required for api = \"wecom\"")
        raw_agent = app.get("agentid")
        if isinstance(raw_agent, bool) or not isinstance(raw_agent, (int, str)) or not str(
                raw_agent).strip():
            ck.bad(prefix + "agentid", "is required for api = \"wecom\" (the agent's id)")
        else:
            agentid = str(raw_agent)
    else:
        for key in ("corpid", "agentid"):
            if key in app:
                ck.bad(prefix + key, "only for api = \"wecom\"")
        appid = ck.string(app, "appid", prefix) or ""
        if not appid:
            ck.bad(prefix + "appid", "is required")
    tickets = app.get("tickets", [])
    if not isinstance(tickets, list) or any(t not in TICKET_TYPES for t in tickets):
        ck.bad(prefix + "tickets", f"must be a list of {', '.join(TICKET_TYPES)}")
        tickets = []
    elif tickets and api == "wecom":
        ck.bad(prefix + "tickets", "WeCom tickets are not supported yet (only for token and "
               "stable_token apps)")
    elif len(set(tickets)) != len(tickets):
        ck.bad(prefix + "tickets", "lists a ticket type twice")
    mode = _file_mode(ck, app.get("file_mode", 0o640), prefix + "file_mode")
    group = ck.string(app, "file_group", prefix)
    if resolve_secrets:
        secret, source = _resolve_secret(ck, app, prefix, config_mode)
    else:
        secret, source = "", next((k for k in SECRET_SOURCES if k in app), "")
    if len(ck.problems) > n_before:
        return None
    return AppConfig(name=name, api=api, appid=appid, secret=secret, secret_source=source,
                     agentid=agentid, tickets=tuple(tickets), file_mode=mode, file_group=group)


def parse_config(doc: dict[str, Any], path: str, config_mode: int = 0o600,
                 resolve_secrets: bool = True) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    ck = _Checker(path)
    ck.unknown(doc, TOP_KEYS, "")
    state_dir = ck.string(doc, "state_dir", "", DEFAULT_STATE_DIR, _check_abs_path)
    refresh_interval = ck.number(doc, "refresh_interval", 3600.0, 0.1, 86400)
    renew_before = ck.number(doc, "renew_before", 300.0, 0, 3600)
    api_base = ck.string(doc, "api_base", "", None, _check_url)
    ca_bundle = ck.string(doc, "ca_bundle", "", None, _check_ca)
    log_format = doc.get("log_format", "auto")
    if log_format not in LOG_FORMATS:
        ck.bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
        log_format = "auto"
    daily_budget = int(ck.number(doc, "daily_budget", 1000, 1, 100_000, integer=True))
    control_socket = ck.string(doc, "control_socket", "", DEFAULT_SOCKET, _check_socket_path)
    metrics_file = ck.string(doc, "metrics_file", "", None, _check_metrics_path)
    redis: RedisConfig | None = None
    if "redis" in doc:
        table = doc["redis"]
        if not isinstance(table, dict):
            ck.bad("redis", "must be a table")
        else:
            ck.unknown(table, REDIS_KEYS, "redis.")
            url = ck.string(table, "url", "redis.")
            if not url:
                ck.bad("redis.url", "is required")
            prefix = ck.string(table, "key_prefix", "redis.", "wxtoken:") or "wxtoken:"
            redis = RedisConfig(url=url or "", key_prefix=prefix)
    apps_doc = doc.get("apps")
    apps: list[AppConfig] = []
    if not isinstance(apps_doc, dict) or not apps_doc:
        ck.bad("apps", "at least one [apps.NAME] table is required")
    else:
        seen: dict[tuple[str, str, str | None], str] = {}
        for name, table in apps_doc.items():
            app = _parse_app(ck, name, table, config_mode, resolve_secrets)
            if app is None:
                continue
            identity = (app.api, app.appid, app.agentid)
            if identity in seen:
                ck.bad(f"apps.{name}", f"same {app.api} credentials as apps.{seen[identity]}: "
                       "two apps would invalidate each other's tokens")
            seen[identity] = name
            apps.append(app)
    if renew_before > STABLE_WINDOW and any(a.api == Api.STABLE_TOKEN for a in apps):
        ck.warnings.append(f"{path}: renew_before: {renew_before:g} s reaches past WeChat's "
                           f"{STABLE_WINDOW:g} s stable_token window: stable_token apps renew "
                           f"within their last {STABLE_WINDOW:g} s")
    if ck.problems:
        raise ConfigError(ck.problems)
    return Config(
        path=path, apps=tuple(apps), state_dir=state_dir or DEFAULT_STATE_DIR,
        refresh_interval=float(refresh_interval), renew_before=float(renew_before),
        api_base=api_base.rstrip("/") if api_base else None, ca_bundle=ca_bundle,
        log_format=log_format, daily_budget=daily_budget,
        control_socket=control_socket or DEFAULT_SOCKET, metrics_file=metrics_file,
        redis=redis, warnings=tuple(ck.warnings),
    )


def load_config(path: str | None = None, resolve_secrets: bool = True) -> Config:
    """Read and validate the config file (``$WXTOKEN_CONFIG`` or the default when path is None).

    ``resolve_secrets=False`` is for commands that only read token files: they must work for a
    member of the wxtoken group that cannot read the secrets.
    """
    path = path or default_config_path()
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the config is not UTF-8 text"]) from None
    return parse_config(doc, path, mode, resolve_secrets)
