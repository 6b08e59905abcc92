"""Issue 16 item 9: 61023 repairs share one read of the authorizer list. Dead refresh tokens
by the dozen (another system still refreshing during a cut-over) cost a full list read or two,
not one read per repair."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from test_component import COMP, Platform, auth, wait_component
from wxtoken.component.platform import LIST_WINDOW
from wxtoken.emulator import Emulator

from helpers import DaemonProcess, run_cli, wait_until

N = 30


def test_thirty_dead_refresh_tokens_are_repaired_from_one_list_read(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Every stored refresh token of 30 authorizers is refused at once (rotated behind the
    daemon's back): each is repaired (a new token WeChat accepts) with at most two full reads
    of api_get_authorizer_list (one page here), not a read per repair."""
    emulator.state.settings.token_ttl = 8
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=4,
                 renew_before=2)
    for i in range(N):  # found by the reconcile at start
        emulator.platforms.authorize(COMP, auth(i), push=False)
    d = daemons(p.config)
    wait_component(d, p)
    wait_until(lambda: all((p.dir / f"{auth(i)}.json").exists() for i in range(N)),
               timeout=30)
    before = {auth(i): p.token(auth(i)) for i in range(N)}
    lists = p.calls("authorizer_list")
    for i in range(N):
        emulator.platforms.kill_refresh_tokens(COMP, auth(i))

    def repaired(appid: str) -> bool:
        token = p.token(appid)
        return token != before[appid] and emulator.token_status(token) == 0

    wait_until(lambda: all(repaired(auth(i)) for i in range(N)), timeout=60)
    assert d.stop() == 0
    assert not any(e.get("event") == "authorizer.needs_reauthorization" for e in d.events())
    pages = 1  # 30 authorizers, 500 a page
    assert p.calls("authorizer_list") - lists <= 2 * pages


def test_authorizers_the_list_cannot_save_are_decided_on_a_shared_read(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Ten authorizers whose every refresh token is refused, also the list's, and one that
    cancelled without an event: each is decided (needs a new authorization; files removed) on
    a read of the list started after its refusal, shared with the others, so at most one read
    per window (LIST_WINDOW) is made, not one or two per authorizer."""
    emulator.state.settings.token_ttl = 8
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=4,
                 renew_before=2)
    n = 10
    for i in range(n + 1):
        emulator.platforms.authorize(COMP, auth(i), push=False)
    d = daemons(p.config)
    wait_component(d, p)
    wait_until(lambda: all((p.dir / f"{auth(i)}.json").exists() for i in range(n + 1)),
               timeout=30)
    lists = p.calls("authorizer_list")
    start = time.monotonic()
    for i in range(n):
        emulator.platforms.break_authorizer(COMP, auth(i))
    with emulator.state.lock:  # auth(n) cancels without an event reaching the platform
        emulator.platforms.components[COMP].authorizers.pop(auth(n))

    def decided() -> bool:
        status = json.loads(run_cli("status", "--json", "--config", str(p.config)).stdout)
        return set(status["components"][0]["needs_reauthorization"]) == \
            {auth(i) for i in range(n)} and not (p.dir / f"{auth(n)}.json").exists()

    wait_until(decided, timeout=90, interval=1)
    assert d.stop() == 0
    elapsed = time.monotonic() - start
    assert p.calls("authorizer_list") - lists <= 1 + int(elapsed // LIST_WINDOW)
