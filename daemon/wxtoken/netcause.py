"""What went wrong with a call that got no HTTP answer, in one line naming host, port and
cause (refused, DNS, TLS, proxy, timeout), translated once from requests' and urllib3's
exception chains. Their own messages carry the full URL, whose query string holds the secret:
nothing of them is repeated, only the host, the port and the cause."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests
import urllib3


def proxied(url: str) -> bool:
    return bool(requests.utils.get_environ_proxies(url))


def where(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it: requests wraps urllib3's, which wraps the OS's
    (``reason`` on urllib3's MaxRetryError and its proxy errors, else cause or context)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [getattr(item, "reason", None), *item.args, item.__cause__, item.__context__]


# urllib3 < 2 has no NameResolutionError (a name that does not resolve is a gaierror there)
_NAME_ERRORS: tuple[type[BaseException], ...] = (socket.gaierror, *(
    [urllib3.exceptions.NameResolutionError]
    if hasattr(urllib3.exceptions, "NameResolutionError") else []))


def describe(exc: requests.exceptions.RequestException, url: str, connected: bool) -> str:
    """What went wrong, naming host, port and cause, and never the URL (its query holds the
    secret)."""
    place = where(url)
    chain = list(_chain(exc))
    proxy = any(isinstance(e, requests.exceptions.ProxyError | urllib3.exceptions.ProxyError)
                for e in chain)
    if any(isinstance(e, _NAME_ERRORS) for e in chain):
        return (f"cannot resolve {'the proxy' if proxy else urlsplit(url).hostname} (DNS): "
                "check the resolver and egress")
    if proxy:
        why = ("refused the connection" if any(isinstance(e, ConnectionRefusedError)
                                               for e in chain) else "failed")
        return (f"the proxy (HTTPS_PROXY) {why}, on the way to {place}: check the proxy and "
                "that it lets this host through")
    if isinstance(exc, requests.exceptions.SSLError) or any(
            isinstance(e, ssl.SSLError) for e in chain):
        reason = next((e.reason for e in chain if isinstance(e, ssl.SSLError) and e.reason),
                      "handshake failed")
        if "CERTIFICATE" in str(reason):
            return f"TLS verification failed for {place}: {reason} (check ca_bundle)"
        return f"TLS handshake with {place} failed: {reason}"
    if isinstance(exc, requests.exceptions.Timeout) and not connected:
        # the TCP connect, a proxy's CONNECT or the TLS handshake did not finish in time
        via = " through the proxy (HTTPS_PROXY)" if proxied(url) else ""
        return f"timed out connecting to {place}{via} (TCP, TLS handshake or proxy)"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer from {place} in time (read timeout)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return f"connection refused by {place}"
    if isinstance(exc, requests.exceptions.ConnectionError):
        if not connected:
            return f"cannot connect to {place}"
        return f"connection to {place} reset or closed before the answer"
    return f"{type(exc).__name__} talking to {place}"
