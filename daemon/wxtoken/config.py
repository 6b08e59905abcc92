"""Configuration: one TOML file parsed once into frozen dataclasses.

Every problem is collected and reported together as ``ConfigError`` (one line each, naming the file,
the key and the problem). Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import enum
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from wxtoken.configcheck import (
    Checker,
    check_abs_path,
    check_ca,
    check_metrics_path,
    check_socket_path,
    check_url,
    digits,
    id_problem,
    resolve_secret,
    socket_dir_problem,
    source_keys,
)
from wxtoken.credentials import Service
from wxtoken.errors import ConfigError, WxtokenError
from wxtoken.record import (
    APP_NAME_RE,
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    TICKET_TYPES,
)
from wxtoken.redis_config import RedisConfig, parse_redis
from wxtoken.schedule import STABLE_WINDOW, call_deadline

UTF8_BOM = b"\xef\xbb\xbf"  # Notepad's UTF-8 starts with one; TOML does not allow it


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
    "daily_budget", "control_socket", "metrics_file", "redis", "apps", "callback_listen",
    "components",
})
COMPONENT_KEYS = frozenset({
    "component_appid", "tickets", *source_keys("secret", True), *source_keys("msg_token", True),
    *source_keys("encoding_aes_key", True),
})
AES_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}")  # fullmatch: 32 bytes in base64, no padding
APP_KEYS = frozenset({
    "appid", "corpid", "agentid", *SECRET_SOURCES, "api", "tickets", "file_mode", "file_group",
    "quota_watch",
})
# an API path as openapi/quota/get takes it ("cgi_path"): /cgi-bin/message/custom/send
CGI_PATH_RE = re.compile(r"/[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*")  # fullmatch
MAX_QUOTA_WATCH = 20


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
    quota_watch: tuple[str, ...] = ()  # API paths whose WeChat quota is exported as metrics

    @property
    def follower(self) -> bool:
        """In the fleet mode, an app without a secret: this host never calls WeChat for it,
        it only keeps its local file in step with the fleet's record."""
        return not self.secret_source

    @property
    def identity(self) -> str:
        """What WeChat hands one token for: appid and api, or corpid, "wecom" and agentid.
        The fleet keys its records by this, not by the local app name."""
        if self.api == Api.WECOM:
            return f"{self.appid}:wecom:{self.agentid}"
        return f"{self.appid}:{self.api}"


@dataclass(frozen=True)
class ComponentConfig:
    """One ``[components.NAME]`` table: an Open Platform (第三方平台) account, resolved."""

    name: str
    component_appid: str
    secret: str = field(repr=False)
    msg_token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    secret_source: str = ""
    tickets: tuple[str, ...] = ()  # fetched for every authorizer

    @property
    def follower(self) -> bool:
        """In the fleet mode, a component without a secret: this host never calls WeChat for
        it, it mirrors the component's and its authorizers' files from the fleet."""
        return not self.secret_source


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
    # the Open Platform's callback endpoint: (host, port), or ("unix:/path", 0)
    callback_listen: tuple[str, int] | None = None
    components: tuple[ComponentConfig, ...] = ()
    warnings: tuple[str, ...] = ()

    def component(self, name: str) -> ComponentConfig:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise WxtokenError(f"{self.path}: no component named {name!r}"
                           + (f" (configured: {', '.join(c.name for c in self.components)})"
                              if self.components else " (no [components.NAME] table)"))

    def app(self, name: str) -> AppConfig:
        for app in self.apps:
            if app.name == name:
                return app
        raise WxtokenError(f"{self.path}: no app named {name!r} "
                           f"(configured: {', '.join(a.name for a in self.apps)})")


def default_config_path() -> str:
    return os.environ.get("WXTOKEN_CONFIG") or DEFAULT_CONFIG


def _file_mode(ck: Checker, value: Any, key: str) -> int:
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


def _quota_watch(ck: Checker, value: Any, key: str, api: Api) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        ck.bad(key, 'must be a list of API paths, like ["/cgi-bin/message/custom/send"]')
        return ()
    if value and api == Api.WECOM:
        ck.bad(key, "WeCom has no quota API (openapi/quota/get is WeChat's)")
        return ()
    for path in value:
        if not CGI_PATH_RE.fullmatch(path) or ".." in path or len(path) > 200:
            ck.bad(key, f"{path!r} is not an API path (like /cgi-bin/message/custom/send: no "
                   "host, no query string)")
            return ()
    if len(set(value)) != len(value):
        ck.bad(key, "lists a path twice")
    elif len(value) > MAX_QUOTA_WATCH:
        ck.bad(key, f"at most {MAX_QUOTA_WATCH} paths")
    return tuple(value)


