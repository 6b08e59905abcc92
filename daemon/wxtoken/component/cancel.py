"""An authorizer's cancellation: ``unauthorized`` events, and an authorizer WeChat no longer
lists (``gone``).

An event is ordered against the authorization held by WeChat's clock alone (CreateTime, kept
with the refresh token as ``wechat_at``): sent before it, it is ignored; sent after it, the
authorizer's files go; a tie or a missing time is asked of WeChat (the authorizer list, read
after the event). On a fleet Redis decides, against the fleet's authorization; a follower hands
what WeChat must be asked to a host with the secret. A cancellation not decided yet is kept in
``.platform.json`` (``cancelling``) for a restart.
"""

from __future__ import annotations

import time
from typing import Any

from wxtoken.component.authorizer_list import LIST_WINDOW, AuthorizerList
from wxtoken.component.authorizers import Authorizers
from wxtoken.component.fleet import Verdict
from wxtoken.component.parts import Part, Parts, number
from wxtoken.errors import UpstreamError
from wxtoken.record import APP_NAME_RE

# .platform.json's table of unauthorized events not decided yet (appid -> {"at": WeChat's time})
CANCELLING = "cancelling"
CANCEL_BACKOFF = 600.0  # the longest wait between tries to decide a cancellation


class Cancellations(Part):
    """One platform's cancellations to decide, and the removal of an authorizer that is gone."""

    def __init__(self, parts: Parts, authorizers: Authorizers, lists: AuthorizerList) -> None:
        super().__init__(parts)
        self.authorizers = authorizers
        self.lists = lists
        # appid -> time.monotonic() of its last unauthorized event: WeChat is asked about it
        # only with a read of the authorizer list started since
        self._since: dict[str, float] = {}
        # appid -> {"at": its CreateTime or None, "received": this host's time}: the
        # cancellations not decided yet (kept in .platform.json too, for a restart)
        self._pending: dict[str, dict[str, Any]] = {}

    def resume(self, now: float) -> None:
        """At start: the cancellations the last run had not decided (.platform.json) are taken
        up again (``now``: time.monotonic())."""
        for appid, entry in self.files.entries(CANCELLING).items():
            with self._lock:
                self._pending[appid] = entry if isinstance(entry, dict) else {"at": None}
                self._since.setdefault(appid, now)
            self.later(appid, 0.0)

    def waiting(self) -> list[str]:
        """The authorizers with a cancellation not decided yet."""
        with self._lock:
            return sorted(self._pending)

    def on_unauthorized(self, appid: str, at: float | None = None) -> None:
        """An ``unauthorized`` event sent at ``at`` (its CreateTime; None: it has none): kept
        durably (OSError when it cannot be: the push is answered 503 and WeChat pushes it
        again), then decided off the callback's thread."""
        self.note(appid, at)
        self.later(appid, 0.0)

    def note(self, appid: str, at: float | None, must_keep: bool = True) -> None:
        """Keep a cancellation to decide; with one pending already, the later WeChat time
        stands for both (either one after the authorization removes it). OSError when it
        cannot be kept durably (unless not ``must_keep``: then it is kept in memory only)."""
        with self._lock:
            before = number((self._pending.get(appid) or {}).get("at"))
            if before is not None and (at is None or before > at):
                at = before
            entry = {"at": at, "received": time.time()}
            try:
                self.files.note_entry(CANCELLING, appid, entry)
            except OSError as exc:
                if must_keep:
                    raise
                self.log.error("authorizer.unauthorized_unstored", app=appid, error=str(exc),
                               reason="the unauthorized event could not be kept durably: it "
                               "is decided now, but not after a restart")
            self._pending[appid] = entry
            self._since[appid] = time.monotonic()

    def _forget(self, appid: str, entry: dict[str, Any]) -> None:
        """The cancellation ``entry`` is decided; one that came meanwhile is decided next (its
        run was skipped while this one ran: one run per job at a time)."""
        with self._lock:
            if self._pending.get(appid) is not entry:
                self.later(appid, 1.0)
                return
            self._pending.pop(appid, None)
            self._since.pop(appid, None)
            try:
                self.files.note_entry(CANCELLING, appid, None)
            except OSError as exc:  # decided again after a restart: the same verdict
                self.log.warning("authorizer.unauthorized_unstored", app=appid,
                                 error=str(exc))

    def later(self, appid: str, delay: float, attempt: int = 0) -> None:
        self.host.later(lambda: self.decide(appid, attempt), delay,
                        f"unauthorized:{self.comp.name}/{appid}")

    def decide(self, appid: str, attempt: int = 0) -> None:
        """Decide a pending cancellation: on the fleet by Redis (a follower hands what WeChat
        must be asked to a candidate); on one host, or while Redis is unreachable, against
        this host's own authorization (a follower, which holds none, waits for Redis)."""
        with self._lock:
            entry = self._pending.get(appid)
        if entry is None:
            return  # decided meanwhile
        at = number(entry.get("at"))
        if self.fleet is not None:
            if self._on_fleet(appid, at, entry, attempt):
                return
            if self.parts.following:
                self.log.warning("authorizer.unauthorized_deferred", app=appid,
                                 reason="Redis is unreachable, and this host follows the "
                                 "platform (it holds no authorization to compare with and "
                                 "calls no WeChat API): decided when Redis is back; its files "
                                 "stay meanwhile")
                return
        seen = self.files.authorization(appid)
        wechat = seen[1] if seen is not None else None
        if seen is not None and at is not None and wechat is not None and at != wechat:
            if at < wechat:
                self._stale(appid, at, wechat, entry)
                return
        elif seen is not None:  # a tie, or a time missing: WeChat says
            listed = self._confirm(appid, attempt)
            if listed is None:
                return
            if listed:
                self._refuted(appid, entry)
                return
        self.log.warning("authorizer.unauthorized", app=appid, reason="an unauthorized event",
                         sent_at=at, authorized_at=wechat)
        if self.fleet is not None:  # Redis is unreachable: told at the next resync
            self.authorizers.tombstone(appid, max(at if at is not None else self.clock(),
                                                  seen[0] if seen is not None else 0.0))
        self._forget(appid, entry)
        self.host.later(lambda: self.authorizers.remove(appid, seen, check=True), 0,
                        f"remove:{self.comp.name}/{appid}")

    def _on_fleet(self, appid: str, at: float | None, entry: dict[str, Any],
                  attempt: int) -> bool:
        """Redis decides against the fleet's authorization; WeChat is asked on a tie or a
        missing time. False when Redis is unreachable (nothing was done)."""
        assert self.fleet is not None
        got = self.fleet.cancel(appid, at)
        if got is None:
            return False
        verdict, seen = got
        if verdict == Verdict.REFUSED:
            self._stale(appid, at, None, entry)
            return True
        if verdict == Verdict.CONFIRM:
            if self.parts.following:
                if self.fleet.hand_over_cancel(appid, at):
                    self._forget(appid, entry)  # a candidate keeps and decides it
                    self.log.info("authorizer.unauthorized_handed_over", app=appid,
                                  reason="WeChat is asked whether it still authorizes the "
                                  "platform, by a host with the component's secret")
                else:
                    (self.log.error if attempt == 0 else self.log.debug)(
                        "authorizer.not_handed_over", app=appid, next_in=60,
                        reason="no host with the component's secret is listening: the "
                        "unauthorized event waits (its files stay)")
                    self.later(appid, 60.0, attempt + 1)
                return True
            listed = self._confirm(appid, attempt)
            if listed is None:
                return True
            if listed:
                self._refuted(appid, entry)
                return True
            done = self.fleet.remove(appid, at, seen)
            if done is None:
                return False
            if not done:
                self._forget(appid, entry)
                self.log.info("authorizer.kept", app=appid, reason="authorized again while "
                              "the unauthorized event was decided: its files stay")
                return True
        self._forget(appid, entry)
        self.log.warning("authorizer.unauthorized", app=appid, reason="an unauthorized event",
                         sent_at=at)
        self.authorizers.later_remove(appid)  # every host does, on the set's news
        return True

    def _stale(self, appid: str, at: float | None, wechat: float | None,
               entry: dict[str, Any]) -> None:
        self._forget(appid, entry)
        self.log.warning("authorizer.unauthorized_ignored", app=appid, sent_at=at,
                         authorized_at=wechat,
                         reason="the unauthorized event was sent (CreateTime) before the "
                         "authorization held: a late or replayed push; its files stay")

    def _refuted(self, appid: str, entry: dict[str, Any]) -> None:
        self._forget(appid, entry)
        self.log.warning("authorizer.unauthorized_ignored", app=appid,
                         reason="WeChat still lists the authorizer (api_get_authorizer_list, "
                         "read after the unauthorized event, which could not be ordered "
                         "against the authorization by CreateTime): its files stay")

    def _confirm(self, appid: str, attempt: int) -> bool | None:
        """Whether WeChat still lists the authorizer, on a read of the authorizer list started
        after its last unauthorized event (the read the 61023 repairs share); None when that
        cannot be known now: the cancellation is tried again later."""
        token = self.parts.component_token()
        if token is None:
            # at a start it comes within seconds (fetched, or followed from the fleet); a
            # platform waiting for its ticket waits longer
            wait = min(60.0, 2.0 * 2 ** min(attempt, 5))
            (self.log.info if attempt == 0 else self.log.debug)(
                "authorizer.unauthorized_waits", app=appid, next_in=wait,
                reason="no valid component_access_token yet to ask WeChat with: its files "
                "stay meanwhile")
            self.later(appid, wait, attempt + 1)
            return None
        with self._lock:
            since = self._since.get(appid)
        try:
            read = self.lists.read(token, newer_than=since)
        except UpstreamError as exc:
            wait = max(self.lists.due(), min(CANCEL_BACKOFF, LIST_WINDOW * 2.0 ** min(attempt, 20)))
            self.log.warning("authorizer.unauthorized_unconfirmed", app=appid,
                             error=str(exc), errcode=exc.errcode, next_in=round(wait),
                             reason="the authorizer list could not be read to confirm the "
                             "unauthorized event: its files stay meanwhile")
            self.later(appid, wait, attempt + 1)
            return None
        if read is None:  # the last read predates the event: the next one decides
            self.later(appid, self.lists.due(), attempt)
            return None
        return appid in read.entries

    def gone(self, appid: str, reason: str, at: float | None = None) -> None:
        """The authorizer no longer authorizes the platform (since ``at``; WeChat said so: it
        is not in the authorizer list): its refresher stops (after the run in progress) and
        its files go, unless the fleet holds a later authorization."""
        self.log.warning("authorizer.unauthorized", app=appid, reason=reason)
        now = at if at is not None else self.clock()
        seen = self.files.authorization(appid)
        if self.fleet is not None:
            done = self.fleet.remove(appid, now)
            if done is False:
                self.log.info("authorizer.kept", app=appid, reason="the fleet holds an "
                              "authorization made after that: its files stay")
                return
            if done:  # the fleet's word: every host removes its files
                self.authorizers.later_remove(appid)
                return
            self.authorizers.tombstone(appid, max(now, seen[0] if seen else 0.0))
        self.host.later(lambda: self.authorizers.remove(appid, seen, check=True), 0,
                        f"remove:{self.comp.name}/{appid}")

    def handed_over(self, doc: dict[str, Any]) -> None:
        """An unauthorized event that reached a follower, for WeChat to be asked: one
        candidate takes it (and keeps it, as if pushed to it)."""
        assert self.fleet is not None
        appid, ident = doc.get("unauthorized"), doc.get("id")
        if not isinstance(appid, str) or not APP_NAME_RE.match(appid) \
                or appid == self.comp.component_appid \
                or not isinstance(ident, str) or not ident \
                or not self.fleet.claim(f"unauthorized:{ident}"):
            return
        self.note(appid, number(doc.get("at")), must_keep=False)
        self.later(appid, 0.0)
