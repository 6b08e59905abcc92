"""Connecting to the fleet's Redis (standalone, TLS, a Unix socket, or a master found through
Sentinel), with short timeouts: every Redis command is bounded, so Redis trouble never stalls a
refresh for long. redis-py's own Sentinel support does the failover."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from wxtoken.fleet.config import RedisConfig

COMMAND_TIMEOUT = 2.0  # seconds for one command (connect included)
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError,
                                             redis.exceptions.ReadOnlyError,
                                             redis.exceptions.BusyLoadingError)


def _options(cfg: RedisConfig, ca_bundle: str | None, tls: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": COMMAND_TIMEOUT, "socket_connect_timeout": COMMAND_TIMEOUT,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.1), 1),
        "health_check_interval": 30, "client_name": "wxtoken",
    }
    if cfg.password is not None:
        options["password"] = cfg.password
    if cfg.username is not None:
        options["username"] = cfg.username
    if tls:  # always verified: the top-level ca_bundle, or the system's CAs
        options.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True)
        if ca_bundle:
            options["ssl_ca_certs"] = ca_bundle
    return options


def connect(cfg: RedisConfig, ca_bundle: str | None = None) -> redis.Redis:
    """A client for the fleet's Redis (it connects on first use)."""
    parts = urlsplit(cfg.url)
    tls = parts.scheme == "rediss"
    options = _options(cfg, ca_bundle, tls)
    if cfg.sentinels:
        db = int((parts.path or "/0").strip("/") or 0)
        sentinel_options: dict[str, Any] = {"socket_timeout": COMMAND_TIMEOUT,
                                            "socket_connect_timeout": COMMAND_TIMEOUT}
        password = cfg.sentinel_password if cfg.sentinel_password is not None else cfg.password
        if password is not None:
            sentinel_options["password"] = password
        if tls:
            sentinel_options.update({k: v for k, v in options.items() if k.startswith("ssl")})
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(cfg.sentinels), sentinel_kwargs=sentinel_options, **options)
        assert cfg.service_name is not None
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            cfg.service_name, db=db)
        return client
    if parts.scheme == "unix":
        db = int(parse_qs(parts.query).get("db", ["0"])[0])
        return redis.Redis(unix_socket_path=parts.path, db=db, **options)
    options.pop("ssl", None)  # rediss:// already picks the TLS connection class
    return redis.Redis.from_url(cfg.url, **options)


def accepts_anyone(cfg: RedisConfig, ca_bundle: str | None = None) -> bool:
    """Whether this Redis runs commands for a client that did not authenticate: then any
    process that reaches it could write a token record."""
    if cfg.password is None:
        return True  # we got in without a password
    parts = urlsplit(cfg.url)
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()  # no user, password
    anonymous = RedisConfig(url=bare, username=None, sentinels=cfg.sentinels,
                            service_name=cfg.service_name,
                            sentinel_password=cfg.sentinel_password or cfg.password)
    client = connect(anonymous, ca_bundle)
    try:
        client.ping()
    except redis.AuthenticationError:
        return False
    except redis.ResponseError as exc:
        return "NOAUTH" not in str(exc)
    except REDIS_ERRORS:
        return False
    finally:
        client.close()
    return True


def text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes: the client does not decode)."""
    return value.decode() if isinstance(value, bytes) else value


def clock_offset(client: redis.Redis) -> tuple[float, float]:
    """(Redis TIME minus this host's clock, the measurement's uncertainty), in seconds."""
    before = time.time()
    seconds, micros = client.time()
    after = time.time()
    return seconds + micros / 1e6 - (before + after) / 2, (after - before) / 2
