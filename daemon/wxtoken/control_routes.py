"""The control endpoint's requests (control.py's docstring lists them, with the limits): the
routes, the answers, and who may do what."""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from wxtoken.config import CGI_PATH_RE
from wxtoken.errors import TokenUnavailable, UpstreamError, WxtokenError
from wxtoken.httpbody import BodyError, read_body
from wxtoken.passive import Forced, ForcedState
from wxtoken.quota import Operations, OpError
from wxtoken.record import APP_NAME_RE, TokenRecord, load_record, token_path

if TYPE_CHECKING:
    from wxtoken.component.platform import Platform
    from wxtoken.control import Server

MAX_BODY = 4096
MAX_IMPORT = 32 << 20  # an import of 10,000+ authorizers' refresh tokens
MAX_HEAD = 8192  # request line and headers together
READ_TIMEOUT = 5.0
HTTP_STATUS = {
    ForcedState.CURRENT: 200, ForcedState.REFRESHED: 200, ForcedState.RATE_LIMITED: 429,
    ForcedState.WAITING: 429, ForcedState.BUDGET: 429, ForcedState.FAILED: 502,
    ForcedState.STORE_FAILED: 503,
}
# force(name, invalid_token, privileged) -> the answer; None once the daemon is stopping
Force = Callable[[str, str | None, bool], Forced | None]
# reload() -> (applied, what changed or why it was refused)
Reload = Callable[[], tuple[bool, list[str]]]


