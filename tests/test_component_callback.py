"""The Open Platform's callback and files against what is not WeChat: strangers' malformed
requests, a disk that cannot take the ticket, and a daemon started under a strict umask. Real
daemons, the real callback endpoint over HTTP, the emulator, real files and users."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import selectors
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from wxtoken.component.crypto import CryptoError, MessageCrypto, signature
from wxtoken.emulator import Emulator
from wxtoken.emulator.component import Component

from helpers import (
    NOBODY,
    DaemonProcess,
    fill,
    run_as,
    run_cli,
    small_tmpfs,
    stdlib_reader_copy,
    wait_until,
)

COMP = "wx0c0c0000000000c1"
SECRET = "comp-s3cr3t-0123456789"
MSG_TOKEN = "msg-s3cr3t-token-0123"
AES_KEY = "s3cr3tabcdefghijklmnopqrstuvwxyz0123456789A"  # 43 characters, as WeChat shows it
AUTHORIZER = "wxauth000000000c01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def platform_config(path: Path, state: Path, emulator: Emulator, sock_dir: Path,
                    port: int, listen: str | None = None) -> Path:
    settings = {"state_dir": str(state), "api_base": emulator.url, "log_format": "json",
                "control_socket": str(sock_dir / "control.sock"),
                "callback_listen": listen or f"127.0.0.1:{port}", "refresh_interval": 600,
                "renew_before": 10}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[components.plat]", f'component_appid = "{COMP}"', f'secret = "{SECRET}"',
              f'msg_token = "{MSG_TOKEN}"', f'encoding_aes_key = "{AES_KEY}"']
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def callback_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/components/plat/callback"


def ticket_push(emulator: Emulator, comp: Component) -> tuple[dict[str, str], bytes]:
    """(query, body) of a correctly signed component_verify_ticket push, as WeChat sends it."""
    plat = emulator.platforms
    xml = plat.message(comp, {"InfoType": "component_verify_ticket",
                              "ComponentVerifyTicket": plat.new_ticket(comp)})
    return plat.sealed(comp, xml)


def callback_lines(d: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in d.events() if str(e.get("event", "")).startswith("callback.")]


def test_strangers_malformed_requests_are_4xx_warnings_not_crashes(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A msg_signature that is not ASCII (hmac.compare_digest raised TypeError on it),
    timestamp=² (str.isdigit() is true, int() fails) or in other non-ASCII digits, a non-ASCII
    nonce, a signed Encrypt that is not ASCII (base64 raised ValueError): each a 4xx and a
    warning, never a 500, an error line or a traceback; a correct push still works after."""
    port = free_port()
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             port)
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)  # no pusher: pushed here
    d = daemons(config)
    d.wait_for("callback.listening", timeout=15)
    query, body = ticket_push(emulator, comp)
    strangers = [
        {**query, "msg_signature": "é" * 40},
        {**query, "msg_signature": "ａ" * 40},  # fullwidth: .lower() keeps it non-ASCII
        {**query, "timestamp": "²"},
        {**query, "timestamp": "١٧٠٠٠٠٠٠٠٠"},  # Arabic-Indic digits: int() takes them
        {**query, "nonce": "nönce"},
    ]
    for q in strangers:
        answer = requests.post(callback_url(port), params=q, data=body, timeout=5)
        assert 400 <= answer.status_code < 500, (q, answer.status_code, answer.text)
    # signed, but the Encrypt is not ASCII (base64 raised a bare ValueError on it)
    encrypt = "é" * 44
    signed = {**query, "msg_signature": signature(MSG_TOKEN, query["timestamp"],
                                                  query["nonce"], encrypt)}
    answer = requests.post(callback_url(port), params=signed, timeout=5,
                           data=f"<xml><Encrypt>{encrypt}</Encrypt></xml>".encode())
    assert answer.status_code == 400, (answer.status_code, answer.text)
    good = requests.post(callback_url(port), params=query, data=body, timeout=5)
    assert (good.status_code, good.text) == (200, "success")
    wait_until(lambda: (tmp_path / "state" / "components" / "plat" / f"{COMP}.json").exists(),
               timeout=15)
    assert d.stop() == 0
    lines = callback_lines(d)
    refused = [e for e in lines if e["event"] == "callback.refused"]
    assert len(refused) == len(strangers) + 1, lines
    assert all(e["level"] == "warning" for e in refused), refused
    assert not [e for e in d.events() if e["level"] in ("error", "critical")]
    assert "Traceback" not in d.log_path.read_text()


