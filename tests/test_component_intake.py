"""What an Open Platform takes in and keeps: a ticket WeChat pushes again unchanged keeps its
age but counts as a push, and the temp files a kill leaves in `.private/` go at the next start;
through real daemons, the real callback, and the emulator."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from test_component import COMP, Platform, auth, wait_component
from wxtoken.component.store import ticket_problem
from wxtoken.emulator import Emulator

from helpers import DaemonProcess, read_json, run_cli, wait_until

RT = "refreshtoken@@@s3cr3t-intake"


@pytest.fixture
def platform(tmp_path: Path, emulator: Emulator, sock_dir: Path) -> Iterator[Platform]:
    emulator.state.settings.token_ttl = 60
    yield Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                   renew_before=10)


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
