"""What one daemon shares with the fleet: the Redis client, the fleet's clock (Redis TIME), whether
Redis is reachable, the fencing scripts, and the check that the hosts agree on every identity.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import redis

from wxtoken.config import AppConfig, Config
from wxtoken.errors import ConfigError
from wxtoken.fleet import mirror
from wxtoken.fleet.connect import REDIS_ERRORS, accepts_anyone, clock_offset, connect, text
from wxtoken.fleet.events import Broker, RedisBack, RedisChanged
from wxtoken.fleet.keys import Keys, channel, resets_key, version_key
from wxtoken.logs import get_logger
from wxtoken.record import TokenRecord, parse_record
from wxtoken.redis_config import MIRRORS, RedisConfig, lease_for
from wxtoken.schedule import call_deadline

SKEW_WARNING = 2.0  # seconds between this host's clock and Redis TIME worth a warning
PROBE_EVERY = 2.0  # while Redis is down, one command in this many seconds tries it again

# The generation is taken atomically with the lease: only the lease's owner can take one, so a
# holder paused between acquiring and counting cannot come back with a higher number. It never
# goes below the highest this host has seen (ARGV[2]): a flushed Redis restarts its counter.
TAKE_GENERATION = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then
  return false
end
local gen = redis.call('incr', KEYS[2])
if gen <= tonumber(ARGV[2]) then
  gen = tonumber(ARGV[2]) + 1
  redis.call('set', KEYS[2], gen)
end
return gen
"""
# A record is written only if no record of a higher generation is there (fencing on the
# generation alone, never on host clocks); the counter is kept at least at the written
# generation (a flush during the refresh reset it); a fenced-fetch mark (KEYS[3]: the
# generation of a record a late fetch retired) is cleared by any newer record. Nothing is
# written for a removed identity (KEYS[4]: an authorizer that cancelled): {0, -1}.
WRITE_RECORD = """
if redis.call('exists', KEYS[4]) == 1 then
  return {0, -1, 0}
end
local current = redis.call('get', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  local theirs = ok and type(doc) == 'table' and tonumber(doc.gen)
  if theirs and theirs > tonumber(ARGV[2]) then
    return {0, theirs, doc.seeded and 1 or 0}
  end
end
redis.call('set', KEYS[1], ARGV[1])
if tonumber(redis.call('get', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('set', KEYS[2], ARGV[2])
end
local fenced = tonumber(redis.call('get', KEYS[3]) or '')
if fenced and fenced < tonumber(ARGV[2]) then
  redis.call('del', KEYS[3])
end
return {1, tonumber(ARGV[2])}
"""
# Re-seeding Redis from a host's valid file, as generation ARGV[2] (the generation the file's
# token was written under, or one past the highest the host had seen for a token it fetched
# while Redis was away): written only if Redis holds no record of that generation or higher
# (tokens are ordered by generation, never by expiries written in different clocks); the
# counter never goes below it nor below ARGV[3] (the highest the host has seen). Nothing is
# seeded for a removed identity (KEYS[4]): -1.
SEED_RECORD = """
if redis.call('exists', KEYS[4]) == 1 then
  return -1
end
local current = redis.call('get', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  local theirs = ok and type(doc) == 'table' and tonumber(doc.gen)
  if theirs and theirs >= tonumber(ARGV[2]) then
    return 0
  end
end
local gen = tonumber(ARGV[2])
local counter = tonumber(redis.call('get', KEYS[2]) or '0')
local floor = math.max(gen, tonumber(ARGV[3]))
if counter < floor then
  redis.call('set', KEYS[2], floor)
end
local doc = cjson.decode(ARGV[1])
doc.gen = gen
doc.seeded = 1
redis.call('set', KEYS[1], cjson.encode(doc))
local fenced = tonumber(redis.call('get', KEYS[3]) or '')
if fenced and fenced < gen then
  redis.call('del', KEYS[3])
end
return 1
"""
# A fetch WeChat may have answered after its host's lease ran out (a paused holder, a fetch
# made while Redis was away, a write refused after a call) may have retired the token of any
# record written so far: mark the generation counter as it is now (KEYS[2]; the record's own
# generation when the counter is behind it); the next lease holder that reads the mark fetches
# once more, and only a record of a higher generation clears it (WRITE_RECORD, SEED_RECORD).
# Returns the generation marked.
MARK_FENCED = """
local gen = tonumber(redis.call('get', KEYS[2]) or '0')
local current = redis.call('get', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  local theirs = ok and type(doc) == 'table' and tonumber(doc.gen)
  if theirs and theirs > gen then
    gen = theirs
  end
end
local marked = tonumber(redis.call('get', KEYS[3]) or '0')
if marked > gen then
  gen = marked
end
redis.call('set', KEYS[3], gen, 'EX', ARGV[1])
return gen
"""
# After a record changed: the fleet's version moves on and every host hears "<identity>
# <version>"; a host that finds the version ahead of what it heard knows it missed a message.
ANNOUNCE = """
local version = redis.call('incr', KEYS[1])
redis.call('publish', ARGV[1], ARGV[2] .. ' ' .. version)
return version
"""