def test_a_ticket_the_disk_cannot_take_is_503_with_one_error_line_then_recovers(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The state dir's disk is full: every ticket push is answered 503 (WeChat pushes again;
    no 500, no `callback.crashed`, no traceback), with one error line for the whole outage, not
    one per push; once space is back the next push is stored, the component token fetched, and
    an info line says the callback stores again."""
    port = free_port()
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    with small_tmpfs(tmp_path / "small", "256k") as state:
        config = platform_config(tmp_path / "config.toml", state, emulator, sock_dir, port)
        d = daemons(config)
        d.wait_for("daemon.ready", timeout=15)
        filler = fill(state)
        for _ in range(5):
            query, body = ticket_push(emulator, comp)
            answer = requests.post(callback_url(port), params=query, data=body, timeout=5)
            assert answer.status_code == 503, (answer.status_code, answer.text)
        assert not (state / "components" / "plat" / ".private" / "ticket.json").exists()
        lines = callback_lines(d)
        loud = [e for e in lines if e["level"] in ("error", "critical")]
        assert len(loud) == 1, lines
        assert loud[0]["event"] == "callback.store_failed"
        assert "no space left on device" in loud[0]["error"]
        assert not [e for e in lines if e["event"] == "callback.crashed"]
        filler.unlink()
        query, body = ticket_push(emulator, comp)
        answer = requests.post(callback_url(port), params=query, data=body, timeout=5)
        assert (answer.status_code, answer.text) == (200, "success")
        wait_until(lambda: (state / "components" / "plat" / f"{COMP}.json").exists(),
                   timeout=15)
        recovered = d.wait_for("callback.store_recovered")
        assert recovered["level"] == "info" and recovered["refused"] == 5
        assert d.stop() == 0
        assert len([e for e in callback_lines(d) if e["level"] == "error"]) == 1
        assert "Traceback" not in d.log_path.read_text()


def test_directory_modes_do_not_depend_on_the_umask(
        emulator: Emulator, sock_dir: Path, daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken run` by hand or in a container under umask 077 (the shipped unit's UMask=0027
    hid it): components/ and components/<name>/ are still 0750, so a member of the files'
    group reaches an authorizer's token with read_token(..., component=...); .private/ and
    its refresh/ stay 0700, out of the group's reach. Directories an earlier version left 0700
    are opened to the group at the next start."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root (CI runs as root)")
    port = free_port()
    state = sock_dir / "state"  # a path other users can reach
    state.mkdir(mode=0o750)
    state.chmod(0o750)
    config = platform_config(sock_dir / "config.toml", state, emulator, sock_dir, port)
    emulator.state.settings.token_ttl = 600
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, callback_url(port), 2)
    d = daemons(config, prefix=["sh", "-c", 'umask 077 && exec "$@"', "sh"])
    base = state / "components"
    here = base / "plat"
    d.wait_for("daemon.ready", timeout=15)
    wait_until(lambda: (here / f"{COMP}.json").exists(), timeout=15)
    emulator.platforms.authorize(COMP, AUTHORIZER)
    wait_until(lambda: (here / f"{AUTHORIZER}.json").exists(), timeout=15)
    modes = {p.name: p.stat().st_mode & 0o777
             for p in (base, here, here / ".private", here / ".private" / "refresh",
                       here / ".locks")}
    assert modes == {"components": 0o750, "plat": 0o750, ".private": 0o700,
                     "refresh": 0o700, ".locks": 0o700}
    assert (here / f"{AUTHORIZER}.json").stat().st_mode & 0o777 == 0o640
    group = (here / f"{AUTHORIZER}.json").stat().st_gid
    code = ("import os, sys\nfrom wxtoken import read_token\n"
            f"state = {str(state)!r}\n"
            f"print(read_token({AUTHORIZER!r}, state, component='plat'))\n"
            "try:\n"
            "    os.listdir(os.path.join(state, 'components', 'plat', '.private'))\n"
            "    print('private readable')\n"
            "except PermissionError:\n"
            "    print('private refused')\n")
    lib = stdlib_reader_copy(sock_dir / "lib")
    result = run_as(NOBODY, [group], code, lib)
    assert result.returncode == 0, result.stderr
    token, private = result.stdout.splitlines()
    assert emulator.token_status(token) == 0
    assert private == "private refused"
    assert d.stop() == 0
    for path in (base, here):  # as an earlier version left them under umask 077
        path.chmod(0o700)
    d = daemons(config, prefix=["sh", "-c", 'umask 077 && exec "$@"', "sh"])
    d.wait_for("daemon.ready", timeout=15)
    assert [p.stat().st_mode & 0o777 for p in (base, here)] == [0o750, 0o750]
    assert d.stop() == 0


def test_the_message_crypto_refuses_non_ascii_input_with_its_own_error() -> None:
    """What a stranger controls reaches the crypto as str: text that is not ASCII is a
    CryptoError (the callback's 4xx), never hmac's TypeError or base64's bare ValueError."""
    ours = MessageCrypto(MSG_TOKEN, AES_KEY, COMP)
    with pytest.raises(CryptoError, match="msg_signature"):
        ours.verify("é" * 40, "1700000000", "1", "abcd")
    with pytest.raises(CryptoError, match="not base64"):
        ours.decrypt("é" * 44)
    with pytest.raises(CryptoError, match="not base64"):
        MessageCrypto(MSG_TOKEN, "é" * 43, COMP)


# -- slow clients (#16 item 8) -------------------------------------------------------------------
class SlowHeaders:
    """``count`` connections to 127.0.0.1:``port``, each sending a request line and a Host
    header, then one byte of a header every ``every`` seconds (a slowloris), from one thread
    (non-blocking sockets). Connections are opened one every ``spacing`` seconds: a burst of
    150 connects overflows the old listen backlog of 5 and most never reach the server (the
    client believes them open). One the server closes or answers is opened again at the next
    round: the attacker refills. Stops by itself after ``lasting`` seconds."""

    HEAD = b"POST /components/plat/callback HTTP/1.1\r\nHost: 127.0.0.1\r\n"

    def __init__(self, port: int, count: int = 150, every: float = 2.0,
                 spacing: float = 0.005, lasting: float = 30.0) -> None:
        self.port, self.count, self.every, self.lasting = port, count, every, lasting
        self.spacing = spacing
        self.rounds = 0  # dribble rounds done
        self.held = 0  # connections open now, their head sent
        self.opened = 0
        self.answers: Counter[str] = Counter()  # how the server ended connections
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowHeaders:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _connect(self, sel: selectors.BaseSelector) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        sel.register(s, selectors.EVENT_WRITE, "connecting")

    def _ended(self, sel: selectors.BaseSelector, s: socket.socket, how: str) -> None:
        self.answers[how] += 1
        sel.unregister(s)
        s.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        end = time.monotonic() + self.lasting
        next_round = next_open = time.monotonic()
        try:
            while not self._stop.is_set() and (now := time.monotonic()) < end:
                missing = self.count - len(sel.get_map())
                if missing and now >= next_open:
                    self._connect(sel)
                    next_open = now + self.spacing
                    missing -= 1
                wait = min(next_round, next_open) if missing else next_round
                for key, _ in sel.select(max(0.0, min(wait - now, 0.2))):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    if key.data == "connecting":
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            self._ended(sel, s, "connect failed")
                            continue
                        s.send(self.HEAD)
                        sel.modify(s, selectors.EVENT_READ, "held")
                        self.opened += 1
                        continue
                    try:
                        data = s.recv(4096)
                    except OSError as exc:
                        data = type(exc).__name__.encode()
                    self._ended(sel, s, data.split(b"\r\n", 1)[0].decode("latin-1") or "EOF")
                self.held = sum(1 for k in sel.get_map().values() if k.data == "held")
                if time.monotonic() >= next_round and self.opened >= self.count:
                    next_round = time.monotonic() + self.every
                    for key in list(sel.get_map().values()):
                        if key.data == "held":
                            with contextlib.suppress(OSError):
                                key.fileobj.send(b"X")  # type: ignore[union-attr]
                    self.rounds += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def timed_push(port: int, emulator: Emulator, comp: Component) -> tuple[str, float]:
    """A signed ticket push: (its answer, or the error, and the seconds it took)."""
    query, body = ticket_push(emulator, comp)
    start = time.monotonic()
    try:
        answer = requests.post(callback_url(port), params=query, data=body, timeout=5)
        outcome = f"{answer.status_code} {answer.text}"
    except requests.RequestException as exc:
        outcome = type(exc).__name__
    return outcome, time.monotonic() - start


def test_150_slow_header_connections_do_not_keep_a_signed_push_out(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """150 local connections sending a request line and a Host header, then a byte every 2 s
    (and opened again whenever closed) hold no handler: a signed ticket push is answered
    `success` within 1 s while they are held, and again after the deadline has cut them and
    they have been refilled. The operator is told by one warning line, not one per
    connection."""
    port = free_port()
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             port)
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)  # no pusher: pushed here
    d = daemons(config)
    d.wait_for("callback.listening", timeout=15)
    with SlowHeaders(port) as attack:
        wait_until(lambda: attack.rounds >= 1, timeout=10)  # all open, a byte sent on each
        pushes = [timed_push(port, emulator, comp)]
        # every connection closed by the server once and opened again (here: at the deadline)
        wait_until(lambda: attack.opened >= 2 * attack.count, timeout=15)
        pushes.append(timed_push(port, emulator, comp))
        seen = (attack.rounds, attack.held, attack.opened, dict(attack.answers))
    assert all(outcome == "200 success" and took < 1.0 for outcome, took in pushes), \
        (pushes, seen)
    assert d.stop() == 0
    told = [e for e in d.events() if e["level"] in ("warning", "error", "critical")]
    assert [(e["event"], e["level"]) for e in told] == [("callback.slow_clients", "warning")]


