"""``read_token``: what every consumer calls. Standard library only, so importing it is cheap.

The hot path is one dict lookup and one wall clock read: the file is re-validated (stat of
inode, mtime, size) at most every ``CHECK_EVERY`` seconds. That is safe because WeChat keeps a
routinely replaced token valid for about 5 minutes after its successor is issued, so a reader that
hands out the previous token for up to 100 ms more is still handing out a working token. A token is
never returned past its ``expires_at`` by the same clock (a deadline on the monotonic clock
overshot it by a rounding of the wall clock, or a step of it); a clock stepped back before the
entry's time re-validates at once.
"""

from __future__ import annotations

import os
import time

from wxtoken.errors import TokenExpired, TokenMissing, TokenUnavailable
from wxtoken.record import (
    APP_NAME_RE,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    TokenRecord,
    load_record,
    token_path,
)

CHECK_EVERY = 0.1  # seconds between re-validations of the file


class Token(str):
    """An access_token: usable as a ``str``, with ``expires_at`` (Unix seconds) attached."""

    expires_at: int
    record: TokenRecord

    def __new__(cls, record: TokenRecord) -> Token:
        self = super().__new__(cls, record.access_token)
        self.expires_at = record.expires_at
        self.record = record
        return self

    @property
    def access_token(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:  # never print a whole credential by accident
        return f"<Token {self[:6]}… expires_at={self.expires_at}>"


# (state_dir, app) -> (token, when it was cached, deadline, file identity), times on the wall
# clock. The deadline is the next re-validation or the token's expiry, whichever comes first;
# the identity is (st_dev, st_ino, st_mtime_ns, st_size). A plain tuple and a plain dict:
# single operations on them are atomic, and neither typing nor threading needs importing
# (readers pay only for what they use).
_Entry = tuple[Token, float, float, tuple[int, int, int, int]]
_cache: dict[tuple[str, str], _Entry] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_token(app: str, state_dir: str = DEFAULT_STATE_DIR,
               component: str | None = None) -> Token:
    """Return the app's valid access_token from ``<state_dir>/<app>.json``; with
    ``component="NAME"``, the Open Platform authorizer ``app``'s (an authorizer appid, or the
    component_appid for the component token) from ``<state_dir>/components/NAME/<app>.json``.

    Raises TokenMissing, TokenCorrupt or TokenExpired (all ``TokenUnavailable``, a LookupError);
    "permission denied" is TokenCorrupt (the file is there, this user cannot use it).
    """
    if component is not None:
        if not APP_NAME_RE.match(component):
            raise TokenMissing(app, f"{component!r} is not a valid component name")
        state_dir = os.path.join(state_dir, "components", component)
    entry = _cache.get((state_dir, app))
    if entry is not None and entry[1] <= time.time() < entry[2]:
        return entry[0]
    return _revalidate(app, state_dir, entry)


def _revalidate(app: str, state_dir: str, entry: _Entry | None) -> Token:
    if not APP_NAME_RE.match(app):  # never a path outside the state dir
        raise TokenMissing(app, "not a valid app name (letters, digits, '_' and '-')")
    path = token_path(state_dir, app)
    try:
        st: os.stat_result | None = os.stat(path)
    except OSError:
        st = None  # the loader says why
    if entry is not None and st is not None and _identity(st) == entry[3]:
        token = entry[0]
    else:
        try:
            # the identity must describe the bytes parsed (fstat of the same open), not a later file
            record, st = load_record(path, app)
        except TokenUnavailable:
            _cache.pop((state_dir, app), None)
            raise
        token = Token(record)
    now = time.time()
    remaining = token.expires_at - now
    if remaining <= 0:
        _cache.pop((state_dir, app), None)
        raise TokenExpired(app, f"token in {path} expired {int(-remaining)} s ago "
                                "(is the wxtoken daemon running?)")
    _cache[(state_dir, app)] = (token, now, min(now + CHECK_EVERY, token.expires_at),
                                _identity(st))
    return token


def report_invalid(app: str, token: str, state_dir: str = DEFAULT_STATE_DIR,
                   control_socket: str = DEFAULT_SOCKET, timeout: float = 40.0,
                   component: str | None = None) -> Token:
    """Tell the daemon WeChat refused ``token`` (errcode 40001/40014/42001); return a valid one.

    The cache is dropped at once. If the file already holds another token, the daemon answers
    with it and makes no upstream call; otherwise it refreshes (at most once per 30 s per app,
    however many processes report). ``component`` as for :func:`read_token`. Raises
    ControlError when the daemon cannot help.
    """
    from wxtoken.control_client import refresh  # http.client only when a report is made

    drop_cache(app)
    refresh(app, token, control_socket, timeout, component)
    return read_token(app, state_dir, component)


def drop_cache(app: str | None = None, state_dir: str | None = None) -> None:
    """Forget cached tokens (all, or one app's), so the next read goes to the file."""
    for key in list(_cache):
        if (state_dir is None or key[0] == state_dir) and (app is None or key[1] == app):
            _cache.pop(key, None)
