"""The ``[redis]`` table: where the fleet's Redis is and how to log in, the key prefix, the lease,
Sentinel, and the SDK key layouts to mirror tokens into. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from wxtoken.configcheck import Checker, check_port, digits, inline_secret_problem, resolve_secret

MIRRORS = ("wechatpy", "wxjava", "silenceper")
# each SDK's own default prefix (see fleet/mirror.py for where each comes from)
MIRROR_PREFIXES = {"wechatpy": "wechatpy", "wxjava": "wx",
                   "silenceper": "gowechat_officialaccount_"}
SCHEMES = ("redis", "rediss", "unix")
REDIS_KEYS = frozenset({
    "url", "password_file", "password_env", "password_credential", "key_prefix",
    "lease_timeout", "overlap", "sentinels", "service_name", "sentinel_password_file",
    "sentinel_password_env", "sentinel_password_credential", "mirror",
    *(f"{sdk}_prefix" for sdk in MIRRORS),
})


@dataclass(frozen=True)
class RedisConfig:
    """The ``[redis]`` table, resolved."""

    url: str = field(repr=False)  # may carry a password (allowed only in a private config)
    password: str | None = field(default=None, repr=False)
    password_source: str = ""
    username: str | None = None
    key_prefix: str = "wxtoken"
    lease_timeout: float | None = None  # None: derived from renew_before (see lease_for)
    # how long WeChat keeps accepting a token after a newer one was issued (~5 minutes): a
    # token a late fetch may have retired is checked again this long (+30 s) after
    overlap: float = 300.0
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    mirror: tuple[str, ...] = ()
    mirror_prefixes: tuple[tuple[str, str], ...] = ()

    def mirror_prefix(self, sdk: str) -> str:
        return dict(self.mirror_prefixes).get(sdk, MIRROR_PREFIXES[sdk])


def lease_for(renew_before: float, deadline: float) -> float:
    """The lease a refresher holds while it decides and calls WeChat: half of renew_before, so
    that a holder that died is replaced well before the token gets close to expiry, and
    always longer than one upstream call (it is extended while the call runs)."""
    return max(renew_before / 2, deadline + 0.5)


def _check_sentinel(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not digits(port) or not 0 < int(port) < 65536:
        return f"must be \"host:port\", not {value!r}"
    return None


def _hidden(url: str) -> str:
    """The URL as it may be printed: no password."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{head}://{user}{':***' if ':' in userinfo else ''}@{host}"


def _url_problem(parts: Any, sentinels: bool) -> str | None:
    """What is wrong with a parsed redis://, rediss:// or unix:// URL (None: nothing)."""
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix:// URL needs the socket's path"
        query = parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"db"} or any(not digits(v) for v in query.get("db", ["0"])):
            return "a unix:// URL takes only ?db=<number>"
        return None
    if parts.query or parts.fragment:
        # redis-py would take any query argument as a connection option (TLS checks, timeouts)
        return "takes no query options (the db is the path: redis://host:6379/0)"
    if parts.path.strip("/") and not digits(parts.path.strip("/")):
        return f"the db must be a number, not {parts.path.strip('/')!r}"
    if not sentinels and not parts.hostname:
        return "needs a host (or sentinels, which name the master)"
    return check_port(parts.netloc.rsplit("@", 1)[-1])


def _check_prefix(value: str) -> str | None:
    if any(c in value for c in "{} \t\r\n") or not value.isprintable():
        return f"must not contain braces, spaces or control characters: {value!r}"
    return None


def parse_redis(ck: Checker, table: Any, config_mode: int, renew_before: float,
                deadline: float, resolve_secrets: bool) -> RedisConfig | None:
    """Validate the ``[redis]`` table (problems on the checker)."""
    p = "redis."
    if not isinstance(table, dict):
        ck.bad("redis", "must be a table")
        return None
    n_before = len(ck.problems)
    ck.unknown(table, REDIS_KEYS, p)
    url = ck.string(table, "url", p) or ""
    username: str | None = None
    url_password: str | None = None
    sentinels: list[tuple[str, int]] = []
    for item in ck.strings(table, "sentinels", p):
        if problem := _check_sentinel(item):
            ck.bad(p + "sentinels", problem)
        else:
            host, _, port = item.rpartition(":")
            sentinels.append((host.strip("[]"), int(port)))
    if not url:
        ck.bad(p + "url", "is required (redis://, rediss:// or unix://)")
    else:
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in SCHEMES:
            ck.bad(p + "url", "must be a redis://, rediss:// or unix:// URL, not "
                   f"{_hidden(url)!r}")
        else:
            username = unquote(parts.username) if parts.username else None
            url_password = unquote(parts.password) if parts.password else None
            if (problem := _url_problem(parts, "sentinels" in table)) is not None:
                ck.bad(p + "url", problem)
            if url_password is not None and (problem := inline_secret_problem(config_mode,
                                                                              "password")):
                ck.bad(p + "url", problem)
    service_name = ck.string(table, "service_name", p)
    if "sentinels" in table and not service_name:
        ck.bad(p + "service_name", "is required with sentinels (the master's name)")
    elif service_name and "sentinels" not in table:
        ck.bad(p + "service_name", "only with sentinels")
    password, source = None, ""
    sentinel_password = None
    if resolve_secrets:
        password, source = resolve_secret(ck, table, p, "password", config_mode, inline=False,
                                          required=False)
        if password is not None and url_password is not None:
            ck.bad(p + "url", "has a password, and so does " + source.split("=")[0]
                   + ": keep one")
        sentinel_password, _ = resolve_secret(ck, table, p, "sentinel_password", config_mode,
                                              inline=False, required=False)
    prefix = ck.string(table, "key_prefix", p, "wxtoken", _check_prefix) or "wxtoken"
    lease: float | None = None
    overlap = ck.number(table, "overlap", 300.0, 1.0, 3600.0, prefix=p)
    if "lease_timeout" in table:
        before = len(ck.problems)
        lease = ck.number(table, "lease_timeout", 0.0, 0.0, 86400.0, prefix=p)
        if len(ck.problems) == before and not deadline < lease < renew_before:
            ck.bad(p + "lease_timeout", f"must lie between the upstream call's deadline "
                   f"({deadline:g} s) and renew_before ({renew_before:g} s), not {lease:g}")
    elif not deadline < lease_for(renew_before, deadline) < renew_before:
        ck.bad(p + "lease_timeout", f"renew_before ({renew_before:g} s) leaves no room for a "
               f"lease longer than one upstream call ({deadline:g} s): raise renew_before")
    mirror = ck.strings(table, "mirror", p, MIRRORS)
    prefixes = []
    for sdk in MIRRORS:
        value = ck.string(table, f"{sdk}_prefix", p, None, _check_prefix)
        if value is not None:
            prefixes.append((sdk, value))
    if len(ck.problems) > n_before:
        return None
    return RedisConfig(
        url=url, password=password if password is not None else url_password,
        password_source=source or ("url" if url_password else ""), username=username,
        key_prefix=prefix, lease_timeout=lease, overlap=overlap, sentinels=tuple(sentinels),
        service_name=service_name, sentinel_password=sentinel_password, mirror=mirror,
        mirror_prefixes=tuple(prefixes))
