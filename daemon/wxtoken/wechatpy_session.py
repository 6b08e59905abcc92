"""wechatpy integration (``pip install 'wxtoken[wechatpy]'``): an existing wechatpy program reads
its token (and JS-SDK tickets) from wxtoken's file and stops fetching its own.

    from wxtoken.wechatpy_session import WeChatClient
    client = WeChatClient("main", appid="wx0123456789abcdef")   # no secret needed
    client.message.send_text(openid, "hello")

``WeChatClient`` is wechatpy's client with ``fetch_access_token`` routed to the daemon: when WeChat
answers 40001/40014/42001, wechatpy's automatic retry reports the token through the control socket
(one upstream call for the whole host) instead of calling cgi-bin/token itself.
``WxtokenStorage`` alone is the session storage, for clients built by other code.
"""

from __future__ import annotations

import time
from typing import Any

from wechatpy import WeChatClient as _WeChatClient
from wechatpy.session import SessionStorage
from wechatpy.session.memorystorage import MemoryStorage

from wxtoken.errors import TokenUnavailable
from wxtoken.reader import drop_cache, read_token, report_invalid
from wxtoken.record import DEFAULT_SOCKET, DEFAULT_STATE_DIR, TICKET_TYPES


class WxtokenStorage(SessionStorage):  # type: ignore[misc]
    """wechatpy session storage: ``<appid>_access_token`` and the tickets come from the file;
    everything else goes to ``fallback`` (in memory by default)."""

    def __init__(self, app: str, state_dir: str = DEFAULT_STATE_DIR,
                 fallback: Any = None) -> None:
        self.app = app
        self.state_dir = state_dir
        self.fallback = fallback if fallback is not None else MemoryStorage()

    def _from_file(self, key: str) -> tuple[bool, Any]:
        if key.endswith("_access_token"):
            try:
                return True, str(read_token(self.app, self.state_dir))
            except TokenUnavailable:
                return True, None
        for kind in TICKET_TYPES:
            for suffix, index in ((f"_{kind}_ticket", 0), (f"_{kind}_ticket_expires_at", 1)):
                if key.endswith(suffix):
                    try:
                        ticket = read_token(self.app, self.state_dir).record.tickets.get(kind)
                    except TokenUnavailable:
                        ticket = None
                    if ticket is not None:
                        return True, ticket[index]
                    return False, None  # tickets not configured in wxtoken: wechatpy's own
        return False, None

    def get(self, key: str, default: Any = None) -> Any:
        handled, value = self._from_file(key)
        if handled:
            return default if value is None else value
        return self.fallback.get(key, default)

    def set(self, key: str, value: Any, ttl: int | None = None) -> None:
        if self._from_file(key)[0]:
            return  # the daemon owns these values
        self.fallback.set(key, value, ttl)

    def delete(self, key: str) -> None:
        if self._from_file(key)[0]:
            drop_cache(self.app, self.state_dir)
            return
        self.fallback.delete(key)


class WeChatClient(_WeChatClient):  # type: ignore[misc]
    """wechatpy's WeChatClient, fed by wxtoken: it never calls the token endpoint itself."""

    def __init__(self, app: str, appid: str, state_dir: str = DEFAULT_STATE_DIR,
                 control_socket: str = DEFAULT_SOCKET, fallback: Any = None,
                 **kwargs: Any) -> None:
        self.app = app
        self.state_dir = state_dir
        self.control_socket = control_socket
        super().__init__(appid, secret=None,
                         session=WxtokenStorage(app, state_dir, fallback), **kwargs)

    def fetch_access_token(self) -> dict[str, Any]:
        """Called by wechatpy without a token or after WeChat refused one: ask the daemon."""
        current = self.session.get(self.access_token_key)
        if current:
            token = report_invalid(self.app, current, self.state_dir, self.control_socket)
        else:
            token = read_token(self.app, self.state_dir)  # raises a clear TokenUnavailable
        return {"access_token": str(token), "expires_in": int(token.expires_at - time.time())}
