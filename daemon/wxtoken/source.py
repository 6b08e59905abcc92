"""Where a refresher gets its token: the one narrow interface every token family implements."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from wxtoken.schedule import Outcome, RefreshModel, State

if TYPE_CHECKING:
    from wxtoken.config import AppConfig
    from wxtoken.record import TokenRecord
    from wxtoken.upstream import Fetched

PARENT_RECHECK = 60.0  # a token waiting for its parent looks again this often (or is woken)


class TokenSource(Protocol):
    """Where a refresher gets its token and tickets: the WeChat client (an app's), an Open
    Platform's component or authorizer source (component/sources.py). Each is given what it
    needs when built; a test can script one in-process."""

    def fetch(self, app: AppConfig, force_refresh: bool = False) -> Fetched:
        """A token; UpstreamError (``called``: whether WeChat may have answered)."""

    def fetch_ticket(self, app: AppConfig, access_token: str, kind: str) -> Fetched:
        """A jsapi or wx_card ticket with ``access_token``; UpstreamError."""

    def model(self, app: AppConfig) -> RefreshModel:
        """How this source's API hands out tokens (schedule.RefreshModel): whether a call
        retires the last token, and whether a new one comes only in a final window."""

    def waiting_for(self, app: AppConfig) -> str | None:
        """The registry key of the token this one is fetched with (its parent: an
        authorizer's component token) while that token is not there, so no call can be made:
        the refresher waits, quietly, and the parent's next token wakes it. None when nothing
        is missing (and for a token with no parent)."""

    def unpublished(self, appid: str) -> bool:
        """Whether a token WeChat handed out waits here, its durable credential (an
        authorizer's rotated refresh token) not saved yet: the refresher runs (backing off)
        until it is, due or not, and the fetch hands it over without a call."""


class ParentWait:
    """A refresher's side of its source's parent token: whether the last run found it missing
    (the registry then wakes the refresher when the parent's run ends with a valid token), when
    it looked, and one log line per wait."""

    def __init__(self, source: TokenSource, app: AppConfig, log: Any) -> None:
        self.source = source
        self.app = app
        self.log = log
        self.missing: str | None = None  # the parent the last run found missing
        self.checked_at = 0.0  # when it looked (monotonic: the registry compares)
        self._logged: str | None = None

    def look(self) -> str | None:
        """The parent's key when it is missing (no call can be made)."""
        self.checked_at = time.monotonic()
        return self.source.waiting_for(self.app)

    def waits(self, parent: str, record: TokenRecord | None, now: float) -> Outcome:
        """No call, nothing counted, no failure: the refresher waits (woken when it comes)."""
        if self._logged != parent:
            self.log.info("refresh.waits_for", parent=parent,
                          reason="the token it is fetched with is not there yet: no call; it "
                          "goes as soon as that one comes")
        self._logged = self.missing = parent
        return Outcome(State.WAITING, now + PARENT_RECHECK,
                       record.expires_at if record else None)

    def problem(self, record: TokenRecord | None, now: float) -> str | None:
        """What health says of a token gone while its parent is missing."""
        if self.missing is not None and (record is None or record.expires_at <= now):
            return f"waiting for the token it is fetched with ({self.missing})"
        return None

    def there(self) -> None:
        """The run went on to a call: the next wait logs again."""
        self._logged = None
