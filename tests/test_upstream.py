"""The WeChat client against the emulator over real HTTP: success, every fault, no secret leaks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from wxtoken.config import Api, AppConfig
from wxtoken.emulator import Emulator
from wxtoken.errcodes import FETCH_ERRCODES, ErrorClass, business_token_invalid, classify
from wxtoken.errors import UpstreamError
from wxtoken.upstream import WeChatClient

from helpers import APPID, APPID2, CORPID, CORPSECRET, SECRET, SECRET2

MAIN = AppConfig(name="main", api=Api.TOKEN, appid=APPID, secret=SECRET)
MINI = AppConfig(name="mini", api=Api.STABLE_TOKEN, appid=APPID2, secret=SECRET2)
CORP = AppConfig(name="corp", api=Api.WECOM, appid=CORPID, secret=CORPSECRET, agentid="1000002")


@pytest.fixture
def client(emulator: Emulator) -> Iterator[WeChatClient]:
    c = WeChatClient(emulator.url, timeout=(2.0, 1.0))
    yield c
    c.close()


@pytest.mark.parametrize("app", [MAIN, MINI, CORP], ids=lambda a: a.api)
def test_each_api_returns_a_token_the_emulator_accepts(
        app: AppConfig, client: WeChatClient, emulator: Emulator) -> None:
    """token, stable_token and WeCom gettoken all yield a working token and its expires_in."""
    fetched = client.fetch(app)
    assert fetched.expires_in == 7200
    assert emulator.token_status(fetched.access_token) == 0
    assert fetched.took_ms >= 0


def test_user_agent_names_wxtoken(client: WeChatClient) -> None:
    """Requests identify themselves as wxtoken/<version>."""
    from wxtoken import __version__
    assert client.session.headers["User-Agent"] == f"wxtoken/{__version__}"
    assert client.session.verify is True


FAULTS = [
    ("busy", ErrorClass.TRANSIENT, -1),
    ("minute_quota", ErrorClass.TRANSIENT, 45011),
    ("quota", ErrorClass.QUOTA_EXHAUSTED, 45009),
    ("ip", ErrorClass.PERMANENT, 40164),
    ("errcode:40243", ErrorClass.PERMANENT, 40243),
    ("errcode:89503", ErrorClass.NEEDS_HUMAN, 89503),
    ("5xx", ErrorClass.TRANSIENT, None),
    ("garbage", ErrorClass.TRANSIENT, None),
    ("reset", ErrorClass.TRANSIENT, None),
    ("hang", ErrorClass.TRANSIENT, None),
    ("empty_token", ErrorClass.TRANSIENT, None),
]


@pytest.mark.parametrize(("mode", "kind", "errcode"), FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_are_classified_and_never_leak_the_secret(
        mode: str, kind: ErrorClass, errcode: int | None, client: WeChatClient,
        emulator: Emulator) -> None:
    """Each injected fault raises UpstreamError of the right class, without the secret."""
    emulator.state.settings.hang_seconds = 3
    emulator.add_fault(mode, count=1)
    with pytest.raises(UpstreamError) as err:
        client.fetch(MAIN)
    assert err.value.kind is kind
    assert err.value.errcode == errcode
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    # a traceback shows the chain unless suppressed: requests' exception (URL + secret) must not be
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__
    assert emulator.token_status(client.fetch(MAIN).access_token) == 0  # next call works


@pytest.mark.parametrize(("app", "code"), [
    (AppConfig(name="m", api=Api.TOKEN, appid=APPID, secret="wrong-s3cr3t-1"), 40001),
    (AppConfig(name="m", api=Api.STABLE_TOKEN, appid=APPID, secret="wrong-s3cr3t-1"), 40125),
    (AppConfig(name="m", api=Api.TOKEN, appid="wxunknown", secret="wrong-s3cr3t-1"), 40013),
    (AppConfig(name="m", api=Api.WECOM, appid=CORPID, secret="wrong-s3cr3t-1", agentid="1"), 40001),
])
def test_bad_credentials_are_permanent_errors(app: AppConfig, code: int,
                                              client: WeChatClient) -> None:
    """A wrong secret or appid is a permanent error carrying errcode and errmsg."""
    with pytest.raises(UpstreamError) as err:
        client.fetch(app)
    assert err.value.kind is ErrorClass.PERMANENT
    assert err.value.errcode == code and err.value.errmsg
    assert "wrong-s3cr3t-1" not in str(err.value)


def test_connection_refused_is_transient_without_secret() -> None:
    """Nobody listening: a transient error whose text has neither URL query nor secret."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = WeChatClient(f"http://127.0.0.1:{port}", timeout=(1.0, 1.0))
    with pytest.raises(UpstreamError) as err:
        client.fetch(MAIN)
    assert err.value.kind is ErrorClass.TRANSIENT
    assert SECRET not in str(err.value) and "secret=" not in str(err.value)


