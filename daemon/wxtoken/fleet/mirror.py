"""Writing each token (and its tickets) under the Redis key layouts existing SDKs read, so a
Java, Go or Python service on the fleet uses the fleet's token and fetches none of its own
while it is valid. Every key gets a TTL of the token's (or ticket's) remaining life.

The layouts, read from each project's source:

- ``wechatpy`` 1.8 and 2.x, ``RedisStorage(redis, prefix="wechatpy")``
  (wechatpy/session/redisstorage.py: key ``<prefix>:<key>``, value ``json.dumps``;
  wechatpy/client/base.py: ``<appid>_access_token``, and from 2.0.0a16
  ``<appid>_access_token_expires_at``; wechatpy/client/api/jsapi.py: ``<appid>_jsapi_ticket``,
  ``<appid>_jsapi_card_ticket`` and their ``_expires_at``, a bare JSON integer). A client that
  never fetched a token itself trusts the key while it exists.
- ``wxjava`` (binarywang/WxJava >= 3.8, ``WxMpRedisConfigImpl`` with Jedis or RedisTemplate;
  weixin-java-mp/.../config/impl/WxMpRedisConfigImpl.java): ``<keyPrefix>:access_token:<appid>``
  and ``<keyPrefix>:ticket:key:<appid>:jsapi|wx_card``, plain strings; a key whose TTL is under
  2 s counts as expired, so the TTL matters. The Spring Boot starter's keyPrefix is ``wx``.
  (Redisson's codec is not a plain string: not covered.)
- ``silenceper`` (silenceper/wechat v2; credential/default_access_token.go,
  credential/default_js_ticket.go): ``gowechat_officialaccount__access_token_<appid>`` (the
  prefix ``gowechat_officialaccount_`` plus ``_access_token_``), for stable_token apps
  ``…__stable_access_token_<appid>``, and ``…__jsapi_ticket_<appid>``; the key's presence is
  what counts. The value is written raw, as v2.1.3 and later (go-redis) read it; v2.0.0 to
  v2.1.2 JSON-encoded it and would read these values as missing.

WeCom apps are not mirrored (their SDK layouts differ).
"""

from __future__ import annotations

import json

from wxtoken.record import TokenRecord

# the ticket names each layout uses, by wxtoken ticket kind
_WECHATPY_TICKETS = {"jsapi": "jsapi_ticket", "wx_card": "jsapi_card_ticket"}


def entries(sdks: tuple[str, ...], prefix_of: dict[str, str], record: TokenRecord, api: str,
            now: float) -> list[tuple[str, str, int]]:
    """(key, value, ttl seconds) for every key to write; none for what has expired."""
    out: list[tuple[str, str, int]] = []
    appid = record.appid
    token_ttl = int(record.expires_at - now)
    if api == "wecom" or token_ttl < 2:
        return out
    tickets = {kind: (ticket, exp, int(exp - now))
               for kind, (ticket, exp) in record.tickets.items() if exp - now >= 2}
    for sdk in sdks:
        prefix = prefix_of[sdk]
        if sdk == "wechatpy":
            out.append((f"{prefix}:{appid}_access_token", json.dumps(record.access_token),
                        token_ttl))
            out.append((f"{prefix}:{appid}_access_token_expires_at",
                        json.dumps(record.expires_at), token_ttl))
            for kind, (ticket, exp, ttl) in tickets.items():
                name = f"{prefix}:{appid}_{_WECHATPY_TICKETS[kind]}"
                out.append((name, json.dumps(ticket), ttl))
                out.append((f"{name}_expires_at", json.dumps(exp), ttl))
        elif sdk == "wxjava":
            out.append((f"{prefix}:access_token:{appid}", record.access_token, token_ttl))
            for kind, (ticket, _, ttl) in tickets.items():
                out.append((f"{prefix}:ticket:key:{appid}:{kind}", ticket, ttl))
        elif sdk == "silenceper":
            kind_of_token = "stable_access_token" if api == "stable_token" else "access_token"
            out.append((f"{prefix}_{kind_of_token}_{appid}", record.access_token, token_ttl))
            if "jsapi" in tickets:
                ticket, _, ttl = tickets["jsapi"]
                out.append((f"{prefix}_jsapi_ticket_{appid}", ticket, ttl))
    return out
