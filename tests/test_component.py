"""The Open Platform (第三方平台): ticket pushes → component token → authorizer tokens, through
real daemons, the real callback endpoint and the emulator pushing encrypted messages."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from wxtoken import TokenUnavailable, read_token
from wxtoken.component.crypto import CryptoError, MessageCrypto
from wxtoken.emulator import Emulator

from helpers import (
    NOBODY,
    DaemonProcess,
    curl,
    read_json,
    run_cli,
    samples,
    socket_of,
    wait_until,
)

COMP = "wx0c0c000000000001"
SECRET = "comp-s3cr3t-0123456789"
MSG_TOKEN = "msg-token-0123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth(i: int) -> str:
    return f"wxauth{i:012d}"


def has_ticket(path: Path) -> bool:
    return "jsapi_ticket" in read_json(path)


def accepted(emulator: Emulator, p: Platform, appid: str) -> bool:
    return emulator.token_status(p.token(appid)) == 0


class Platform:
    """A platform under test: its config, state, callback URL and the emulator's side."""

    def __init__(self, tmp_path: Path, emulator: Emulator, sock_dir: Path,
                 push_every: float = 600, **top: Any) -> None:
        self.port = free_port()
        self.state = tmp_path / "state"
        self.dir = self.state / "components" / "plat"
        self.config = tmp_path / "config.toml"
        settings = {"state_dir": str(self.state), "api_base": emulator.url,
                    "log_format": "json", "control_socket": str(sock_dir / "control.sock"),
                    "callback_listen": f"127.0.0.1:{self.port}", **top}
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += ["[components.plat]", f'component_appid = "{COMP}"',
                  f'secret = "{SECRET}"', f'msg_token = "{MSG_TOKEN}"',
                  f'encoding_aes_key = "{AES_KEY}"', 'tickets = ["jsapi"]']
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o600)
        self.url = f"http://127.0.0.1:{self.port}/components/plat/callback"
        self.emulator = emulator
        self.comp = emulator.platforms.add(COMP, SECRET, MSG_TOKEN, AES_KEY, self.url,
                                           push_every)

    def token(self, appid: str) -> str:
        return str(read_token(appid, str(self.state), component="plat"))

    def refresh_token(self, appid: str) -> str:
        return str(read_json(self.dir / ".private" / "refresh" / f"{appid}.json")
                   ["refresh_token"])

    def calls(self, api: str) -> int:
        return self.emulator.calls(api=api)


@pytest.fixture
def platform(tmp_path: Path, emulator: Emulator, sock_dir: Path) -> Iterator[Platform]:
    emulator.state.settings.token_ttl = 60
    yield Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                   renew_before=10)


def wait_component(d: DaemonProcess, p: Platform) -> None:
    d.wait_for("daemon.ready", timeout=15)
    wait_until(lambda: (p.dir / f"{COMP}.json").exists(), timeout=15)


# -- the message crypto ------------------------------------------------------------------------
def test_our_messages_and_wechatpys_decrypt_each_other() -> None:
    """An independent implementation (wechatpy's WeChatCrypto) decrypts ours and we decrypt
    its; a wrong signature, another appid or a truncated message is refused."""
    from wechatpy.crypto import WeChatCrypto
    theirs = WeChatCrypto(MSG_TOKEN, AES_KEY, COMP)
    ours = MessageCrypto(MSG_TOKEN, AES_KEY, COMP)
    xml = "<xml><AppId>wxcomp</AppId><InfoType>component_verify_ticket</InfoType></xml>"
    sealed = theirs.encrypt_message(xml, "12345", "1700000000")
    from wxtoken.component.callback import parse_xml
    fields = parse_xml(sealed.encode())
    ours.verify(fields["MsgSignature"], "1700000000", "12345", fields["Encrypt"])
    assert ours.decrypt(fields["Encrypt"]).decode() == xml
    encrypt, signature = ours.seal("你好 ticket".encode(), "1700000001", "999")
    body = f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    assert theirs.decrypt_message(body, signature, "1700000001", "999") == "你好 ticket"
    with pytest.raises(CryptoError, match="msg_signature"):
        ours.verify(signature, "1700000002", "999", encrypt)
    with pytest.raises(CryptoError, match="another appid"):
        MessageCrypto(MSG_TOKEN, AES_KEY, "wxother").decrypt(encrypt)
    with pytest.raises(CryptoError):
        ours.decrypt(encrypt[:-8])