def record_json(record: TokenRecord, gen: int, by: str) -> str:
    """The fleet's record: the token file's fields (no local app name) plus gen and writer."""
    doc = json.loads(record.to_json())
    doc.pop("app", None)
    doc.update(gen=gen, by=by)
    return json.dumps(doc, separators=(",", ":"))


def parse_record_json(raw: bytes | str, app: str) -> tuple[TokenRecord, int, str]:
    """(record under the local app name, generation, writer) from the fleet's record; ValueError
    when it is not one."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    gen, by = doc.pop("gen", 0), str(doc.pop("by", ""))
    doc.pop("seeded", None)  # re-seeded from a host's file (not fetched under a lease)
    if type(gen) is not int:
        raise ValueError("no generation")
    doc["app"] = app
    return parse_record(json.dumps(doc).encode(), app), gen, by

# The fleet's count of one account's quota resets this month: ARGV[1] added, then raised to at
# least ARGV[2] (WeChat said 48006: the month's resets are gone, whoever made them).
COUNT_RESETS = """
local n = tonumber(redis.call('get', KEYS[1]) or '0') + tonumber(ARGV[1])
if n < tonumber(ARGV[2]) then
  n = tonumber(ARGV[2])
end
if n > 0 then
  redis.call('set', KEYS[1], n, 'EX', ARGV[3])
