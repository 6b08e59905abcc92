"""The one table that classifies WeChat's errcodes, and what the refresher does with each class;
the operations' errcodes (quota, clear_quota, rid); the rid WeChat puts in an errmsg."""

from __future__ import annotations

import enum
import re


class ErrorClass(enum.StrEnum):
    """How a failed fetch is handled."""

    TRANSIENT = "transient"  # retry soon, capped exponential backoff with jitter
    QUOTA_EXHAUSTED = "quota_exhausted"  # no more calls until WeChat's daily reset
    PERMANENT = "permanent"  # configuration is wrong: long backoff, error log with a hint
    NEEDS_HUMAN = "needs_human"  # the account needs an operator: long backoff, error log
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - only on business APIs: the token is no longer good


HARD_ERRORS = frozenset({ErrorClass.PERMANENT, ErrorClass.NEEDS_HUMAN})

# errcode -> (class, hint for the operator). On the token endpoints 40001 means "bad secret".
FETCH_ERRCODES: dict[int, tuple[ErrorClass, str]] = {
    -1: (ErrorClass.TRANSIENT, "WeChat is busy; retrying"),
    45011: (ErrorClass.TRANSIENT, "API minute quota reached; retrying later"),
    45009: (ErrorClass.QUOTA_EXHAUSTED,
            "daily quota exhausted; no more calls until the daily reset (00:00 Asia/Shanghai)"),
    40001: (ErrorClass.PERMANENT, "the secret is wrong (or was reset in the WeChat console)"),
    40002: (ErrorClass.PERMANENT, "grant_type is invalid"),
    40013: (ErrorClass.PERMANENT, "the appid/corpid is invalid"),
    40125: (ErrorClass.PERMANENT, "the secret is invalid"),
    40164: (ErrorClass.PERMANENT,
            "this host's IP is not whitelisted: add it to the IP whitelist in the WeChat console"),
    60020: (ErrorClass.PERMANENT,
            "this host's IP is not allowed: add it to the WeCom app's trusted IPs"),
    40243: (ErrorClass.PERMANENT, "the AppSecret is frozen: unfreeze it in the WeChat console"),
    41002: (ErrorClass.PERMANENT, "appid is missing"),
    41004: (ErrorClass.PERMANENT, "secret is missing"),
    # the Open Platform (第三方平台)
    61004: (ErrorClass.PERMANENT,
            "this host's IP is not in the platform's IP whitelist (开发资料 in the Open Platform "
            "console)"),
    61005: (ErrorClass.PERMANENT, "the component_verify_ticket has expired: waiting for "
            "WeChat's next push (every 10 minutes) to callback_listen"),
    61006: (ErrorClass.PERMANENT, "the component_verify_ticket is invalid: waiting for "
            "WeChat's next push (every 10 minutes) to callback_listen"),
    61011: (ErrorClass.PERMANENT, "component_appid is not a third-party platform"),
    61003: (ErrorClass.NEEDS_HUMAN, "the authorizer has cancelled its authorization"),
    61009: (ErrorClass.PERMANENT, "the authorization code is invalid or was used already"),
    61023: (ErrorClass.NEEDS_HUMAN, "the authorizer_refresh_token is no longer valid"),
    89501: (ErrorClass.NEEDS_HUMAN, "the account administrator must confirm this IP"),
    89503: (ErrorClass.NEEDS_HUMAN, "the account administrator must confirm this IP"),
    89506: (ErrorClass.NEEDS_HUMAN, "the administrator rejected this IP; wait 24 h or re-request"),
    89507: (ErrorClass.NEEDS_HUMAN, "the administrator rejected this IP; wait 1 h or re-request"),
}

# On business APIs these errcodes mean "this access_token is no longer good": passive refresh.
TOKEN_INVALID_ERRCODES: frozenset[int] = frozenset({40001, 40014, 42001})


def classify(errcode: int) -> tuple[ErrorClass, str]:
    """Class and operator hint for an errcode a token endpoint returned.

    Unknown errcodes are treated as permanent: retrying something we do not understand at the
    transient rate would spend quota for nothing.
    """
    return FETCH_ERRCODES.get(errcode, (ErrorClass.PERMANENT, "unknown errcode; see WeChat docs"))


def business_token_invalid(errcode: int) -> bool:
    """Whether a business API's errcode means the caller should report its token as invalid."""
    return errcode in TOKEN_INVALID_ERRCODES


# The operations (openapi/quota/get, clear_quota/v2, openapi/rid/get): what each errcode means.
OPS_ERRCODES: dict[int, str] = {
    48006: "WeChat refuses: this month's 10 quota resets are used up (clear_quota and "
           "clear_quota/v2 share them; they come back on the 1st, Asia/Shanghai)",
    76021: "WeChat does not know this cgi_path (give the API's path, e.g. "
           "/cgi-bin/message/custom/send)",
    76022: "WeChat cannot report the quota of this cgi_path (the account does not own this "
           "API, or it is an /sns/ path)",
    76001: "WeChat does not know this rid (it keeps rids 7 days)",
    76002: "the rid is malformed (it looks like 617682e1-09059ac5-34a8e2ea)",
    76003: "this rid belongs to another account",
    76004: "this rid is too old (WeChat keeps rids 7 days)",
    40013: "the appid is invalid",
    40125: "the secret is invalid (or was reset in the WeChat console)",
    40001: "WeChat refused the secret or the token",
    42001: "the token has expired",
    45009: "the daily quota of this API is used up",
    -1: "WeChat is busy; try again",
}

_RID = re.compile(r"\brid:\s*([0-9A-Za-z-]{6,64})")


def rid_of(errmsg: object) -> str | None:
    """The request id WeChat appends to a failed call's errmsg ("… rid: 617682e1-…"), if any."""
    match = _RID.search(errmsg) if isinstance(errmsg, str) else None
    return match.group(1) if match else None


TICKET_ERRCODES = frozenset({61005, 61006})  # a new component_verify_ticket ends these waits