def test_the_callback_refuses_bad_signatures_replays_and_bad_bodies(
        platform: Platform, daemons: Callable[..., DaemonProcess]) -> None:
    """A bad signature (403), a replayed old timestamp (403), a truncated, oversized, DTD or
    non-XML body (4xx): each a warning, never a crash; the same message twice is answered
    success and handled once; the daemon keeps serving."""
    platform.comp.pushing = False
    d = daemons(platform.config)
    d.wait_for("callback.listening")
    plat = platform.emulator.platforms
    xml = plat.message(platform.comp, {"InfoType": "component_verify_ticket",
                                       "ComponentVerifyTicket": plat.new_ticket(platform.comp)})
    query, body = plat.sealed(platform.comp, xml)

    def post(q: dict[str, str], b: bytes, **kw: Any) -> requests.Response:
        return requests.post(platform.url, params=q, data=b, timeout=5, **kw)

    assert post({**query, "msg_signature": "0" * 40}, body).status_code == 403
    old = {**query, "timestamp": str(int(time.time()) - 3600)}
    assert post(old, body).status_code == 403
    assert post(query, body[:-20]).status_code == 400
    assert post(query, b"<xml>" + b"x" * 70000 + b"</xml>").status_code == 413
    dtd = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><xml><Encrypt>&a;</Encrypt></xml>'
    assert post(query, dtd).status_code == 400
    assert post(query, "<xml>".encode("utf-16")).status_code == 400
    assert requests.get(platform.url, timeout=5).status_code == 405
    assert requests.post(platform.url.replace("plat", "other"), params=query, data=body,
                         timeout=5).status_code == 404
    first = post(query, body)
    assert (first.status_code, first.text) == (200, "success")
    again = post(query, body)  # WeChat retries what it thinks was not answered
    assert (again.status_code, again.text) == (200, "success")
    refused = [e for e in d.events() if e.get("event") == "callback.refused"]
    assert len(refused) == 6 and all(e["level"] == "warning" for e in refused)
    assert sum(1 for e in d.events() if e.get("event") == "component.ticket_received") == 1
    wait_until(lambda: (platform.dir / f"{COMP}.json").exists(), timeout=15)
    assert "Traceback" not in d.log_path.read_text()
    assert d.stop() == 0


