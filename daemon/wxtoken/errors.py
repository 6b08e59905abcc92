"""Every exception wxtoken raises on purpose.

Third-party errors (tomllib, requests, OSError) are translated where they enter, so callers only
ever see this tree::

    WxtokenError
    ├── ConfigError          bad configuration; carries every problem found (exit code 78)
    ├── TokenUnavailable     a reader cannot hand out a token (also a LookupError)
    │   ├── TokenMissing     no token file for that app yet
    │   ├── TokenCorrupt     the file is empty, not JSON, another schema or another app's
    │   └── TokenExpired     the file's token is past its expires_at
    ├── UpstreamError        WeChat (or the network to it) refused to hand out a token
    ├── StoreError           the state directory could not be written (disk full, read-only, …)
    │   └── Superseded       a newer record was written meanwhile (the fleet's fencing)
    └── ControlError         the daemon's control endpoint refused or could not serve a request
"""

from __future__ import annotations

from wxtoken.errcodes import ErrorClass  # enum only: importing errors stays cheap for readers


class WxtokenError(Exception):
    """Base class of every error wxtoken raises on purpose."""


class ConfigError(WxtokenError, ValueError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class TokenUnavailable(WxtokenError, LookupError):
    """A reader cannot return a valid token for ``app``."""

    def __init__(self, app: str, reason: str) -> None:
        self.app = app
        self.reason = reason
        super().__init__(f"wxtoken: {app}: {reason}")


class TokenMissing(TokenUnavailable):
    """There is no token file for the app (the daemon has not written one yet)."""


class TokenCorrupt(TokenUnavailable):
    """The token file exists but is not a valid wxtoken file for this app."""


class TokenExpired(TokenUnavailable):
    """The token in the file is past its ``expires_at``."""


class UpstreamError(WxtokenError):
    """A call to WeChat failed; ``kind`` says how the refresher must react."""

    def __init__(self, kind: ErrorClass, message: str, errcode: int | None = None,
                 errmsg: str | None = None, rid: str | None = None,
                 called: bool = True, waiting: bool = False) -> None:
        self.kind = kind
        self.errcode = errcode
        self.errmsg = errmsg
        self.rid = rid  # WeChat's request id from the errmsg ("… rid: <id>"), for rid/get
        self.called = called  # False: refused before any call was made (counts no quota)
        # nothing went wrong: what the call needs has not come yet (an Open Platform's first
        # component_verify_ticket); logged at info, not as a failure
        self.waiting = waiting
        super().__init__(message)


class StoreError(WxtokenError):
    """Writing the state directory failed; the previous token file is untouched."""


class Superseded(StoreError):
    """The fleet's record has a higher generation than this holder's: another host wrote a
    newer token after this one's lease ran out, and this write is refused."""


class ControlError(WxtokenError):
    """A passive refresh (or another control request) failed; ``error_class`` says why."""

    def __init__(self, message: str, status: int = 0, error_class: str | None = None,
                 errcode: int | None = None, retry_after: float | None = None,
                 answer: dict[str, object] | None = None) -> None:
        self.status = status
        self.error_class = error_class
        self.errcode = errcode
        self.retry_after = retry_after
        self.answer = answer or {}  # the daemon's whole JSON answer
        super().__init__(message)