def _parse_app(ck: Checker, name: str, app: Any, config_mode: int,
               resolve_secrets: bool, fleet: bool) -> AppConfig | None:
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
        appid = ck.string(app, "corpid", prefix, check=lambda v: id_problem(v, "corpid")) or ""
        if "corpid" not in app:
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
        appid = ck.string(app, "appid", prefix, check=lambda v: id_problem(v, "appid")) or ""
        if "appid" not in app:
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
    watch = _quota_watch(ck, app.get("quota_watch", []), prefix + "quota_watch", api)
    mode = _file_mode(ck, app.get("file_mode", 0o640), prefix + "file_mode")
    group = ck.string(app, "file_group", prefix)
    if resolve_secrets:
        # in the fleet mode an app without a secret makes this host a follower for it
        found, source = resolve_secret(ck, app, prefix, "secret", config_mode, inline=True,
                                       required=not fleet)
        secret = found or ""
    else:
        secret, source = "", next((k for k in SECRET_SOURCES if k in app), "")
    if len(ck.problems) > n_before:
        return None
    return AppConfig(name=name, api=api, appid=appid, secret=secret, secret_source=source,
                     agentid=agentid, tickets=tuple(tickets), file_mode=mode, file_group=group,
                     quota_watch=watch)


def _listen(ck: Checker, value: Any) -> tuple[str, int] | None:
    """callback_listen = "127.0.0.1:8089" (or "[::1]:8089"), or a Unix socket
    "unix:/run/wxtoken-callback/callback.sock", given as ("unix:/run/…/callback.sock", 0)."""
    shapes = '"host:port" (like "127.0.0.1:8089") or "unix:/path" (a Unix socket)'
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        ck.bad("callback_listen", f"must be {shapes}")
        return None
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if (problem := check_socket_path(path)) is not None:
            ck.bad("callback_listen", f"the socket's path {problem}" if path else
                   'must name the socket after "unix:", like "unix:/run/wxtoken-callback/'
                   'callback.sock"')
            return None
        if path.endswith("/"):
            ck.bad("callback_listen", f"must name the socket, not the directory {path!r}")
            return None
        if problem := socket_dir_problem(path):
            ck.warn("callback_listen", problem)
        return value, 0
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not digits(port) or not 0 < int(port) < 65536:
        ck.bad("callback_listen", f"must be {shapes}, with a port from 1 to 65535, not "
               f"{value!r}")
        return None
    return host, int(port)


def _parse_component(ck: Checker, name: str, table: Any, config_mode: int,
                     resolve_secrets: bool, fleet: bool) -> ComponentConfig | None:
    prefix = f"components.{name}."
    if not APP_NAME_RE.match(name):
        ck.bad(f"components.{name}", "component names may use only letters, digits, '_' and "
               "'-' (max 64)")
        return None
    if not isinstance(table, dict):
        ck.bad(f"components.{name}", "must be a table")
        return None
    before = len(ck.problems)
    ck.unknown(table, COMPONENT_KEYS, prefix)
    appid = ck.string(table, "component_appid", prefix,
                      check=lambda v: id_problem(v, "component_appid")) or ""
    if "component_appid" not in table:
        ck.bad(prefix + "component_appid", "is required")
    tickets = ck.strings(table, "tickets", prefix, TICKET_TYPES)
    found: dict[str, str] = {}
    source = ""
    for kind in ("secret", "msg_token", "encoding_aes_key"):
        if resolve_secrets:
            # in the fleet mode a component without a secret makes this host a follower
            value, where = resolve_secret(ck, table, prefix, kind, config_mode, inline=True,
                                          required=not (fleet and kind == "secret"))
            found[kind] = value or ""
            if kind == "secret":
                source = where
        else:
            found[kind] = ""
            if kind == "secret":
                source = next((k for k in source_keys(kind, True) if k in table), "")
    aes = found["encoding_aes_key"]
    if resolve_secrets and aes and not AES_KEY_RE.fullmatch(aes):
        ck.bad(prefix + "encoding_aes_key", "must be the 43 characters WeChat shows as "
               "EncodingAESKey (letters, digits, '+' and '/')")
    if len(ck.problems) > before:
        return None
    return ComponentConfig(name=name, component_appid=appid, secret=found["secret"],
                           msg_token=found["msg_token"], encoding_aes_key=aes,
                           secret_source=source, tickets=tickets)