# -- the chain -----------------------------------------------------------------------------------
def test_ticket_push_component_token_and_authorizers_end_to_end(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The emulator pushes tickets; the daemon gets the component token, exchanges each
    authorization code, keeps every authorizer's token and jsapi ticket fresh in its file, and
    WeChat accepts every token the files hold; read_token, `wxtoken token --component` and
    passive refresh work for authorizers; the refresh tokens are the daemon's alone."""
    d = daemons(platform.config)
    wait_component(d, platform)
    for i in range(3):
        emulator.platforms.authorize(COMP, auth(i))
    wait_until(lambda: all((platform.dir / f"{auth(i)}.json").exists() for i in range(3)),
               timeout=15)
    for i in range(3):
        token = platform.token(auth(i))
        assert emulator.token_status(token) == 0
        record = read_json(platform.dir / f"{auth(i)}.json")
        path = platform.dir / f"{auth(i)}.json"
        wait_until(functools.partial(has_ticket, path), timeout=15)
        record = read_json(platform.dir / f"{auth(i)}.json")
        assert emulator.ticket_status(record["jsapi_ticket"]) == 0
        assert record["app"] == auth(i) and record["appid"] == auth(i)
    assert emulator.token_status(platform.token(COMP)) == 0
    cli = run_cli("token", "--component", "plat", auth(1), "--config", str(platform.config))
    assert cli.stdout.strip() == platform.token(auth(1))
    old = platform.token(auth(2))
    emulator.invalidate(old)
    new = run_cli("refresh", "--component", "plat", auth(2), "--invalid", old, "--config",
                  str(platform.config))
    assert new.returncode == 0, new.stderr
    assert emulator.token_status(new.stdout.strip()) == 0 and new.stdout.strip() != old
    private = platform.dir / ".private"
    assert private.stat().st_mode & 0o777 == 0o700
    rt_file = private / "refresh" / f"{auth(0)}.json"
    assert rt_file.stat().st_mode & 0o777 == 0o600
    assert (platform.dir / f"{auth(0)}.json").stat().st_mode & 0o777 == 0o640
    status = run_cli("status", "--json", "--config", str(platform.config))
    comp = json.loads(status.stdout)["components"][0]
    assert comp["healthy"] and len(comp["authorizers"]) == 3, comp["problems"]
    log = d.log_path.read_text()
    for i in range(3):
        assert platform.refresh_token(auth(i)) not in log
    assert d.stop() == 0


def test_an_unauthorized_event_removes_the_authorizers_files(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    d = daemons(platform.config)
    wait_component(d, platform)
    emulator.platforms.authorize(COMP, auth(1))
    wait_until(lambda: (platform.dir / f"{auth(1)}.json").exists(), timeout=15)
    emulator.platforms.unauthorize(COMP, auth(1))
    removed = d.wait_for("authorizer.removed")
    assert removed["app"] == auth(1) and removed["files"] == 3
    assert not (platform.dir / f"{auth(1)}.json").exists()
    assert not (platform.dir / f"{auth(1)}.status.json").exists()
    assert not (platform.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    status = json.loads(run_cli("status", "--json", "--config", str(platform.config)).stdout)
    assert status["components"][0]["authorizers"] == []
    assert d.stop() == 0


def test_a_dead_refresh_token_is_repaired_from_the_authorizer_list(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """61023 for every stored refresh token: the daemon reads api_get_authorizer_list, takes
    the authorizer's current one and goes on, with no human; an authorizer missing from the
    list has cancelled: its files go."""
    emulator.state.settings.token_ttl = 8
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=4,
                 renew_before=2)
    d = daemons(p.config)
    wait_component(d, p)
    emulator.platforms.authorize(COMP, auth(1))
    emulator.platforms.authorize(COMP, auth(2))
    wait_until(lambda: all((p.dir / f"{auth(i)}.json").exists() for i in (1, 2)), timeout=15)
    listed = emulator.platforms.kill_refresh_tokens(COMP, auth(1))
    with emulator.state.lock:  # auth(2) cancels without an event reaching the platform
        emulator.platforms.components[COMP].authorizers.pop(auth(2))
    repaired = d.wait_for("authorizer.repaired", timeout=20)
    assert repaired["app"] == auth(1) and repaired["level"] == "warning"
    wait_until(lambda: p.refresh_token(auth(1)) != listed, timeout=10)  # and rotated on
    wait_until(lambda: emulator.token_status(p.token(auth(1))) == 0, timeout=10)
    wait_until(lambda: not (p.dir / f"{auth(2)}.json").exists(), timeout=20)
    assert not any(e.get("event") == "authorizer.needs_reauthorization" for e in d.events())
    assert d.stop() == 0


def test_sigkill_across_rotating_refreshes_never_needs_a_human(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Every api_authorizer_token call rotates the refresh token. The daemon is SIGKILLed at
    random moments across refreshes of several authorizers; after each restart every
    authorizer refreshes again with a stored refresh token (never a 61023 that needs the
    list, never a human), and WeChat accepts every token in the files."""
    emulator.state.settings.token_ttl = 4
    emulator.state.settings.overlap = 3
    p = Platform(tmp_path, emulator, sock_dir, push_every=1, refresh_interval=1,
                 renew_before=1)
    n = 6
    d = daemons(p.config)
    wait_component(d, p)
    for i in range(n):
        emulator.platforms.authorize(COMP, auth(i))
    wait_until(lambda: all((p.dir / f"{auth(i)}.json").exists() for i in range(n)),
               timeout=20)
    rng = random.Random(7)
    for _ in range(12):
        time.sleep(rng.uniform(0.2, 1.5))  # a random moment of the refreshes to kill at
        d.stop(signal.SIGKILL)
        d = daemons(p.config)
        d.wait_for("daemon.ready", timeout=20)
    before = emulator.calls(api="authorizer_token")
    time.sleep(5)  # a few rounds of rotation after the last kill
    assert emulator.calls(api="authorizer_token") >= before + n
    for i in range(n):
        appid = auth(i)
        wait_until(functools.partial(accepted, emulator, p, appid), timeout=10)
    events = [e.get("event") for e in d.events()]
    assert "authorizer.needs_reauthorization" not in events
    assert "authorizer.repaired" not in events  # the stored tokens were always enough
    assert d.stop() == 0


def reconciled_just_now(platform: Platform) -> None:
    """The platform's last reconcile was just now: one at start would find the authorizers a
    test authorized on WeChat's list (not pushed) and fetch them itself (as it should), racing
    the import the test is about (seen on a loaded machine)."""
    platform.dir.mkdir(parents=True)
    (platform.dir / ".platform.json").write_text(json.dumps({"last_reconcile": time.time()}))


def test_import_seeds_refresh_and_access_tokens_with_zero_calls_until_due(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken component import`: refresh tokens and valid access tokens of an existing
    system; no authorizer call until the imported tokens are due (the old system's tokens stay
    valid), then a refresh with the imported refresh token. A bad line refuses the whole
    import; a token reader may not import."""
    for i in range(3):
        emulator.platforms.authorize(COMP, auth(i), push=False)
    reconciled_just_now(platform)
    d = daemons(platform.config)
    wait_component(d, platform)
    existing: list[dict[str, Any]] = []
    for i in range(3):
        with emulator.state.lock:
            rt = emulator.platforms.components[COMP].authorizers[auth(i)].latest
        existing.append({"authorizer_appid": auth(i), "refresh_token": rt})
    # the old system also holds a valid access token for the first one
    got = requests.post(f"{emulator.url}/cgi-bin/component/api_authorizer_token",
                        params={"component_access_token": platform.token(COMP)}, timeout=5,
                        json={"component_appid": COMP, "authorizer_appid": auth(0),
                              "authorizer_refresh_token": existing[0]["refresh_token"]}).json()
    existing[0].update(refresh_token=got["authorizer_refresh_token"],
                       access_token=got["authorizer_access_token"],
                       expires_at=int(time.time()) + 50)
    calls = emulator.calls(api="authorizer_token")
    bad = platform.config.parent / "bad.jsonl"
    bad.write_text(json.dumps(existing[1]) + "\n{\"authorizer_appid\": \"x y\"}\n")
    refused = run_cli("component", "import", "plat", str(bad), "--config", str(platform.config))
    assert refused.returncode == 1 and "line 2: authorizer_appid" in refused.stderr
    assert not (platform.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    lines = platform.config.parent / "import.jsonl"
    lines.write_text("".join(json.dumps(e) + "\n" for e in existing))
    lines.chmod(0o644)
    done = run_cli("component", "import", "plat", str(lines), "--config", str(platform.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("imported 3 authorizers (1 with a valid token")
    assert platform.token(auth(0)) == got["authorizer_access_token"]
    wait_until(lambda: all((platform.dir / f"{auth(i)}.json").exists() for i in (1, 2)),
               timeout=15)
    # the two without a token were fetched; the imported one waits until it is due
    assert emulator.calls(api="authorizer_token") == calls + 2
    assert emulator.token_status(got["authorizer_access_token"]) == 0
    d.wait_for("authorizers.imported")
    assert d.stop() == 0


def test_a_token_reader_cannot_hand_over_a_ticket_or_import(
        platform: Platform, daemons: Callable[..., DaemonProcess]) -> None:
    platform.comp.pushing = False
    d = daemons(platform.config)
    d.wait_for("daemon.ready", timeout=15)
    sock = socket_of(platform.config)
    group = os.stat(sock).st_gid
    for path, body in (("ticket", '{"ticket": "ticket@@@forged"}'), ("import", "{}")):
        reader = curl(sock, "-w", "\n%{http_code}", "-X", "POST", "-d", body,
                      f"http://localhost/v1/components/plat/{path}", user=NOBODY,
                      groups=[group])
        assert reader.stdout.rsplit("\n", 1)[1] == "403", reader.stdout
    assert not (platform.dir / ".private" / "ticket.json").exists()
    handed = run_cli("component", "ticket", "plat", "-", "--config", str(platform.config),
                     stdin=platform.emulator.platforms.new_ticket(platform.comp) + "\n")
    assert handed.returncode == 0 and handed.stdout.strip() == "ticket stored", handed.stderr
    wait_until(lambda: (platform.dir / f"{COMP}.json").exists(), timeout=15)
    assert d.stop() == 0


def test_the_last_ticket_serves_for_12_hours_then_status_says_so(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Pushes stop: the component token keeps being refreshed with the last ticket while it is
    younger than 12 h (its time is moved back to 11 h ago); past 12 h the refresh fails with
    the reason, and status and the journal say no ticket has come."""
    emulator.state.settings.token_ttl = 6
    d = daemons(platform.config)
    wait_component(d, platform)
    platform.comp.pushing = False
    ticket_file = platform.dir / ".private" / "ticket.json"

    def age(hours: float) -> None:
        doc = read_json(ticket_file)
        for slot in ("latest", "good"):
            if slot in doc:
                doc[slot]["received_at"] = time.time() - hours * 3600
                with emulator.state.lock:
                    platform.comp.tickets[doc[slot]["ticket"]] = time.time() - hours * 3600
        ticket_file.write_text(json.dumps(doc))
        doc = read_json(platform.dir / ".platform.json")
        for key in [k for k in doc if k.startswith("ticket_")]:  # received, last pushed
            doc[key] = time.time() - hours * 3600
        (platform.dir / ".platform.json").write_text(json.dumps(doc))

    age(11)
    first = platform.token(COMP)
    wait_until(lambda: platform.token(COMP) != first, timeout=15)  # refreshed on the old ticket
    age(13)
    failed = d.wait_for("refresh.failed", timeout=20)
    assert "no component_verify_ticket younger than 12 h" in failed["error"]
    assert failed["level"] == "error"
    status = run_cli("status", "--config", str(platform.config))
    assert status.returncode == 1 and "no component_verify_ticket for 13h" in status.stdout
    assert d.stop() == 0


@pytest.mark.slow
def test_a_thousand_authorizers_discovered_refreshed_and_restarted_with_no_call(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """1,000 authorizers that authorized while the daemon was away are found in the
    authorizer list at start, each gets its own file; a restart with every file valid makes no
    call at all (no reconcile: the last one is less than a day old)."""
    n = 1000
    p = Platform(tmp_path, emulator, sock_dir, push_every=2)
    for i in range(n):
        emulator.platforms.authorize(COMP, auth(i), push=False)
    d = daemons(p.config)
    d.wait_for("authorizers.reconciled", timeout=60)
    wait_until(lambda: sum(1 for _ in p.dir.glob("wxauth*.json")) >= 2 * n, timeout=120)
    for i in random.Random(1).sample(range(n), 20):
        assert emulator.token_status(p.token(auth(i))) == 0
    assert d.stop() == 0
    calls = emulator.calls()
    d = daemons(p.config)
    d.wait_for("daemon.ready", timeout=30)
    time.sleep(2)  # the restart's first runs (all within this) find every token fresh
    assert emulator.calls() == calls
    assert not any(e.get("event") == "authorizers.reconciled" for e in d.events())
    assert d.stop() == 0


def test_an_authorizer_no_refresh_token_can_save_needs_a_new_authorization(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Every refresh token refused, also the authorizer list's: an error line, the status and
    a metric say the authorizer needs a new authorization; its next authorization mends it."""
    emulator.state.settings.token_ttl = 8
    prom = tmp_path / "wxtoken.prom"
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=4,
                 renew_before=2, metrics_file=str(prom))
    d = daemons(p.config)
    wait_component(d, p)
    emulator.platforms.authorize(COMP, auth(1))
    wait_until(lambda: (p.dir / f"{auth(1)}.json").exists(), timeout=15)
    emulator.platforms.break_authorizer(COMP, auth(1))
    line = d.wait_for("authorizer.needs_reauthorization", timeout=20)
    assert line["level"] == "error" and line["app"] == auth(1)
    status = run_cli("status", "--json", "--config", str(p.config))
    comp = json.loads(status.stdout)["components"][0]
    assert status.returncode == 1 and auth(1) in comp["needs_reauthorization"]
    key = ("wxtoken_authorizer_needs_reauthorization", (("appid", auth(1)),
                                                        ("component", "plat")))
    wait_until(lambda: key in samples(prom), timeout=10)
    emulator.platforms.authorize(COMP, auth(1))  # the merchant authorizes again
    wait_until(lambda: not json.loads(run_cli("status", "--json", "--config", str(p.config))
                                      .stdout)["components"][0]["needs_reauthorization"],
               timeout=15)
    assert emulator.token_status(p.token(auth(1))) == 0
    assert d.stop() == 0


def test_a_platform_waits_for_its_first_ticket_without_an_error(
        platform: Platform, daemons: Callable[..., DaemonProcess]) -> None:
    """Before its first component_verify_ticket a platform only waits (an info line, nothing
    at error level: `journalctl -p err` stays empty); the first push ends the wait at once."""
    platform.comp.pushing = False
    d = daemons(platform.config)
    waiting = d.wait_for("refresh.waiting", timeout=15)
    assert waiting["level"] == "info" and "component_verify_ticket" in waiting["reason"]
    d.wait_for("daemon.ready", timeout=15)
    platform.emulator.platforms.push_ticket(platform.comp)
    wait_until(lambda: (platform.dir / f"{COMP}.json").exists(), timeout=15)
    assert d.stop() == 0
    loud = [e for e in d.events() if e["level"] in ("warning", "error", "critical")]
    assert not loud, loud


def test_authorizers_wait_quietly_for_the_component_token_and_go_when_it_comes(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """An authorizer's token is fetched with the component's (its parent token). While there
    is none (WeChat refuses api_component_token), a due authorizer waits: one info line
    (refresh.waits_for), no warning per retry, no call; an operator's `wxtoken refresh` of
    one is refused with the reason and costs nothing; the component token's return wakes the
    authorizers at once (not at their next look)."""
    emulator.state.settings.token_ttl = 12
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                 renew_before=4)
    for i in range(3):
        emulator.platforms.authorize(COMP, auth(i))
    d = daemons(p.config)
    wait_until(lambda: all((p.dir / f"{auth(i)}.json").exists() for i in range(3)), timeout=20)
    emulator.add_fault("5xx", api="component_token")
    # the component token expires (12 s), then the authorizers fall due: they wait for it

    def waiting() -> set[str]:
        return {e["app"] for e in d.events() if e["event"] == "refresh.waits_for"}

    wait_until(lambda: waiting() == {auth(i) for i in range(3)}, timeout=40)
    calls = emulator.calls(api="authorizer_token")
    refused = run_cli("refresh", "--component", "plat", auth(0), "--config", str(p.config))
    assert refused.returncode != 0 and f"plat/{COMP}" in refused.stderr, refused.stderr
    wait_until(lambda: all(read_json(p.dir / f"{auth(i)}.json")["expires_at"] <= time.time()
                           for i in range(3)), timeout=10)
    status = json.loads(run_cli("status", "--json", "--config", str(p.config)).stdout)
    for info in status["components"][0]["authorizers"]:  # expired: each says what it waits for
        assert f"waiting for the component token (plat/{COMP})" in info["problems"], info
    time.sleep(3)  # a retry, were there one, would come within this (backoff of 1 s)
    assert emulator.calls(api="authorizer_token") == calls
    emulator.clear_faults()

    def valid(appid: str) -> bool:
        try:
            return accepted(emulator, p, appid)
        except TokenUnavailable:  # expired meanwhile, as it should be
            return False

    wait_until(lambda: valid(COMP), timeout=15)
    # woken by the component token: at once, not a minute later
    wait_until(lambda: all(valid(auth(i)) for i in range(3)), timeout=5)
    assert d.stop() == 0
    waits = [e for e in d.events() if e["event"] == "refresh.waits_for"]
    assert all(e["level"] == "info" and e["parent"] == f"plat/{COMP}" for e in waits), waits
    assert len(waits) == 3, waits  # one line per authorizer, not one per look
    loud = [e for e in d.events() if e["level"] != "info" and e.get("app") in
            {auth(i) for i in range(3)} and e["event"] != "refresh.refused"]
    assert not loud, loud  # the operator's refused refresh aside


def test_a_reload_reaches_the_component_and_authorizer_refreshers(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken reload` with a lower daily_budget: the component's refresher follows it (it
    kept the config it was built with, so a reloaded daily_budget, renew_before or
    refresh_interval never reached a platform's tokens)."""
    emulator.state.settings.token_ttl = 60
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                 renew_before=10, daily_budget=100)
    d = daemons(p.config)
    wait_component(d, p)
    assert p.calls("component_token") == 1
    p.config.write_text(p.config.read_text().replace("daily_budget = 100", "daily_budget = 1"))
    reloaded = run_cli("reload", "--config", str(p.config))
    assert reloaded.returncode == 0, reloaded.stderr
    refused = run_cli("refresh", "--component", "plat", COMP, "--config", str(p.config))
    assert refused.returncode != 0 and "budget" in refused.stderr, refused.stderr
    assert p.calls("component_token") == 1
    assert d.stop() == 0
