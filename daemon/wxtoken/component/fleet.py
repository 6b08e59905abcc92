"""An Open Platform component's share of the fleet's Redis.

The component's keys share one hash tag (``{<component_appid>:component}``), so they live in
one slot; no key name holds a secret:

    <prefix>:{<cid>:component}:record      the component token's record (a FleetStore's)
    <prefix>:{<cid>:component}:ticket      hash: latest, latest_at, good, good_at (the last
                                           component_verify_ticket pushed, the last that worked)
    <prefix>:{<cid>:component}:refresh     hash: authorizer appid -> {"refresh_token",
                                           "previous", "updated_at", "authorized_at",
                                           "wechat_at"} (durable state)
    <prefix>:{<cid>:component}:authorizers set of the authorizers' appids
    <prefix>:{<cid>:component}:gone:<appid>  an authorizer removed (unauthorized): 7 days, so a
                                           host that still has its files removes them instead of
                                           putting it back
    <prefix>:{<cid>:component}:claim:<h>   one host handles an authorization code (10 minutes)
    <prefix>:{<cid>:component}:reconciled  the fleet's last reconcile (expires after a day)
    <prefix>:{<aid>:authorizer:<cid>}:record (lease, gen, status)  an authorizer's token
    <prefix>:{<aid>:authorizer:<cid>}:gone   set with the removal (its record deleted in the
                                           same step): no host writes or re-seeds the record
                                           until an authorization deletes it (7 days)
    <prefix>:requests:<cid>:component      an authorization that reached a follower, for the
                                           candidates

The events channel also carries ``<cid>:component:authorizers`` (the set changed) and
``<cid>:component:ticket`` (a ticket arrived) with the fleet's version, like a record change.
"""

from __future__ import annotations

import hashlib
import json
import os
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from wxtoken.component.fleet_scripts import PUSH_REFRESH, PUSH_TICKET, REMOVE
from wxtoken.component.store import ComponentFiles
from wxtoken.config import ComponentConfig
from wxtoken.fleet.connect import REDIS_ERRORS, text
from wxtoken.fleet.keys import Keys
from wxtoken.logs import get_logger

if TYPE_CHECKING:
    from wxtoken.fleet.shared import Fleet

ERRORS: tuple[type[Exception], ...] = (RedisError, *REDIS_ERRORS)
GONE_FOR = 7 * 86400
CLAIM_FOR = 600

class Pushed(IntEnum):
    """What became of a refresh token shared with the fleet (PUSH_REFRESH's answer)."""

    STORED = 0
    GONE = -1  # the authorizer was removed from the fleet
    OLDER = -2  # the fleet's is another chain
    FAILED = -3  # Redis could not be written


class Verdict(IntEnum):
    """An unauthorized event, against the fleet's authorization (REMOVE's first answer)."""

    REFUSED = 0  # sent before it: nothing is removed
    REMOVED = 1
    CONFIRM = 2  # the times tie or one is missing: WeChat must be asked


ENTRY_KEYS = ("refresh_token", "previous", "updated_at", "authorized_at", "wechat_at")
MAX_AFTER = 8  # predecessors sent with a push (the used one, refused ones, the fleet's base)


