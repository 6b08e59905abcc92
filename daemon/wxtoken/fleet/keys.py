"""The fleet's Redis keys. One WeChat identity's keys share a Redis Cluster hash tag (the part
in braces), so they live in one slot; no key name ever holds a secret.

    <prefix>:{<identity>}:record   the token file's JSON plus "gen" (and who wrote it)
    <prefix>:{<identity>}:lease    redis-py Lock: held while a refresh is decided and made
    <prefix>:{<identity>}:gen      the generation counter (fencing), taken with the lease
    <prefix>:{<identity>}:status   fleet-wide counts: calls today, forced refreshes, spacing
    <prefix>:{<identity>}:meta     what the hosts agree the identity is (api, appid, tickets)
    <prefix>:{<identity>}:fenced   the generation of a record a late fetch may have retired
                                   (a fenced host's, or one made while Redis was away)
    <prefix>:{<identity>}:gone     the identity was removed (an Open Platform's authorizer
                                   that cancelled): no record is written or re-seeded while it
                                   is there (7 days; a new authorization deletes it)
    <prefix>:version               incremented on every record write (the followers' poll)
    <prefix>:events                pub/sub channel: "<identity> <version>" after a change
    <prefix>:requests:<identity>   pub/sub channel: a follower's passive refresh, heard by the
                                   identity's candidates only
    <prefix>:resets:{<appid>}:<YYYY-MM>  quota resets of the account that month (clear-quota)

An identity is ``<appid>:token``, ``<appid>:stable_token`` or ``<corpid>:wecom:<agentid>``.
"""

from __future__ import annotations


class Keys:
    """The keys of one identity."""

    def __init__(self, prefix: str, identity: str) -> None:
        base = f"{prefix}:{{{identity}}}"
        self.identity = identity
        self.record = f"{base}:record"
        self.lease = f"{base}:lease"
        self.gen = f"{base}:gen"
        self.status = f"{base}:status"
        self.meta = f"{base}:meta"
        self.fenced = f"{base}:fenced"
        self.gone = f"{base}:gone"


def version_key(prefix: str) -> str:
    return f"{prefix}:version"


def channel(prefix: str) -> str:
    return f"{prefix}:events"


def request_channel(prefix: str, identity: str) -> str:
    return f"{prefix}:requests:{identity}"


def resets_key(prefix: str, appid: str, month: str) -> str:
    return f"{prefix}:resets:{{{appid}}}:{month}"