def test_a_request_dribbling_its_headers_is_closed_at_the_whole_request_deadline(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A header byte every 0.5 s restarts no timer: the request line, headers and body must
    all arrive within 5 s of the connection, or it is answered 408 and closed."""
    port = free_port()
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             port)
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    d = daemons(config)
    d.wait_for("callback.listening", timeout=15)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        start = time.monotonic()
        s.sendall(SlowHeaders.HEAD)
        s.settimeout(0.5)
        answer, closed_after = b"", None
        for _ in range(24):  # 12 s at most
            try:
                answer = s.recv(4096)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    s.send(b"X")
                    continue
            closed_after = time.monotonic() - start
            break
    assert closed_after is not None, "still open after 12 s"
    assert 4.5 <= closed_after <= 6.5, closed_after
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    note = d.wait_for("callback.slow_clients")
    assert (note["level"], note["timed_out"], note["dropped"]) == ("warning", 1, 0)
    assert d.stop() == 0


# -- callback_listen = "unix:/path" (#16 item 8) -------------------------------------------------
def unix_push(path: str, emulator: Emulator, comp: Component) -> bytes:
    """The raw HTTP bytes of a signed ticket push to the callback on a Unix socket."""
    query, body = ticket_push(emulator, comp)
    return (f"POST /components/plat/callback?{urlencode(query)} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def push_as(user: int, groups: list[int], path: str, request: bytes, lib: Path) -> str:
    """Send ``request`` over the Unix socket at ``path`` as another user: the answer's status
    line and body, or the error's name."""
    code = ("import socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.settimeout(5)\n"
            "try:\n"
            f"    s.connect({path!r})\n"
            "except OSError as exc:\n"
            "    print(type(exc).__name__)\n"
            "    raise SystemExit\n"
            f"s.sendall({request!r})\n"
            "out = b''\n"
            "while chunk := s.recv(65536):\n"
            "    out += chunk\n"
            "head, _, body = out.partition(b'\\r\\n\\r\\n')\n"
            "print(head.split(b'\\r\\n')[0].decode(), body.decode())\n")
    result = run_as(user, groups, code, lib)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_unix_socket_callback_only_its_directorys_group_can_open(
        emulator: Emulator, sock_dir: Path, daemons: Callable[..., DaemonProcess]) -> None:
    """callback_listen = "unix:PATH" in a setgid directory of another group (nginx's, 2750):
    the socket left there by a crash is replaced, the new one is mode 0660 with the directory's
    group; a member of that group pushes a signed ticket through it (the component token
    follows), a user outside it cannot even connect; check-config says who may open it; a
    reload that changes callback_listen is refused and the socket keeps serving; it is removed
    at stop."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root (CI runs as root)")
    nginx = next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, NOBODY))
    where = sock_dir / "cb"
    where.mkdir()
    os.chown(where, -1, nginx)
    where.chmod(0o2750)
    path = str(where / "callback.sock")
    with socket.socket(socket.AF_UNIX) as crashed:  # bound, never unlinked: a crash's leftover
        crashed.bind(path)
    config = platform_config(sock_dir / "config.toml", sock_dir / "state", emulator, sock_dir,
                             0, f"unix:{path}")
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    d = daemons(config)
    assert d.wait_for("callback.listening", timeout=15)["address"] == f"unix:{path}"
    st = os.stat(path)
    assert (stat.S_ISSOCK(st.st_mode), st.st_mode & 0o777, st.st_gid) == (True, 0o660, nginx)
    lib = stdlib_reader_copy(sock_dir / "lib")
    assert push_as(NOBODY, [nginx], path, unix_push(path, emulator, comp), lib) \
        == "HTTP/1.1 200 OK success"
    assert push_as(NOBODY, [], path, unix_push(path, emulator, comp), lib) == "PermissionError"
    wait_until(lambda: (sock_dir / "state" / "components" / "plat" / f"{COMP}.json").exists(),
               timeout=15)
    checked = run_cli("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert f'callback_listen = "unix:{path}"\n# the socket: mode 0660, group ' \
        f"{grp.getgrgid(nginx).gr_name} ({where} is setgid)" in checked.stdout
    text = config.read_text()
    config.write_text(text.replace(f'"unix:{path}"', '"127.0.0.1:8089"'))
    reload = run_cli("reload", "--config", str(config))
    assert reload.returncode == 78
    assert "callback_listen: changed, which takes a restart" in reload.stderr
    assert push_as(NOBODY, [nginx], path, unix_push(path, emulator, comp), lib) \
        == "HTTP/1.1 200 OK success"
    assert d.stop() == 0
    assert not os.path.lexists(path)
    assert [e["event"] for e in d.events() if e["level"] in ("warning", "error")] \
        == ["config.reload_refused"]


@pytest.mark.parametrize("taken", ["a file", "a live socket"])
def test_a_unix_socket_path_that_is_taken_is_one_exit_78_line(
        taken: str, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A regular file, or a socket another process serves, at the callback's path: the daemon
    exits 78 with one line naming callback_listen and why, and leaves the path alone."""
    path = sock_dir / "callback.sock"
    config = platform_config(sock_dir / "config.toml", sock_dir / "state", emulator, sock_dir,
                             0, f"unix:{path}")
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    with contextlib.ExitStack() as stack:
        if taken == "a file":
            path.write_text("keep me")
            why = "a file that is not a socket is in the way"
        else:
            other = stack.enter_context(socket.socket(socket.AF_UNIX))
            other.bind(str(path))
            other.listen()
            why = "another running process serves that socket"
        d = daemons(config)
        assert d.proc.wait(20) == 78
        d.stop()
        lines = [e["line"] for e in d.events() if e["event"] == "unparsed"]
        assert len(lines) == 1 and f"callback_listen: cannot listen on unix:{path}" in lines[0] \
            and lines[0].endswith(why), lines
        assert "Traceback" not in d.log_path.read_text()
        if taken == "a file":
            assert path.read_text() == "keep me"
        else:
            assert stat.S_ISSOCK(path.lstat().st_mode)


@pytest.mark.parametrize(("listen", "problem"), [
    ("unix:", 'callback_listen: must name the socket after "unix:"'),
    ("unix:callback.sock",
     "callback_listen: the socket's path must be an absolute path, not 'callback.sock'"),
    ("unix:/run/" + "x" * 120 + ".sock",
     "callback_listen: the socket's path is too long for a Unix socket (at most 107 bytes)"),
    ("unix:/run/wxtoken/", "callback_listen: must name the socket, not the directory"),
    ("/run/wxtoken/callback.sock",
     'callback_listen: must be "host:port" (like "127.0.0.1:8089") or "unix:/path"'),
])
def test_a_bad_callback_listen_is_one_exit_78_line(
        listen: str, problem: str, tmp_path: Path, emulator: Emulator, sock_dir: Path) -> None:
    """A malformed callback_listen is refused by check-config: exit 78, one line naming the
    key and the problem, no traceback."""
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             0, listen)
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 78, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], lines


