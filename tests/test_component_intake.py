"""What an Open Platform takes in and keeps: `wxtoken component import` refuses what it must
not store, a ticket WeChat pushes again unchanged keeps its age but counts as a push, and the
temp files a kill leaves in `.private/` go at the next start; through real daemons, the real
control socket and callback, and the emulator."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from test_component import COMP, Platform, auth, reconciled_just_now, wait_component
from wxtoken.component.ticket_file import ticket_problem
from wxtoken.emulator import Emulator

from helpers import DaemonProcess, read_json, run_cli, wait_until

RT = "refreshtoken@@@s3cr3t-intake"
AT = "accesstoken@@@s3cr3t-intake"


@pytest.fixture
def platform(tmp_path: Path, emulator: Emulator, sock_dir: Path) -> Iterator[Platform]:
    emulator.state.settings.token_ttl = 60
    yield Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                   renew_before=10)


def listed_refresh_token(emulator: Emulator, appid: str) -> str:
    with emulator.state.lock:
        return emulator.platforms.components[COMP].authorizers[appid].latest


def issued(emulator: Emulator, p: Platform, appid: str) -> tuple[str, str]:
    """What the old system holds after its last refresh: (refresh token, access token)."""
    got = requests.post(f"{emulator.url}/cgi-bin/component/api_authorizer_token",
                        params={"component_access_token": p.token(COMP)}, timeout=5,
                        json={"component_appid": COMP, "authorizer_appid": appid,
                              "authorizer_refresh_token": listed_refresh_token(emulator, appid)}
                        ).json()
    return str(got["authorizer_refresh_token"]), str(got["authorizer_access_token"])


def import_file(p: Platform, name: str, lines: list[Any]) -> Any:
    """`wxtoken component import` of these lines (objects, or a line's text as it is)."""
    path = p.config.parent / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return run_cli("component", "import", "plat", str(path), "--config", str(p.config))


# -- import --------------------------------------------------------------------------------------
BAD_LINES: dict[str, tuple[Callable[[float], Any], str]] = {
    # it overwrote the component token's file and forced a component refresh
    "the component's own appid": (
        lambda now: {"authorizer_appid": COMP, "refresh_token": RT, "access_token": AT,
                     "expires_at": int(now) + 50},
        f"authorizer_appid {COMP} is the component's own appid"),
    "a line over 4 KiB": (
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT + "x" * 4096},
        "longer than 4096 bytes"),
    "a control character in refresh_token": (
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT + "\x1b[2J"},
        "refresh_token holds a character no token has"),
    "a control character in access_token": (
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT,
                     "access_token": AT + "\r\nX: y", "expires_at": int(now) + 50},
        "access_token holds a character no token has"),
    "an access_token longer than a token file takes": (  # the file it made was unreadable
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT,
                     "access_token": AT + "x" * 2100, "expires_at": int(now) + 50},
        "access_token is longer than 2048 characters"),
    "expires_at 10^20": (
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT, "access_token": AT,
                     "expires_at": 10**20},
        "expires_at lies more than"),
    "expires_at two days ahead": (
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT, "access_token": AT,
                     "expires_at": int(now) + 2 * 86400},
        "expires_at lies more than"),
    "JSON nested too deep": (
        lambda now: "[" * 2000 + "]" * 2000,  # past the interpreter's recursion limit
        "not a JSON object (nested too deep)"),
    "refreshed_at a day ahead": (
        lambda now: {"authorizer_appid": auth(2), "refresh_token": RT, "access_token": AT,
                     "expires_at": int(now) + 50, "refreshed_at": int(now) + 86400},
        "refreshed_at lies ahead"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_import_refuses_the_whole_file_for_a_line_it_must_not_store(
        case: str, platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A bad second line refuses the whole file with one line naming it and why: nothing of
    the first (good) line is stored, the component token's file is left alone and the component
    token is not refreshed; the good line alone is then taken."""
    emulator.platforms.authorize(COMP, auth(1), push=False)
    reconciled_just_now(platform)
    d = daemons(platform.config)
    wait_component(d, platform)
    component_file = platform.dir / f"{COMP}.json"
    before = component_file.read_bytes()
    calls = emulator.calls(api="component_token")
    good = {"authorizer_appid": auth(1),
            "refresh_token": listed_refresh_token(emulator, auth(1))}
    make, reason = BAD_LINES[case]
    refused = import_file(platform, "bad.jsonl", [good, make(time.time())])
    assert refused.returncode == 1, refused.stdout
    assert f"line 2: {reason}" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (platform.dir / ".private" / "refresh" / f"{auth(1)}.json").exists()
    assert not (platform.dir / ".private" / "refresh" / f"{COMP}.json").exists()
    assert component_file.read_bytes() == before
    assert emulator.calls(api="component_token") == calls
    done = import_file(platform, "good.jsonl", [good])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 1 authorizers (0 with a valid token")
    wait_until(lambda: (platform.dir / f"{auth(1)}.json").exists(), timeout=15)
    assert d.stop() == 0


def test_import_takes_an_expiry_within_a_tokens_life_and_a_past_one_as_no_token(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The limits refuse only the absurd: a token said to expire in 2 hours (WeChat's
    expires_in) is used until it is due; one that expired is no valid token (its refresh token
    is taken, the token fetched)."""
    for i in (1, 2):
        emulator.platforms.authorize(COMP, auth(i), push=False)
    reconciled_just_now(platform)
    d = daemons(platform.config)
    wait_component(d, platform)
    refresh_token, access_token = issued(emulator, platform, auth(1))
    now = int(time.time())
    lines = [{"authorizer_appid": auth(1), "refresh_token": refresh_token,
              "access_token": access_token, "expires_at": now + 7200, "refreshed_at": now - 5},
             {"authorizer_appid": auth(2), "refresh_token": listed_refresh_token(emulator, auth(2)),
              "access_token": AT + "-2", "expires_at": now - 60}]
    done = import_file(platform, "import.jsonl", lines)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 2 authorizers (1 with a valid token")
    assert read_json(platform.dir / f"{auth(1)}.json")["access_token"] == access_token
    wait_until(lambda: (platform.dir / f"{auth(2)}.json").exists(), timeout=15)
    assert read_json(platform.dir / f"{auth(2)}.json")["access_token"] != AT + "-2"
    assert d.stop() == 0


# -- the ticket ------------------------------------------------------------------------------------
def component_status(p: Platform) -> dict[str, Any]:
    out = run_cli("status", "--json", "--config", str(p.config))
    comp: dict[str, Any] = json.loads(out.stdout)["components"][0]
    return comp


def test_the_ticket_rule_age_from_the_first_receipt_pushes_apart() -> None:
    """The rule status and the daemon's health share, as a pure function of the newest
    ticket's first receipt, the last push and now."""
    now, h = 1_800_000_000.0, 3600.0
    assert ticket_problem(None, None, now) == "no component_verify_ticket received yet"
    assert ticket_problem(now - 11 * h, now - 11 * h, now) is None  # pushes stopped 11 h ago
    assert ticket_problem(now - 11 * h, now - 60, now) is None
    old = ticket_problem(now - 13 * h, now - 60, now)  # the same ticket, pushed a minute ago
    assert old is not None and old.startswith(
        "the component_verify_ticket WeChat pushes has not changed for 13h00m (pushed again "
        "60s ago)")
    stopped = ticket_problem(now - 13 * h, None, now)
    assert stopped is not None and stopped.startswith("no component_verify_ticket for 13h00m")
    later = ticket_problem(now - 13 * h, now - 2 * h, now)  # re-pushed, then pushes stopped
    assert later is not None and later.startswith("no component_verify_ticket for 2h00m")
    assert later.endswith("the last one pushed had not changed for 13h00m")


def test_an_unchanged_ticket_pushed_again_keeps_its_age_but_is_no_missing_push(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """WeChat pushes the same component_verify_ticket again: the ticket's age still counts
    from its first receipt (whether a re-push earns a fresh 12 h is undocumented), but status
    does not say no ticket has come while the pushes keep arriving; it says the ticket is old."""
    platform.comp.pushing = False
    d = daemons(platform.config)
    d.wait_for("daemon.ready", timeout=15)
    plat = emulator.platforms
    ticket = plat.new_ticket(platform.comp)

    def push() -> bool:
        return plat.push(platform.comp, {"InfoType": "component_verify_ticket",
                                         "ComponentVerifyTicket": ticket})

    assert push()
    wait_until(lambda: (platform.dir / f"{COMP}.json").exists(), timeout=15)
    # 13 hours on, nothing pushed meanwhile: every time kept of the ticket moves back
    ago = time.time() - 13 * 3600
    ticket_file = platform.dir / ".private" / "ticket.json"
    doc = read_json(ticket_file)
    for entry in doc.values():
        for key in ("received_at", "worked_at"):
            if key in entry:
                entry[key] = ago
    ticket_file.write_text(json.dumps(doc))
    meta_file = platform.dir / ".platform.json"
    meta = read_json(meta_file)
    for key in list(meta):
        if key.startswith("ticket_"):
            meta[key] = ago
    meta_file.write_text(json.dumps(meta))
    assert any("no component_verify_ticket for 13h" in p
               for p in component_status(platform)["problems"])
    assert push()  # the same ticket again, as WeChat does every 10 minutes
    wait_until(lambda: not any("no component_verify_ticket for" in p
                               for p in component_status(platform)["problems"]), timeout=10)
    comp = component_status(platform)
    assert not comp["healthy"]
    assert any("has not changed for 13h" in p and "pushed again" in p
               for p in comp["problems"]), comp["problems"]
    assert comp["ticket_received_at"] == ago  # its age: from its first receipt
    assert comp["ticket_pushed_at"] > ago + 12 * 3600
    assert read_json(ticket_file)["latest"]["received_at"] == ago
    assert d.stop() == 0


# -- leftovers -------------------------------------------------------------------------------------
def test_temp_files_a_kill_left_in_private_go_at_start(
        platform: Platform, emulator: Emulator,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A daemon killed while it wrote the ticket or a refresh token leaves a temp file in
    `.private/` (a secret in it): the next start removes it, as it does in the state dir; the
    refresh tokens themselves stay."""
    d = daemons(platform.config)
    wait_component(d, platform)
    emulator.platforms.authorize(COMP, auth(1))
    refresh = platform.dir / ".private" / "refresh" / f"{auth(1)}.json"
    wait_until(refresh.exists, timeout=15)
    d.stop(signal.SIGKILL)
    left = [platform.dir / ".private" / ".ticket.json.k1ll3d.tmp",
            platform.dir / ".private" / "refresh" / f".{auth(1)}.json.k1ll3d.tmp"]
    for path in left:
        path.write_text('{"refresh_token": "' + RT)  # cut short by the kill
    d = daemons(platform.config)
    d.wait_for("daemon.ready", timeout=15)
    assert [p for p in left if p.exists()] == []
    cleaned = {e["action"] for e in d.events() if e.get("event") == "state_dir.cleaned"}
    assert {f"removed {p}" for p in left} <= cleaned, cleaned
    assert refresh.exists()
    assert d.stop() == 0