def peer_uid(sock: socket.socket) -> int:
    """The connected peer's uid (SO_PEERCRED); -1 when it cannot be had."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return -1
    return int(struct.unpack("3i", creds)[1])


class HeadLimit:
    """The connection's reader, allowing a request's line and headers MAX_HEAD bytes in all
    (http.server alone allows 64 KiB a line and 100 lines)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.left = MAX_HEAD

    def readline(self, limit: int = -1) -> bytes:
        if self.left <= 0:
            raise http.client.LineTooLong("request head")
        want = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line: bytes = self._raw.readline(want)
        self.left -= len(line)  # past the limit, the next line raises (http.server: 431)
        return line

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _token_body(record: TokenRecord, now: float) -> dict[str, Any]:
    body: dict[str, Any] = {"app": record.app, "access_token": record.access_token,
                            "expires_at": record.expires_at,
                            "expires_in": int(record.expires_at - now)}
    for kind, (ticket, expires_at) in record.tickets.items():
        body[f"{kind}_ticket"] = ticket
        body[f"{kind}_ticket_expires_at"] = expires_at
    return body


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer junk with a status line, never bare HTML
    timeout = READ_TIMEOUT  # each read and write; the whole request has READ_TIMEOUT too
    wbufsize = -1  # one write per response

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines can carry tokens; the refresher logs what matters

    def setup(self) -> None:
        super().setup()
        self.rfile = HeadLimit(self.rfile)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        # the request (line, headers, body) must arrive within READ_TIMEOUT, however slowly
        # it drips: past that, the connection is shut down under the reading thread
        self.rfile.left = MAX_HEAD  # type: ignore[attr-defined]
        self.server.reaper.watch(id(self), self.connection, READ_TIMEOUT)
        try:
            super().handle_one_request()
        finally:
            self._arrived()

    def _arrived(self) -> None:
        self.server.reaper.forget(id(self))

    def _send(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        self._send_raw(status, json.dumps(body).encode(), close)

    def _send_raw(self, status: int, raw: bytes, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's errors (bad request line, headers too long, …), as JSON."""
        reason = message or HTTPStatus(code).phrase
        self._send(code, {"error": reason, "error_class": "bad_request"}, close=True)

    def _route(self) -> tuple[list[str], str | None]:
        """The path's parts and the app name in it (None when there is no valid one)."""
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        name = parts[2] if len(parts) >= 3 and parts[:2] == ["v1", "apps"] else None
        return parts, name if name is not None and APP_NAME_RE.match(name) else None

    def _known(self, name: str | None) -> bool:
        if name is None or name not in {a.name for a in self.server.config.apps}:
            self._send(404, {"error": f"no app named {name!r}", "error_class": "not_found"})
            return False
        return True

    def do_GET(self) -> None:
        self._arrived()
        parts, name = self._route()
        config = self.server.config
        now = time.time()
        if parts == ["v1", "apps"]:
            self._send_raw(200, self.server.health_body())
        elif len(parts) == 3 and parts[:2] == ["v1", "apps"]:
            if not self._known(name):
                return
            assert name is not None
            self._send_token(config.state_dir, name, now)
        elif len(parts) == 4 and parts[:2] == ["v1", "components"]:
            found = self._component(parts[2], parts[3])
            if found is None:
                return
            self._send_token(found.files.dir, parts[3], now)
        elif len(parts) == 4 and parts[:2] == ["v1", "apps"] and parts[3] == "quota":
            if self._known(name):
                assert name is not None
                query = parse_qs(urlsplit(self.path).query)
                path = query.get("path", ["/cgi-bin/token"])[-1]
                self._op(name, lambda ops: ops.quota(name, path), ask=True, path=path)
        elif len(parts) == 5 and parts[:2] == ["v1", "apps"] and parts[3] == "rid":
            if self._known(name):
                assert name is not None
                self._op(name, lambda ops: ops.rid(name, parts[4]), ask=True)
        else:
            self._send(404, {"error": "not found", "error_class": "not_found"})

    def _component(self, name: str, appid: str | None = None) -> Platform | None:
        """The platform named ``name`` (and knowing ``appid``, when given); else 404 sent."""
        platform = (self.server.platforms or {}).get(name) if APP_NAME_RE.match(name) else None
        if platform is None:
            self._send(404, {"error": f"no component named {name!r}",
                             "error_class": "not_found"})
            return None
        if appid is not None and (not APP_NAME_RE.match(appid)
                                  or platform.key(appid) not in platform.keys):
            self._send(404, {"error": f"{name} has no authorizer {appid!r}",
                             "error_class": "not_found"})
            return None
        return platform

    def _component_post(self, parts: list[str]) -> None:
        """POST /v1/components/NAME/…: refresh, ticket, import."""
        if len(parts) == 5 and parts[4] == "refresh":
            try:
                invalid = self._body()
            except _BadRequest as exc:
                self._send(exc.status, {"error": str(exc), "error_class": "bad_request"},
                           close=True)
                return
            finally:
                self._arrived()
            platform = self._component(parts[2], parts[3])
            if platform is None:
                return
            forced = self.server.force(platform.key(parts[3]), invalid, self._privileged())
            if forced is None:
                self._send(503, {"error": "the daemon is stopping", "error_class": "stopping"})
                return
            self._answer(forced)
            return
        if len(parts) != 4 or parts[3] not in ("ticket", "import"):
            self._arrived()
            self._send(404, {"error": "not found", "error_class": "not_found"}, close=True)
            return
        if not self._privileged():
            self._arrived()
            self.server.log.warning("control.forbidden", action=parts[3], component=parts[2],
                                    uid=peer_uid(self.connection))
            self._send(403, {"error": f"only root or the daemon's own user may "
                             f"{'hand over a ticket' if parts[3] == 'ticket' else 'import'}",
                             "error_class": "forbidden"}, close=True)
            return
        try:
            raw = self._raw_body(MAX_BODY if parts[3] == "ticket" else MAX_IMPORT)
        except _BadRequest as exc:
            self._send(exc.status, {"error": str(exc), "error_class": "bad_request"},
                       close=True)
            return
        finally:
            self._arrived()
        platform = self._component(parts[2])
        if platform is None:
            return
        try:
            if parts[3] == "ticket":
                try:
                    doc = json.loads(raw)
                except ValueError:
                    doc = None
                ticket = doc.get("ticket") if isinstance(doc, dict) else None
                if not isinstance(ticket, str) or not ticket.strip():
                    self._send(400, {"error": 'body must be {"ticket": "…"}',
                                     "error_class": "bad_request"})
                    return
                new = platform.on_ticket(ticket.strip(), "control")
                self._send(200, {"stored": True, "new": new})
            else:
                self._send(200, platform.import_lines(raw.splitlines()))
        except WxtokenError as exc:
            self._send(400, {"error": str(exc), "error_class": "bad_request"})
        except OSError as exc:
            self._send(503, {"error": f"could not write the state: {exc.strerror or exc}",
                             "error_class": "store"})

    def _send_token(self, directory: str, name: str, now: float) -> None:
        """The token in ``directory``'s file for ``name``, or 503 when there is no valid one."""
        try:
            record = load_record(token_path(directory, name), name)[0]
        except TokenUnavailable as exc:
            self._send(503, {"error": f"no valid token: {exc.reason}",
                             "error_class": "unavailable"})
            return
        if record.expires_at <= now:
            self._send(503, {"error": "the token has expired", "error_class": "unavailable"})
            return
        self._send(200, _token_body(record, now))

    def _raw_body(self, limit: int) -> bytes:
        try:
            return read_body(self.headers, self.rfile, limit)
        except BodyError as exc:
            raise _BadRequest(exc.status, exc.message) from None

    def _op(self, name: str, call: Callable[[Operations], dict[str, Any]], ask: bool = False,
            path: str | None = None) -> None:
        """Run one of the quota tools and answer with its result or its OpError."""
        ops = self.server.ops
        if ops is None:
            self._send(503, {"error": "the quota tools are not running", "error_class":
                             "stopping"})
            return
        if path is not None and (not CGI_PATH_RE.fullmatch(path) or ".." in path):
            self._send(400, {"error": f"{path!r} is not an API path (like "
                             "/cgi-bin/message/custom/send)", "error_class": "bad_request"})
            return
        try:
            if ask and not self._privileged():
                ops.ask(name)
            self._send(200, call(ops))
        except OpError as exc:
            self._send(exc.status, exc.answer())
        except WxtokenError as exc:  # e.g. the app was removed by a reload meanwhile
            self._send(409, {"error": str(exc), "error_class": "conflict"})
        except Exception as exc:  # a bug: an answer, not a dropped connection
            self.server.log.error("control.op_crashed", app=name,
                                  error=str(exc) or type(exc).__name__)
            self._send(500, {"error": f"internal error ({type(exc).__name__}); see the "
                             "daemon's log", "error_class": "internal"})

    def _body(self) -> str | None:
        """The reported token from the body; _BadRequest for anything but {} or
        {"invalid_token": "<non-empty string>"} sent with a valid Content-Length."""
        try:
            raw = read_body(self.headers, self.rfile, MAX_BODY,
                            chunked="chunked bodies are not accepted: send Content-Length",
                            missing="Content-Length is required (use -d '{}' with curl)")
        except BodyError as exc:
            raise _BadRequest(exc.status, exc.message) from None
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise _BadRequest(400, 'body must be {"invalid_token": "…"}') from None
        if not isinstance(body, dict):
            raise _BadRequest(400, 'body must be {"invalid_token": "…"}')
        invalid = body.get("invalid_token")
        if invalid is None:
            return None
        if not isinstance(invalid, str):
            raise _BadRequest(400, "invalid_token must be a string")
        if not invalid:
            raise _BadRequest(400, "invalid_token is empty: report the token WeChat refused, "
                                   "or send {} to refresh unconditionally")
        return invalid

    def _privileged(self) -> bool:
        """Root or the daemon's own user (SO_PEERCRED): the operator, not a token reader."""
        return peer_uid(self.connection) in (0, os.geteuid())

    def do_POST(self) -> None:
        parts, name = self._route()
        if parts[:2] == ["v1", "components"] and len(parts) >= 4:
            self._component_post(parts)
            return
        try:
            invalid = self._body()
        except _BadRequest as exc:
            self._send(exc.status, {"error": str(exc), "error_class": "bad_request"}, close=True)
            return
        finally:
            self._arrived()
        if parts == ["v1", "reload"]:
            self._reload()
            return
        if len(parts) == 4 and parts[:2] == ["v1", "apps"] and parts[3] == "clear-quota":
            if not self._known(name):
                return
            assert name is not None
            if not self._privileged():
                self.server.log.warning("control.forbidden", action="clear-quota", app=name,
                                        uid=peer_uid(self.connection))
                self._send(403, {"error": "only root or the daemon's own user may reset the "
                                 "quota (it spends one of WeChat's 10 resets a month)",
                                 "error_class": "forbidden"})
                return
            self._op(name, lambda ops: ops.clear_quota(name))
            return
        if not (len(parts) == 4 and parts[:2] == ["v1", "apps"] and parts[3] == "refresh"):
            self._send(404, {"error": "not found", "error_class": "not_found"})
            return
        if not self._known(name):
            return
        assert name is not None
        forced = self.server.force(name, invalid, self._privileged())
        if forced is None:
            self._send(503, {"error": "the daemon is stopping", "error_class": "stopping"})
            return
        self._answer(forced)

    def _reload(self) -> None:
        if not self._privileged():
            self._send(403, {"error": "only root or the daemon's own user may reload",
                             "error_class": "forbidden"})
            return
        applied, lines = self.server.reload()
        if applied:
            self._send(200, {"reloaded": True, "changes": lines})
        else:
            self._send(422, {"reloaded": False, "error": "the new config was refused; the "
                             "running one stays", "error_class": "refused", "problems": lines})

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, POST")
        raw = json.dumps({"error": f"method {self.command} not allowed",
                          "error_class": "bad_request"}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _answer(self, forced: Forced) -> None:
        now = time.time()
        if forced.state in (ForcedState.CURRENT, ForcedState.REFRESHED) and forced.record:
            self._send(200, {**_token_body(forced.record, now),
                             "refreshed": forced.state is ForcedState.REFRESHED})
            return
        answer: dict[str, Any] = {"error_class": forced.state.value}
        if forced.reason:
            answer["error"] = forced.reason
        elif isinstance(forced.error, UpstreamError):
            answer.update(error=str(forced.error), error_class=forced.error.kind.value,
                          errcode=forced.error.errcode, errmsg=forced.error.errmsg)
        elif forced.error is not None:
            answer.update(error=str(forced.error), error_class="store")
        elif forced.state is ForcedState.BUDGET:
            answer["error"] = ("the share of daily_budget passive refreshes may use is spent "
                               "(the rest is kept for scheduled refreshes)")
        elif forced.state is ForcedState.WAITING:
            answer["error"] = ("WeChat's quota is exhausted or the app has a hard error: no "
                               f"call before the wait ends in {forced.retry_after:.0f} s")
        else:
            answer["error"] = f"refresh rate-limited; retry in {forced.retry_after:.0f} s"
        if forced.retry_after:
            answer["retry_after"] = round(forced.retry_after, 1)
        self._send(HTTP_STATUS[forced.state], answer)