def test_a_unix_socket_in_a_missing_directory_is_warned_about(
        tmp_path: Path, emulator: Emulator, sock_dir: Path) -> None:
    """The daemon makes the socket, not its directory: check-config warns when the directory
    does not exist (it is an error at start), and says the socket takes the daemon's group
    where the directory is not setgid."""
    missing = sock_dir / "nope" / "callback.sock"
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             0, f"unix:{missing}")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"callback_listen: the directory {missing.parent} does not exist" in result.stderr
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             0, f"unix:{sock_dir / 'callback.sock'}")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert f"# the socket: mode 0660, the daemon's group ({sock_dir} is not setgid" \
        in result.stdout


def test_a_callback_socket_on_the_control_sockets_path_is_refused(
        tmp_path: Path, emulator: Emulator, sock_dir: Path) -> None:
    """callback_listen naming the control socket's path: one exit-78 line (one of the two
    would replace the other at start)."""
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             0, f"unix:{sock_dir / 'control.sock'}")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 78, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "callback_listen: is the control socket's path" in lines[0], lines


def test_a_low_descriptor_limit_leaves_descriptors_for_the_token_files(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Run by hand under `ulimit -n 96`, the daemon lets no more connections wait for their
    request than a quarter of its descriptors: 150 slow connections neither keep a signed push
    out nor take the descriptors the component token's files need."""
    port = free_port()
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             port)
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    d = daemons(config, prefix=["prlimit", "--nofile=96:96", "--"])
    d.wait_for("callback.listening", timeout=15)
    with SlowHeaders(port) as attack:
        wait_until(lambda: attack.rounds >= 1, timeout=10)
        outcome, took = timed_push(port, emulator, comp)
        d.wait_for("token.refreshed", timeout=10)  # the ticket bought the component token
        seen = (attack.held, attack.opened, dict(attack.answers))
    assert outcome == "200 success" and took < 1.0, (outcome, took, seen)
    assert d.stop() == 0
    log = d.log_path.read_text()
    assert "Too many open files" not in log


