"""One component's authorizers learnt in bulk: the daily reconcile with WeChat's authorizer
list (new authorizers start, known ones keep the listed refresh token as a fallback; one host of
a fleet a day), and ``wxtoken component import`` (JSON lines from another system, every line
checked before any is stored).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from wxtoken.component.authorizer_list import AuthorizerList
from wxtoken.component.authorizers import Authorizers
from wxtoken.component.fleet import Pushed
from wxtoken.component.parts import Part, Parts
from wxtoken.errors import StoreError, UpstreamError, WxtokenError
from wxtoken.record import APP_NAME_RE, MAX_TOKEN_LEN, TokenRecord
from wxtoken.schedule import FUTURE_TOLERANCE

RECONCILE_EVERY = 86400.0
MAX_IMPORT_LINE = 4096  # bytes: a line of an import (an export's line is a few hundred)
# an imported access_token's expires_at: WeChat's tokens live 2 hours (expires_in 7200), and
# the old system's clock may run a few minutes ahead of this host's
IMPORT_AHEAD = 7200 + 600
TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # a token: visible ASCII, no space or control


class Reconciler(Part):
    """The daily reconcile (and its wait for a component token), and the import."""

    def __init__(self, parts: Parts, authorizers: Authorizers, lists: AuthorizerList) -> None:
        super().__init__(parts)
        self.authorizers = authorizers
        self.lists = lists
        self._waiting = False  # a reconcile waits for a component token

    # -- reconcile ------------------------------------------------------------------------------
    def start(self, doc: dict[str, Any]) -> None:
        """Plan the first reconcile: now when the last (``doc``: .platform.json) is more than
        a day old; in the fleet mode when the fleet's is due."""
        last = doc.get("last_reconcile")
        age = self.clock() - last if isinstance(last, (int, float)) else None
        due = 0.0 if age is None or age >= RECONCILE_EVERY else RECONCILE_EVERY - age
        if self.fleet is not None and (wait := self.fleet.reconcile_wait()) is not None:
            due = wait  # the fleet's: one host reconciles a day
        self.host.later(self.reconcile, due, f"reconcile:{self.comp.name}")

    def component_ready(self) -> None:
        """A component token was fetched: a reconcile that waited for one runs now (the
        refresher writes the file right after this: a moment later)."""
        if self._waiting:
            self._waiting = False
            self.host.later(self.reconcile, 0.5, f"reconcile:{self.comp.name}")

    def reconcile(self) -> None:
        """Learn every authorizer from WeChat's list: new ones start, known ones keep the
        listed refresh token as a fallback. Runs daily; retried soon while there is no
        component token."""
        token = self.parts.component_token()
        if token is None:  # run when the component token comes (or in a minute at most)
            self._waiting = True
            self.host.later(self.reconcile, 60, f"reconcile:{self.comp.name}")
            return
        self._waiting = False
        if self.fleet is not None and not self.fleet.take_reconcile(RECONCILE_EVERY):
            wait = self.fleet.reconcile_wait()  # another host did it: look again when due
            self.host.later(self.reconcile,
                            max(60.0, wait if wait is not None else RECONCILE_EVERY),
                            f"reconcile:{self.comp.name}")
            return
        try:
            listed = self.lists.whole(token)
        except UpstreamError as exc:
            self.log.warning("authorizers.reconcile_failed", error=str(exc),
                             errcode=exc.errcode, next_in=600)
            if self.fleet is not None:
                self.fleet.release_reconcile()
            self.host.later(self.reconcile, 600, f"reconcile:{self.comp.name}")
            return
        now = self.clock()
        known = set(self.files.authorizers())
        added = 0
        try:
            for appid, refresh_token in listed.items():
                if appid not in known:
                    # removed lately (an unauthorized event; the list may lag): not brought
                    # back
                    stored = self.authorizers.store_refresh(appid, refresh_token, now)
                    if stored == Pushed.GONE:
                        self.files.remove_authorizer(appid)
                        continue
                    if stored == Pushed.OLDER and self.fleet is not None:  # the fleet knows it
                        self.fleet.pull_refresh(appid, self.files)
                        self.files.note_listed(appid, refresh_token, now)
                    self.authorizers.add(appid)
                    added += 1
                else:
                    self.files.note_listed(appid, refresh_token, now)
        except StoreError as exc:  # the refresh directory refuses writes: again in 10 min
            self.log.error("authorizers.reconcile_failed", error=str(exc), next_in=600)
            if self.fleet is not None:
                self.fleet.release_reconcile()
            self.host.later(self.reconcile, 600, f"reconcile:{self.comp.name}")
            return
        unlisted = sorted(known - set(listed))
        self.files.note(last_reconcile=now, listed=len(listed))
        self.log.info("authorizers.reconciled", listed=len(listed), added=added,
                      not_listed=len(unlisted))
        self.host.later(self.reconcile, RECONCILE_EVERY, f"reconcile:{self.comp.name}")

    # -- import ---------------------------------------------------------------------------------
    def _import_line(self, raw: bytes, now: float) -> tuple[str, str, TokenRecord | None]:
        """One line of an import: (authorizer_appid, refresh token, the token record when a
        still valid access token came with it); ValueError says what is wrong (never with a
        token in it)."""
        if len(raw) > MAX_IMPORT_LINE:
            raise ValueError(f"longer than {MAX_IMPORT_LINE} bytes")
        try:
            doc = json.loads(raw)
        except RecursionError:  # nested deeper than the interpreter's recursion limit
            raise ValueError("not a JSON object (nested too deep)") from None
        except ValueError as exc:
            raise ValueError(f"not a JSON object ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        appid, rt = doc.get("authorizer_appid"), doc.get("refresh_token")
        if not isinstance(appid, str) or not APP_NAME_RE.match(appid):
            raise ValueError("authorizer_appid is missing or not an appid")
        if appid == self.comp.component_appid:
            raise ValueError(f"authorizer_appid {appid} is the component's own appid, not an "
                             "authorizer's")
        if not isinstance(rt, str) or not rt.strip():
            raise ValueError("refresh_token is missing")
        rt = rt.strip()
        if not TOKEN_CHARS.fullmatch(rt):
            raise ValueError("refresh_token holds a character no token has (a control "
                             "character, a space or a non-ASCII one)")
        access, expires = doc.get("access_token"), doc.get("expires_at")
        if access is None and expires is None:
            return appid, rt, None
        if not isinstance(access, str) or not access or isinstance(expires, bool) \
                or not isinstance(expires, int):
            raise ValueError("access_token needs expires_at (Unix seconds), and the other way "
                             "round")
        if not TOKEN_CHARS.fullmatch(access):
            raise ValueError("access_token holds a character no token has (a control "
                             "character, a space or a non-ASCII one)")
        if len(access) > MAX_TOKEN_LEN:
            raise ValueError(f"access_token is longer than {MAX_TOKEN_LEN} characters")
        if expires > now + IMPORT_AHEAD:
            raise ValueError(f"expires_at lies more than {int(IMPORT_AHEAD // 60)} minutes "
                             "ahead: an access_token lives 2 hours (Unix seconds, this "
                             "host's clock)")
        if expires <= now + 1:  # expired: no valid token, the refresh token fetches one
            return appid, rt, None
        refreshed = doc.get("refreshed_at")
        if not isinstance(refreshed, int) or isinstance(refreshed, bool):
            # unknown: counted from now, so it is replaced by its expiry (less renew_before),
            # not at once
            refreshed = int(now)
        elif refreshed > now + FUTURE_TOLERANCE or refreshed > expires:
            raise ValueError("refreshed_at lies ahead of this host's clock or after "
                             "expires_at")
        return appid, rt, TokenRecord(app=appid, appid=appid, access_token=access,
                                      expires_at=expires, refreshed_at=max(1, refreshed))

    def import_lines(self, lines: list[bytes]) -> dict[str, Any]:
        """Seed authorizers from another system: JSON lines of authorizer_appid, refresh_token
        and optionally access_token + expires_at (+ refreshed_at). A valid imported token is
        used until it is due: the switch costs no refresh. Every line is checked before any is
        stored."""
        if self.parts.following:
            raise WxtokenError(f"this host only follows component {self.comp.name} (no "
                               "secret): import on a host of the fleet that has its secret")
        entries = []
        problems = []
        now = time.time()
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                entries.append(self._import_line(raw, now))
            except ValueError as exc:
                problems.append(f"line {number}: {exc}")
        if problems:
            raise WxtokenError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)"
                                                           if len(problems) > 5 else ""))
        tokens = 0
        for appid, refresh_token, record in entries:
            if record is not None:
                tokens += 1
                self.authorizers.publish(appid, record, refresh_token=refresh_token,
                                         authorized_at=self.clock())
            else:
                self.authorizers.store_refresh(appid, refresh_token, self.clock(),
                                               authorized_at=self.clock())
                self.authorizers.add(appid)
        self.log.info("authorizers.imported", authorizers=len(entries), tokens=tokens)
        return {"imported": len(entries), "with_token": tokens}