class PlatformFleet:
    """One component's keys and the few operations on them."""

    def __init__(self, fleet: Fleet, comp: ComponentConfig,
                 files: ComponentFiles | None = None) -> None:
        self.fleet = fleet
        self.comp = comp
        self.files = files  # this host's: told when it is in step with the fleet
        cid = comp.component_appid
        self.component_identity = f"{cid}:component"
        self.base = f"{fleet.prefix}:{{{self.component_identity}}}"
        self.ticket_key = f"{self.base}:ticket"
        self.refresh_key = f"{self.base}:refresh"
        self.members_key = f"{self.base}:authorizers"
        self.reconciled_key = f"{self.base}:reconciled"
        self.members_name = f"{cid}:component:authorizers"  # announced on the events channel
        self.ticket_name = f"{cid}:component:ticket"
        self.requests = f"{fleet.prefix}:requests:{cid}:component"
        self.log = get_logger(component=comp.name)
        client = fleet.client
        self._push_ticket = client.register_script(PUSH_TICKET)
        self._push_refresh = client.register_script(PUSH_REFRESH)
        self._remove = client.register_script(REMOVE)

    def identity(self, appid: str) -> str:
        """The fleet identity of the component's token or of one authorizer's (an authorizer
        of two platforms has two tokens)."""
        if appid == self.comp.component_appid:
            return self.component_identity
        return f"{appid}:authorizer:{self.comp.component_appid}"

    def _gone_key(self, appid: str) -> str:
        return f"{self.base}:gone:{appid}"

    def _ok(self) -> bool:
        """Whether to talk to Redis now (it is up, or due for a probe)."""
        return self.fleet.may_try()

    def _trouble(self, exc: Exception) -> None:
        """Redis unreachable (marked down), or a command refused (an error reply: OOM, NOPERM,
        a proxy's CROSSSLOT...): a warning, never a traceback."""
        if isinstance(exc, REDIS_ERRORS):
            self.fleet.mark_down(exc)
        else:
            self.log.warning("fleet.redis_refused", error=str(exc)[:200] or type(exc).__name__)

    def _announce(self, name: str) -> None:
        try:
            self.fleet.announce_record(keys=[self.fleet.version_key],
                                       args=[self.fleet.channel, name])
        except ERRORS as exc:
            self._trouble(exc)

    # -- Redis's persistence --------------------------------------------------------------------
    def warn_without_persistence(self) -> None:
        """Refresh tokens are state: warn when Redis would lose them on a restart."""
        client = self.fleet.client
        try:
            try:
                aof = text(client.config_get("appendonly").get("appendonly") or "no")
                save = text(client.config_get("save").get("save") or "").strip()
                durable: bool | None = aof == "yes" or bool(save)
            except ResponseError:  # CONFIG is often disabled (managed Redis, renamed)
                info = client.info("persistence")
                durable = True if info.get("aof_enabled") == 1 else None
        except ERRORS:
            return
        if durable is False:
            self.log.warning("redis.no_persistence", reason="Redis has neither appendonly nor "
                             "save points: a Redis restart loses the authorizers' refresh "
                             "tokens (the candidates' own files put them back; a host that "
                             "never had them cannot); turn on appendonly")
        elif durable is None:
            self.log.warning("redis.persistence_unknown", reason="CONFIG is refused and "
                             "appendonly is off: make sure Redis persists (save points or "
                             "appendonly); the authorizers' refresh tokens are state")

    # -- the ticket -----------------------------------------------------------------------------
    def push_ticket(self, slot: str, ticket: str, at: float) -> bool:
        """Share a ticket (``latest`` pushed, or ``good``: it yielded a token); True when it
        was news to the fleet."""
        if not self._ok():
            return False
        try:
            done = bool(self._push_ticket(keys=[self.ticket_key], args=[slot, ticket, at]))
        except ERRORS as exc:
            self._trouble(exc)
            return False
        self.fleet.mark_up()
        if done and slot == "latest":
            self._announce(self.ticket_name)
        return done

    def pull_tickets(self, files: ComponentFiles) -> bool:
        """The fleet's tickets into this host's ticket file when they are newer; True when
        this host got a newer one."""
        if not self._ok():
            return False
        try:
            doc = {text(k): text(v) for k, v in self.fleet.client.hgetall(self.ticket_key).items()}
        except ERRORS as exc:
            self._trouble(exc)
            return False
        self.fleet.mark_up()
        got = False
        for slot in ("good", "latest"):
            ticket, at = doc.get(slot), doc.get(f"{slot}_at")
            try:
                when = float(at) if at is not None else None
            except ValueError:
                when = None
            if ticket and when is not None and files.ticket.adopt(slot, ticket, when):
                got = True
        return got

    # -- refresh tokens and the authorizers -----------------------------------------------------
    def push_refresh(self, appid: str, doc: dict[str, Any], authorized: bool = False,
                     after: tuple[str, ...] = (), seeded: bool = False) -> Pushed:
        """Share an authorizer's refresh tokens (``doc``: this host's entry). ``after``: the
        refresh tokens this one replaces (the one used, those found refused): the fleet's
        current must be one of them. ``authorized``: a new authorization or an import, stored
        whatever the fleet has. On OLDER the fleet's is another chain: it is taken here at the
        next refresh, this one kept as a spare; on FAILED the local file has it and a resync
        pushes it."""
        if not self._ok():
            return Pushed.FAILED
        entry: dict[str, Any] = {k: doc[k] for k in ENTRY_KEYS if doc.get(k)}
        if seeded:
            entry["seeded"] = True
        base = doc.get("fleet")  # what this host last knew as the fleet's: it follows from it
        chain = [t for t in (*after, base) if isinstance(t, str) and t][:MAX_AFTER]
        try:
            result = int(self._push_refresh(
                keys=[self.refresh_key, self.members_key, self._gone_key(appid)],
                args=[appid, json.dumps(entry), "authorized" if authorized else "chain",
                      *chain]))
        except ERRORS as exc:
            self._trouble(exc)
            return Pushed.FAILED
        self.fleet.mark_up()
        if result == 1:
            # (back) in the set: authorized again after a removal, its tokens may be written
            try:
                self.fleet.client.delete(Keys(self.fleet.prefix, self.identity(appid)).gone)
            except ERRORS as exc:
                self._trouble(exc)
            self._announce(self.members_name)
        if result >= 0:
            self._in_step(appid, str(entry["refresh_token"]))
        return Pushed(min(result, Pushed.STORED))  # 1: stored, and the authorizer is new

    def _in_step(self, appid: str, refresh_token: str) -> None:
        if self.files is not None:
            self.files.in_step(appid, refresh_token)

    def pull_refresh(self, appid: str, files: ComponentFiles) -> None:
        """Take the fleet's refresh tokens for ``appid`` unless this host's are the same or
        ahead of them (another host refreshed it last, and WeChat may have rotated them)."""
        if not self._ok():
            return
        try:
            raw = self.fleet.client.hget(self.refresh_key, appid)
        except ERRORS as exc:
            self._trouble(exc)
            return
        self.fleet.mark_up()
        if raw is not None:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                files.adopt_refresh(appid, doc)
            else:
                self.log.warning("fleet.refresh_unusable", app=appid)

    def all_refresh(self) -> dict[str, dict[str, Any]] | None:
        """Every authorizer's entry (None while Redis is unreachable)."""
        if not self._ok():
            return None
        try:
            raw = self.fleet.client.hgetall(self.refresh_key)
        except ERRORS as exc:
            self._trouble(exc)
            return None
        self.fleet.mark_up()
        out = {}
        for key, value in raw.items():
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out[text(key)] = doc
        return out

    def adopt_all(self, entries: dict[str, dict[str, Any]], files: ComponentFiles) -> None:
        for appid, doc in entries.items():
            files.adopt_refresh(appid, doc)

    def members(self) -> set[str] | None:
        """The fleet's authorizers (None while Redis is unreachable)."""
        if not self._ok():
            return None
        try:
            found = {text(m) for m in self.fleet.client.smembers(self.members_key)}
        except ERRORS as exc:
            self._trouble(exc)
            return None
        self.fleet.mark_up()
        return found

    def still_removed(self, appid: str) -> bool:
        """Whether ``appid`` is out of the fleet's authorizers (an authorization since put it
        back); True while Redis cannot say."""
        if not self._ok():
            return True
        try:
            member = bool(self.fleet.client.sismember(self.members_key, appid))
        except ERRORS as exc:
            self._trouble(exc)
            return True
        return not member

    def gone(self, appids: list[str]) -> dict[str, float]:
        """Which of ``appids`` were removed from the fleet (unauthorized) lately, and when."""
        if not appids or not self._ok():
            return {}
        try:
            pipe = self.fleet.client.pipeline(transaction=False)
            for appid in appids:
                pipe.get(self._gone_key(appid))
            found = pipe.execute()
        except ERRORS as exc:
            self._trouble(exc)
            return {}
        out = {}
        for appid, value in zip(appids, found, strict=True):
            if value is not None:
                try:
                    out[appid] = float(value)
                except ValueError:
                    out[appid] = 0.0
        return out

    def _removal(self, appid: str, at: float | None, mode: str,
                 seen: tuple[str, str] = ("", "")) -> list[Any] | None:
        """Run REMOVE; its answer, None when Redis could not be told."""
        if not self._ok():
            return None
        try:
            answer = self._remove(
                keys=[self.refresh_key, self.members_key, self._gone_key(appid)],
                args=[appid, GONE_FOR, "" if at is None else at, self.fleet.clock(), mode,
                      *seen])
            done = int(answer[0]) == Verdict.REMOVED
            if done:
                self._remove_record(appid)
        except ERRORS as exc:
            self._trouble(exc)
            return None
        self.fleet.mark_up()
        if done:
            self._announce(self.members_name)
        return list(answer)

    def _remove_record(self, appid: str) -> None:
        """The removed authorizer's record goes, and its identity is marked removed in one
        step (its own slot): no host's file, nor a refresh of it in flight, puts it back
        (fleet/store.py). An authorization that came in between is written again (its
        host's file re-seeds the record)."""
        if appid == self.comp.component_appid:
            return  # the component's own token is never removed
        keys = Keys(self.fleet.prefix, self.identity(appid))
        pipe = self.fleet.client.pipeline(transaction=True)
        pipe.set(keys.gone, "1", ex=GONE_FOR)
        pipe.delete(keys.record)
        pipe.execute()
        if self.fleet.client.hexists(self.refresh_key, appid):
            # authorized again since the removal (push_refresh stores, then deletes the mark
            # this step may have set after it): its tokens may be written again
            self.fleet.client.delete(keys.gone)

    def remove(self, appid: str, at: float | None,
               seen: tuple[str, str] | None = None) -> bool | None:
        """Remove an authorizer from the fleet (every host removes its files), as cancelled at
        ``at``: True; False when it authorized again after that (a removal told late), or,
        with ``seen`` (what ``cancel`` returned; WeChat confirmed the cancellation since; ``at``
        may be None), when the fleet's authorization is no longer the one ``cancel`` saw; None
        when Redis could not be told (the caller keeps a tombstone and tells it later)."""
        answer = self._removal(appid, at, "told" if seen is None else "confirmed",
                               seen or ("", ""))
        return None if answer is None else int(answer[0]) == Verdict.REMOVED

    def cancel(self, appid: str, at: float | None
               ) -> tuple[Verdict, tuple[str, str]] | None:
        """An ``unauthorized`` event sent at ``at`` (its CreateTime; None when it has none)
        against the fleet's authorization of ``appid``, on WeChat's clock: REFUSED when it was
        sent before that authorization (a late or replayed push: nothing is removed), REMOVED
        when after it (or the fleet holds no authorization: every host removes its files),
        CONFIRM with what the fleet saw when the times tie or one is missing: WeChat must be
        asked, then ``remove(appid, at, seen)``. None while Redis is unreachable."""
        answer = self._removal(appid, at, "decide")
        if answer is None:
            return None
        verdict = Verdict(int(answer[0]))
        if verdict == Verdict.CONFIRM:
            return verdict, (text(answer[1]), text(answer[2]))
        return verdict, ("", "")

    def claim(self, code: str) -> bool:
        """Whether this host handles an authorization code (one host of the fleet does; a
        retried event that reached another host is answered but not exchanged again). True
        while Redis is unreachable."""
        digest = hashlib.sha256(code.encode()).hexdigest()[:24]
        if not self._ok():
            return True
        try:
            return bool(self.fleet.client.set(f"{self.base}:claim:{digest}", "1", nx=True,
                                               ex=CLAIM_FOR))
        except ERRORS as exc:
            self._trouble(exc)
            return True

    def hand_over(self, appid: str, code: str, at: float | None) -> int:
        """An authorization (made at ``at``, WeChat's time; None: unknown) that reached a
        follower: to the candidates (how many heard it)."""
        return self._request({"authorized": appid, "code": code, "at": at})

    def hand_over_cancel(self, appid: str, at: float | None) -> int:
        """An ``unauthorized`` event (sent at ``at``) that reached a follower and needs WeChat
        asked (a follower calls nothing): to the candidates (how many heard it); one of them
        takes it (``claim`` of its id)."""
        return self._request({"unauthorized": appid, "at": at,
                              "id": hashlib.sha256(os.urandom(16)).hexdigest()[:24]})

    def _request(self, doc: dict[str, Any]) -> int:
        try:
            return int(self.fleet.client.publish(self.requests, json.dumps(doc)))
        except ERRORS as exc:
            self._trouble(exc)
            return 0

    # -- the daily reconcile --------------------------------------------------------------------
    def reconcile_wait(self) -> float | None:
        """Seconds until the fleet's next reconcile is due (0: now); None while Redis is
        unreachable (the host decides from its own files)."""
        if not self._ok():
            return None
        try:
            ttl = int(self.fleet.client.ttl(self.reconciled_key))
        except ERRORS as exc:
            self._trouble(exc)
            return None
        return float(max(0, ttl))

    def take_reconcile(self, every: float) -> bool:
        """Whether this host runs the reconcile now: one host a day in the whole fleet. True
        while Redis is unreachable."""
        if not self._ok():
            return True
        try:
            return bool(self.fleet.client.set(self.reconciled_key, str(self.fleet.clock()),
                                               nx=True, ex=max(60, int(every) - 60)))
        except ERRORS as exc:
            self._trouble(exc)
            return True

    def release_reconcile(self) -> None:
        """The reconcile failed: the next try (on any host) may run it."""
        try:
            self.fleet.client.delete(self.reconciled_key)
        except ERRORS as exc:
            self._trouble(exc)