def test_a_callback_socket_whose_holder_does_not_accept_is_one_exit_78_line(
        tmp_path: Path, emulator: Emulator, sock_dir: Path) -> None:
    """A process listening on the socket's path without accepting (frozen, its backlog full)
    does not hold the daemon's start: one exit-78 line within seconds."""
    path = sock_dir / "callback.sock"
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             0, f"unix:{path}")
    emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as frozen:
        frozen.bind(str(path))
        frozen.listen(0)
        fillers = []
        for _ in range(4):  # fill its backlog: the next connect() would wait
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(str(path))
            fillers.append(c)
        try:
            start = time.monotonic()
            result = run_cli("run", "--config", str(config), timeout=20)
            took = time.monotonic() - start
        finally:
            for c in fillers:
                c.close()
    assert result.returncode == 78, result.stderr
    lines = [line for line in result.stderr.splitlines() if "callback_listen" in line]
    assert len(lines) == 1 and "does not accept" in lines[0], result.stderr
    assert took < 10, took
    assert path.is_socket()  # nothing removed


def test_a_flood_of_refused_requests_logs_20_lines_a_minute_and_their_count(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """60 badly signed requests in a few seconds: each answered 403, but only 20
    `callback.refused` lines, then one `callback.refused_unlogged` with the 40 others (at
    stop, as the minute is not over), so journald's rate limit never hides the daemon's other
    lines behind a stranger's flood. A correct push still works."""
    port = free_port()
    config = platform_config(tmp_path / "config.toml", tmp_path / "state", emulator, sock_dir,
                             port)
    comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY)
    d = daemons(config)
    d.wait_for("callback.listening", timeout=15)
    query, body = ticket_push(emulator, comp)
    with requests.Session() as session:
        for _ in range(60):
            answer = session.post(callback_url(port), params={**query, "msg_signature": "0" * 40},
                                  data=body, timeout=5)
            assert answer.status_code == 403
        good = session.post(callback_url(port), params=query, data=body, timeout=5)
    assert (good.status_code, good.text) == (200, "success")
    assert d.stop() == 0
    lines = callback_lines(d)
    assert len([e for e in lines if e["event"] == "callback.refused"]) == 20
    counted = [e for e in lines if e["event"] == "callback.refused_unlogged"]
    assert [(e["count"], e["level"]) for e in counted] == [(40, "warning")]