end
return n
"""
RESETS_TTL = 40 * 86400  # a month's count outlives the month, and no more


class Fleet:
    """The daemon's side of the fleet: one Redis client shared by every app."""

    def __init__(self, config: Config, cfg: RedisConfig) -> None:
        self.config = config
        self.cfg = cfg
        self.prefix = cfg.key_prefix
        self.client = connect(cfg, config.ca_bundle)
        self.lease_timeout = cfg.lease_timeout or lease_for(config.renew_before,
                                                             call_deadline(config.renew_before))
        self.host = f"{socket.gethostname()}:{os.getpid()}"
        self.log = get_logger(component="fleet")
        self.channel = channel(self.prefix)
        self.version_key = version_key(self.prefix)
        self.take_generation = self.client.register_script(TAKE_GENERATION)
        self.write_record = self.client.register_script(WRITE_RECORD)
        self.seed_record = self.client.register_script(SEED_RECORD)
        self.mark_fenced = self.client.register_script(MARK_FENCED)
        self.announce_record = self.client.register_script(ANNOUNCE)
        self.count_resets = self.client.register_script(COUNT_RESETS)
        self.offset = 0.0  # Redis TIME minus this host's clock
        self.uncertainty = 0.0
        # Redis TIME as last measured, and this host's monotonic clock then: the fleet's clock
        # runs on from there, whatever steps this host's wall clock takes
        self._redis_at = (time.time(), time.monotonic())
        self._up: bool | None = None  # None: not tried yet
        self._down_since = 0.0  # monotonic time of the last failure (probes are spaced)
        self.last_sync = 0.0  # when this host last caught up with the fleet (Unix seconds)
        self.downs = 0  # how many times Redis was found unreachable (a resync follows each)
        self._state = threading.Lock()
        self.mirror_prefixes = {sdk: cfg.mirror_prefix(sdk) for sdk in MIRRORS}
        self.events = Broker()  # what the fleet's parts tell each other (fleet/events.py)

    # -- the fleet's clock and Redis's health ---------------------------------------------------
    def clock(self) -> float:
        """The fleet's time: Redis TIME as last measured, run on by this host's monotonic
        clock (so a step of the wall clock does not move it). Records' times are in it."""
        redis_time, at = self._redis_at
        return redis_time + (time.monotonic() - at)

    @property
    def up(self) -> bool:
        return bool(self._up)

    def may_try(self) -> bool:
        """Whether to send Redis a command now: always while it is up; while it is down, one
        caller every PROBE_EVERY seconds (a success marks it up again)."""
        if self._up:
            return True
        with self._state:
            if time.monotonic() - self._down_since < PROBE_EVERY:
                return False
            self._down_since = time.monotonic()
            return True

    def mark_up(self) -> None:
        if self._up is not True:
            # the offset is measured on every (re)connection, before Redis counts as up (so
            # before anything is written or seeded in the fleet's time: a host that started
            # while Redis was away has none)
            try:
                self.measure_clock()
            except REDIS_ERRORS as exc:
                self.mark_down(exc)
                return
        with self._state:
            was, self._up = self._up, True
        if was is False:
            self.log.warning("redis.back", reason="coordination resumes; re-seeding what it lost")
            self.events.publish(RedisBack())
        if was is not True:
            self.events.publish(RedisChanged())

    def mark_down(self, exc: BaseException) -> None:
        with self._state:
            was, self._up = self._up, False
            self._down_since = time.monotonic()
            if was is not False:
                self.downs += 1
        if was is not False:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                self.log.error("redis.tls_failed", error="the Redis server's certificate did "
                               "not verify (check ca_bundle, and the host name in the URL)")
            self.log.warning("redis.down", error=type(exc).__name__,
                             reason="files keep serving; stable_token candidates refresh on "
                             "their own, token candidates wait until renew_before")
            self.events.publish(RedisChanged())

    def measure_clock(self) -> float:
        """Measure the offset to Redis TIME; warn when this host's clock is off by more than
        2 s. Returns the skew in seconds."""
        offset, uncertainty = clock_offset(self.client)
        self.offset, self.uncertainty = offset, uncertainty
        self._redis_at = (time.time() + offset, time.monotonic())
        if abs(offset) > SKEW_WARNING:
            self.log.warning("clock.skew", skew=round(offset, 2),
                             reason="this host's clock differs from Redis TIME; the fleet's "
                             "times follow Redis, local files are written in this host's time")
        return offset

    # -- start ----------------------------------------------------------------------------------
    def start(self, apps: tuple[AppConfig, ...]) -> None:
        """Connect, measure the clock, check the hosts agree on every identity, warn when Redis
        takes commands from anyone. Redis unreachable is not an error: the files keep serving."""
        try:
            self.client.ping()
            self.mark_up()  # measures the clock
            self.check_identities(apps)
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            # before REDIS_ERRORS: redis-py's AuthenticationError is a ConnectionError
            who = f"user {self.cfg.username!r}" if self.cfg.username else "the default user"
            how = "with the password from " + self.cfg.password_source \
                if self.cfg.password_source else "without a password"
            raise ConfigError([f"{self.config.path}: redis: Redis refused the login ({who}, "
                               f"{how}): {str(exc).split(',')[0]}"]) from None
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return
        if accepts_anyone(self.cfg, self.config.ca_bundle):
            self.log.warning("redis.no_auth", reason="Redis accepts commands without "
                             "authentication: any process that reaches it could write a token "
                             "record; set requirepass or an ACL user, and a password_* key")

    def check_identities(self, apps: tuple[AppConfig, ...]) -> None:
        """Every host must agree on what each identity is (api, appid/corpid, agentid,
        tickets): the first host to start records it; a host that disagrees is refused."""
        problems = []
        for app in apps:
            keys = Keys(self.prefix, app.identity)
            mine = json.dumps({"api": app.api, "appid": app.appid, "agentid": app.agentid,
                               "tickets": sorted(app.tickets)}, sort_keys=True)
            if self.client.set(keys.meta, mine, nx=True):
                continue
            theirs = self.client.get(keys.meta)
            if theirs is not None and text(theirs) != mine:
                problems.append(f"{self.config.path}: apps.{app.name}: the fleet knows "
                                f"{app.identity} as {text(theirs)}, this config as {mine}: "
                                f"make the hosts' configs agree (or delete {keys.meta} if the "
                                "change is meant for every host)")
        if problems:
            raise ConfigError(problems)

    # -- writing ------------------------------------------------------------------------------
    def announce(self, keys: Keys, record: TokenRecord, api: str, mirrored: bool = True
                 ) -> bool:
        """After a record was written: tell every host (the version moves on, the identity is
        published), then write the SDK layouts in a transaction that runs only while the record
        still holds this token (a late writer never puts an older token back into the SDKs'
        keys). False when Redis failed (the caller tries again later)."""
        try:
            self.announce_record(keys=[self.version_key], args=[self.channel, keys.identity])
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return False
        entries = mirror.entries(self.cfg.mirror, self.mirror_prefixes, record, api,
                                 self.clock()) if mirrored else []
        if not entries:
            return True

        def write(pipe: Any) -> None:
            current = pipe.get(keys.record)
            try:
                ours = json.loads(current)["access_token"] == record.access_token
            except (TypeError, ValueError, KeyError):
                ours = False
            if not ours:
                return  # a newer record was written meanwhile; its writer announces it
            pipe.multi()
            for key, value, ttl in entries:
                pipe.set(key, value, ex=ttl)

        try:
            self.client.transaction(write, keys.record)
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
        return True

    def resets(self, appid: str, month: str, add: int = 0, at_least: int = 0) -> int | None:
        """The fleet's count of ``appid``'s quota resets in ``month``, after adding ``add`` and
        raising it to ``at_least``; None while Redis cannot be reached."""
        if not self.may_try():
            return None
        try:
            count = self.count_resets(keys=[resets_key(self.prefix, appid, month)],
                                      args=[add, at_least, RESETS_TTL])
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return None
        self.mark_up()
        return int(count)

    def status(self) -> dict[str, Any]:
        return {"redis_up": self.up, "last_sync": self.last_sync or None,
                "clock_skew": round(self.offset, 3)}
