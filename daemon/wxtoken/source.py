"""Where a refresher gets its token: the one narrow interface every token family implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from wxtoken.schedule import RefreshModel

if TYPE_CHECKING:
    from wxtoken.config import AppConfig
    from wxtoken.upstream import Fetched


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
