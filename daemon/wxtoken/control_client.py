"""Client of the daemon's control endpoint (HTTP/1.1 over a Unix socket). Standard library only,
so ``report_invalid`` costs a reader nothing until it is called."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

from wxtoken.errors import ControlError
from wxtoken.record import APP_NAME_RE, DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


BUSY_RETRIES = (0.1, 0.2, 0.4, 0.8, 1.5)  # waits after a "too many connections" answer


def request(method: str, path: str, body: dict[str, Any] | None = None,
            control_socket: str = DEFAULT_SOCKET, timeout: float = 40.0) -> dict[str, Any]:
    """One request; the JSON answer, or ControlError with the daemon's reason. An answer that
    the daemon is busy (all connections taken) is retried a few times over three seconds."""
    for wait in BUSY_RETRIES:
        try:
            return _request(method, path, body, control_socket, timeout)
        except ControlError as exc:
            if exc.error_class != "busy":
                raise
        time.sleep(wait)
    return _request(method, path, body, control_socket, timeout)


def request_raw(method: str, path: str, payload: bytes, control_socket: str = DEFAULT_SOCKET,
                timeout: float = 40.0) -> dict[str, Any]:
    """One request with a raw body (an import's JSON lines)."""
    return _request(method, path, None, control_socket, timeout, payload)


def _request(method: str, path: str, body: dict[str, Any] | None, control_socket: str,
             timeout: float, raw: bytes | None = None) -> dict[str, Any]:
    conn = _UnixConnection(control_socket, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else raw
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except PermissionError:
        raise ControlError(f"permission denied on {control_socket} "
                           "(join the wxtoken group)") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"cannot reach the wxtoken daemon at {control_socket} "
                           "(is it running?)") from None
    except TimeoutError:
        raise ControlError(f"no answer from the wxtoken daemon within {timeout:.0f} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ControlError(f"control request failed: {exc}") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        raise ControlError(f"unexpected answer from the daemon (HTTP {resp.status})") from None
    if resp.status != 200:
        raise ControlError(str(data.get("error", f"HTTP {resp.status}")), resp.status,
                           data.get("error_class"), data.get("errcode"), data.get("retry_after"),
                           data if isinstance(data, dict) else None)
    if not isinstance(data, dict):
        raise ControlError("unexpected answer from the daemon")
    return data


def refresh(app: str, invalid_token: str | None = None,
            control_socket: str = DEFAULT_SOCKET, timeout: float = 40.0,
            component: str | None = None) -> dict[str, Any]:
    """Ask the daemon for a new token (passive refresh); returns {"access_token", ...}.

    With ``invalid_token`` the daemon refreshes only if that is still the current token; an
    empty one is refused (it would turn compare-and-refresh into an unconditional refresh).
    """
    if not APP_NAME_RE.match(app):
        raise ControlError(f"{app!r} is not a valid app name (letters, digits, '_' and '-')")
    if invalid_token is not None and not invalid_token:
        raise ControlError("the reported token is empty: pass the token WeChat refused, or "
                           "leave --invalid out to refresh unconditionally")
    body = {"invalid_token": invalid_token} if invalid_token is not None else {}
    if component is not None:
        if not APP_NAME_RE.match(component):
            raise ControlError(f"{component!r} is not a valid component name")
        return request("POST", f"/v1/components/{component}/{app}/refresh", body,
                       control_socket, timeout)
    return request("POST", f"/v1/apps/{app}/refresh", body, control_socket, timeout)