def parse_config(doc: dict[str, Any], path: str, config_mode: int = 0o600,
                 resolve_secrets: bool = True, service: Service | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem. ``service``
    (check-config): secrets are checked as the installed service would see them."""
    ck = Checker(path, service)
    ck.unknown(doc, TOP_KEYS, "")
    state_dir = ck.string(doc, "state_dir", "", DEFAULT_STATE_DIR, check_abs_path)
    if state_dir and os.path.exists(state_dir) and not os.path.isdir(state_dir):
        ck.bad("state_dir", f"{state_dir} is not a directory")
    refresh_interval = ck.number(doc, "refresh_interval", 3600.0, 0.1, 86400)
    renew_before = ck.number(doc, "renew_before", 300.0, 0, 3600)
    api_base = ck.string(doc, "api_base", "", None, check_url)
    ca_bundle = ck.string(doc, "ca_bundle", "", None, check_ca)
    log_format = doc.get("log_format", "auto")
    if log_format not in LOG_FORMATS:
        ck.bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
        log_format = "auto"
    daily_budget = int(ck.number(doc, "daily_budget", 1000, 1, 100_000, integer=True))
    control_socket = ck.string(doc, "control_socket", "", DEFAULT_SOCKET, check_socket_path)
    if control_socket and (problem := socket_dir_problem(control_socket)):
        ck.warn("control_socket", problem)
    metrics_file = ck.string(doc, "metrics_file", "", None, check_metrics_path)
    redis: RedisConfig | None = None
    if "redis" in doc:
        redis = parse_redis(ck, doc["redis"], config_mode, renew_before,
                            call_deadline(renew_before), resolve_secrets)
    callback_listen = _listen(ck, doc.get("callback_listen"))
    if callback_listen and control_socket and callback_listen[0].startswith("unix:") and \
            os.path.normpath(callback_listen[0][5:]) == os.path.normpath(control_socket):
        ck.bad("callback_listen", "is the control socket's path (control_socket): give each "
               "its own")
    components: list[ComponentConfig] = []
    comps_doc = doc.get("components", {})
    if not isinstance(comps_doc, dict):
        ck.bad("components", "must be [components.NAME] tables")
    else:
        for name, table in comps_doc.items():
            comp = _parse_component(ck, name, table, config_mode, resolve_secrets,
                                    redis is not None)
            if comp is not None:
                if any(c.component_appid == comp.component_appid for c in components):
                    ck.bad(f"components.{name}", f"component_appid {comp.component_appid} is "
                           "already configured")
                components.append(comp)
    if components and callback_listen is None:
        ck.warn("callback_listen", "is unset: the component_verify_ticket must be handed over "
                "with `wxtoken component ticket` (or set callback_listen)")
    apps_doc = doc.get("apps")
    apps: list[AppConfig] = []
    if apps_doc is None and isinstance(comps_doc, dict) and comps_doc:
        pass  # a platform may have no apps of its own
    elif not isinstance(apps_doc, dict) or not apps_doc:
        ck.bad("apps", "at least one [apps.NAME] table (or [components.NAME]) is required")
    else:
        seen: dict[tuple[str, str, str | None], str] = {}
        for name, table in apps_doc.items():
            app = _parse_app(ck, name, table, config_mode, resolve_secrets,
                             fleet="redis" in doc)
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
    watching = [a.name for a in apps if a.quota_watch]
    if watching and not metrics_file:
        ck.warnings.append(f"{path}: apps.{watching[0]}.quota_watch: has no effect without "
                           "metrics_file (the figures are exported there); `wxtoken quota` "
                           "works without it")
    if ck.problems:
        raise ConfigError(ck.problems)
    return Config(
        path=path, apps=tuple(apps), state_dir=state_dir or DEFAULT_STATE_DIR,
        refresh_interval=float(refresh_interval), renew_before=float(renew_before),
        api_base=api_base.rstrip("/") if api_base else None, ca_bundle=ca_bundle,
        log_format=log_format, daily_budget=daily_budget,
        control_socket=control_socket or DEFAULT_SOCKET, metrics_file=metrics_file,
        redis=redis, callback_listen=callback_listen, components=tuple(components),
        warnings=tuple(ck.warnings),
    )


def load_config(path: str | None = None, resolve_secrets: bool = True,
                service: bool = False) -> Config:
    """Read and validate the config file (``$WXTOKEN_CONFIG`` or the default when path is None).

    ``resolve_secrets=False`` is for commands that only read token files: they must work for a
    member of the wxtoken group that cannot read the secrets. ``service=True`` is check-config's:
    outside the service (no ``$CREDENTIALS_DIRECTORY``) credentials come from the systemd unit,
    and the unit's user must be able to read every secret file (see credentials.py).
    """
    path = path or default_config_path()
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read()
        doc = tomllib.loads(data.removeprefix(UTF8_BOM).decode("utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the config is not UTF-8 text"]) from None
    installed = None
    if service and resolve_secrets:
        installed = Service()
    return parse_config(doc, path, mode, resolve_secrets, installed)
