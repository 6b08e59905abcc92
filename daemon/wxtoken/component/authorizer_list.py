"""WeChat's authorizer list (``api_get_authorizer_list``: every authorizer and its current
refresh token), read page by page; one read serves every 61023 repair, every cancellation to
confirm and every lost authorization to adopt for ``LIST_WINDOW`` seconds (single flight)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from wxtoken.component.parts import Parts
from wxtoken.errors import UpstreamError
from wxtoken.record import APP_NAME_RE

LIST_PAGE = 500  # api_get_authorizer_list's largest page
# one read of the authorizer list (every page) serves every 61023 repair for this long; the
# next starts no sooner, however many authorizers need one (a failed read waits as long too)
LIST_WINDOW = 20.0


@dataclass
class ListRead:
    """One read of the authorizer list (every page): appid -> its current refresh token."""

    started: float  # time.monotonic() when the read began
    entries: dict[str, str] = field(default_factory=dict)
    error: UpstreamError | None = None  # the read failed: no other until LIST_WINDOW passes


class AuthorizerList:
    """The authorizer list's reads: whole (the reconcile's), and shared (the repairs')."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self._lock = threading.Lock()  # one authorizer-list read at a time
        self._last: ListRead | None = None  # the last, for the 61023 repairs

    def whole(self, token: str) -> dict[str, str]:
        """Every authorizer and its current refresh token, from WeChat (paged)."""
        p = self.parts
        listed: dict[str, str] = {}
        offset = 0
        while True:
            page = p.host.client.authorizer_list(p.comp.component_appid, token, offset,
                                                 LIST_PAGE)
            items = page.get("list")
            items = items if isinstance(items, list) else []
            for item in items:
                if isinstance(item, dict):
                    appid, rt = item.get("authorizer_appid"), item.get("refresh_token")
                    if isinstance(appid, str) and APP_NAME_RE.match(appid) \
                            and isinstance(rt, str) and rt:
                        listed[appid] = rt
            offset += len(items)
            total = page.get("total_count")
            if not items or not isinstance(total, int) or offset >= total:
                return listed

    def read(self, token: str, newer_than: float | None = None) -> ListRead | None:
        """The authorizer list for 61023 repairs: one read (every page) serves every repair
        for LIST_WINDOW s, and repairs that come while it is being read wait for it. None when
        the last read started before ``newer_than`` (monotonic) and the next is not due yet;
        UpstreamError when the read fails (or failed within the window: no new call)."""
        with self._lock:  # single flight: one read at a time, the others wait for it
            now = time.monotonic()
            last = self._last
            if last is not None and now - last.started < LIST_WINDOW:
                if last.error is not None:
                    raise last.error
                if newer_than is None or last.started >= newer_than:
                    return last
                return None
            read = ListRead(started=now)
            try:
                read.entries = self.whole(token)
            except UpstreamError as exc:
                read.error = exc
                self._last = read
                raise
            self._last = read
            return read

    def due(self) -> float:
        """Seconds until the next read of the authorizer list may start (at least one: a job
        that plans itself again must have ended by then, or its next run is skipped)."""
        last = self._last
        if last is None:
            return 1.0
        return max(0.0, LIST_WINDOW - (time.monotonic() - last.started)) + 1.0
