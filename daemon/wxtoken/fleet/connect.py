"""Connecting to the fleet's Redis (standalone, TLS, a Unix socket, or a master found through
Sentinel), with short timeouts: every Redis command is bounded, so Redis trouble never stalls a
refresh for long. redis-py's own Sentinel support does the failover; a pooled connection that
may have outlived one is checked against Sentinel before it is used again (``MasterConnection``).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from wxtoken.redis_config import RedisConfig

COMMAND_TIMEOUT = 2.0  # seconds for one command (connect included)
WATCH = 10.0  # seconds a connection found silent, slow or reconnected asks before each command
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError,
                                             redis.exceptions.ReadOnlyError,
                                             redis.exceptions.BusyLoadingError)


class NoReplicasError(redis.ConnectionError):
    """The master refused a write (NOREPLICAS: fewer replicas acknowledging it than
    ``min-replicas-to-write``): an old master cut off from the rest, or its replicas are down.
    A connection error: the connection is dropped, the next command asks Sentinel again, and
    while it lasts the fleet runs as with Redis down."""


class FleetSentinel(Sentinel):  # type: ignore[misc, unused-ignore]
    """redis-py's Sentinel, noting each service's ``down-after-milliseconds`` and
    ``failover-timeout`` as the sentinels report them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timing: dict[str, tuple[float, float]] = {}  # service -> (down-after, failover) s

    def check_master_state(self, state: dict[str, Any], service_name: str) -> bool:
        check = super().check_master_state
        if not check(state, service_name):  # type: ignore[no-untyped-call, unused-ignore]
            return False
        self.timing[service_name] = (int(state.get("down-after-milliseconds", 30000)) / 1000,
                                     int(state.get("failover-timeout", 180000)) / 1000)
        return True


class MasterConnection(SentinelManagedConnection):  # type: ignore[misc, unused-ignore]
    """A connection to the master Sentinel names, that asks Sentinel again when it may have
    outlived a failover. redis-py asks only when it connects, and a master stopped (paused, cut
    off) long enough to be failed over still calls itself the master when it comes back, until
    Sentinel demotes it: a pooled connection that idled through that wrote to the old master.

    A failover needs the master gone for Sentinel's whole down-after-milliseconds. So before a
    command, a connection that has been silent for half of that, or whose last answer was slow
    (over a second; a quarter of down-after if less), or that was reconnected, asks Sentinel
    which master it is, and keeps asking before every command for WATCH seconds more (a
    failover already under way when the old master came back is over within seconds). On
    another answer it is dropped (the pool's idle connections to the old address with it) and
    the command is retried on the new master; no sentinel naming a master is a connection
    error (Redis down). A subscription never writes and asks nobody: it is dropped once the
    pool has heard of another master. The guard that really stops an old master's writes is
    min-replicas-to-write on the Redis side; its refusal is a NoReplicasError."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        self._seen = 0.0  # monotonic: last named by Sentinel, or a prompt answer
        self._sent = 0.0  # monotonic: the last command sent
        self._slow = False  # the last answer came late
        self._watch_until = 0.0  # monotonic: ask Sentinel before every command until then
        self._connected = False  # connected before: a reconnect is watched
        self._sending = False

    def _limits(self) -> tuple[float, float, float]:
        """(silence, slowness, watch) in seconds."""
        pool = self.connection_pool
        down_after, failover = pool.sentinel_manager.timing.get(pool.service_name, (5.0, 180.0))
        return down_after / 2, min(1.0, down_after / 4), min(WATCH, failover)

    def connect_to(self, address: tuple[str, int]) -> None:
        now = time.monotonic()
        self._seen, self._slow = now, False  # Sentinel just named it
        if self._connected:
            self._watch_until = now + self._limits()[2]
        outer, self._sending = self._sending, True  # the handshake: no asking
        try:
            super().connect_to(address)  # type: ignore[no-untyped-call, unused-ignore]
        finally:
            self._sending = outer
        self._connected = True

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sending:  # not the handshake, nor the health-check PING inside a send
            if self._sock is None:
                # through Sentinel: redis-py's own reconnect here (a retry after an error)
                # would go back to the address this connection had
                self.connect()  # type: ignore[no-untyped-call, unused-ignore]
            else:
                self._check_master()
        self._sent = time.monotonic()
        outer, self._sending = self._sending, True
        try:
            send = super().send_packed_command
            send(command, check_health)  # type: ignore[no-untyped-call, unused-ignore]
        finally:
            self._sending = outer

    def _check_master(self) -> None:
        pool = self.connection_pool
        if pool.master_address not in (None, (self.host, self.port)):
            self._drop()  # the pool has heard of another master
        if self._connect_callbacks:
            return  # a subscription's (redis-py registers connect callbacks only on those)
        now = time.monotonic()
        silence, _, watch = self._limits()
        if self._slow or now - self._seen > silence:
            self._slow, self._watch_until = False, now + watch
        if now >= self._watch_until:
            return
        try:
            # redis-py's: when the master moved, the pool's idle connections are dropped (busy
            # ones when they come back to the pool)
            address = pool.get_master_address()
        except redis.ConnectionError:  # no sentinel answers, or none names a master
            self.disconnect()  # type: ignore[no-untyped-call, unused-ignore]
            raise
        if tuple(address) != (self.host, self.port):
            self._drop()
        self._seen = time.monotonic()

    def _drop(self) -> None:
        self.disconnect()  # type: ignore[no-untyped-call, unused-ignore]
        raise redis.ConnectionError(f"Sentinel names another master than {self.host}:"
                                    f"{self.port}: this connection outlived a failover")

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            self._answered()
            if "NOREPLICAS" in str(exc):
                self.disconnect()  # type: ignore[no-untyped-call, unused-ignore]
                raise NoReplicasError(str(exc)) from None
            raise
        self._answered()
        return response

    def _answered(self) -> None:
        now = time.monotonic()
        if now - self._sent > self._limits()[1]:
            self._slow = True
        else:
            self._seen = now


class MasterSSLConnection(MasterConnection, SSLConnection):  # type: ignore[misc, unused-ignore]
    pass


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
        sentinel = FleetSentinel(list(cfg.sentinels), sentinel_kwargs=sentinel_options,
                                 **options)
        assert cfg.service_name is not None
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            cfg.service_name, db=db,
            connection_class=MasterSSLConnection if tls else MasterConnection)
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