def test_tls_failure_is_a_clear_error() -> None:
    """An https api_base whose certificate cannot be verified fails clearly (TLS stays on)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer_garbage() -> None:  # not TLS at all: the handshake fails
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer_garbage)
    t.start()
    client = WeChatClient(f"https://127.0.0.1:{port}", timeout=(2.0, 2.0))
    with pytest.raises(UpstreamError) as err:
        client.fetch(MAIN)
    t.join()
    server.close()
    assert err.value.kind is ErrorClass.TRANSIENT
    assert SECRET not in str(err.value)


def test_every_contract_errcode_is_in_the_one_table() -> None:
    """PRODUCT.md's errcodes are all classified, and business-API invalid codes are known."""
    expected = {-1: ErrorClass.TRANSIENT, 45011: ErrorClass.TRANSIENT,
                45009: ErrorClass.QUOTA_EXHAUSTED}
    for code in (40001, 40002, 40013, 40125, 40164, 60020, 40243, 41002, 41004):
        expected[code] = ErrorClass.PERMANENT
    for code in (89501, 89503, 89506, 89507):
        expected[code] = ErrorClass.NEEDS_HUMAN
    # the Open Platform's (#12): a bad ticket or component secret, a wrong or cancelled
    # authorizer, an authorization code that was used; a refresh token WeChat no longer knows
    # (61023) and an authorizer not authorized to this platform (61003) need a reconcile or a human
    for code in (61004, 61005, 61006, 61009, 61011):
        expected[code] = ErrorClass.PERMANENT
    for code in (61003, 61023):
        expected[code] = ErrorClass.NEEDS_HUMAN
    assert {c: k for c, (k, _) in FETCH_ERRCODES.items()} == expected
    assert classify(99999)[0] is ErrorClass.PERMANENT
    assert all(business_token_invalid(c) for c in (40001, 40014, 42001))
    assert not business_token_invalid(45009)


def test_a_dripping_server_is_cut_at_the_overall_deadline(emulator: Emulator) -> None:
    """A server sending one byte every 0.2 s (every read within its timeout) is cut at the
    call's overall deadline, with a transient error; the next call works."""
    s = emulator.state.settings
    s.drip_interval, s.hang_seconds = 0.2, 60
    emulator.add_fault("drip", count=1)
    client = WeChatClient(emulator.url, timeout=(2.0, 1.0), deadline=1.5)
    started = time.monotonic()
    with pytest.raises(UpstreamError) as err:
        client.fetch(MAIN)
    took = time.monotonic() - started
    assert 1.4 <= took < 2.5, took
    assert err.value.kind is ErrorClass.TRANSIENT
    assert "no complete answer from /cgi-bin/token within 1.5 s" in str(err.value)
    assert emulator.token_status(client.fetch(MAIN).access_token) == 0
    client.close()


class _Trap(ThreadingHTTPServer):
    """Records every request it receives (a host a redirect would send the secret to)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                trap.seen.append(f"{self.command} {self.path} {self.rfile.read(length)!r}")
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _record

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("app", [MAIN, MINI, CORP], ids=lambda a: a.api)
def test_redirects_are_never_followed(app: AppConfig, client: WeChatClient,
                                      emulator: Emulator) -> None:
    """A 307 from api_base is a permanent error; nothing (secret included) goes elsewhere."""
    trap = _Trap()
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        emulator.add_fault("redirect", location=f"http://127.0.0.1:{trap.server_port}/steal")
        with pytest.raises(UpstreamError) as err:
            client.fetch(app)
        assert err.value.kind is ErrorClass.PERMANENT
        assert "redirect" in str(err.value) and "307" in str(err.value)
        assert trap.seen == []
    finally:
        trap.shutdown()
        trap.server_close()
