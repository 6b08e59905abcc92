"""Passive refresh on a fleet's follower (issue 16, item 4): a report the fleet's limits refuse
is answered at once on a follower, with the state and retry_after a candidate gives."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wxtoken.emulator import Emulator

from helpers import (
    APPID,
    NOBODY,
    SECRET,
    DaemonProcess,
    curl,
    socket_of,
    token_of,
    wait_until,
)

MAIN = {"main": {"appid": APPID, "secret": SECRET}}
FOLLOW = {"main": {"appid": APPID}}  # no secret: this host follows the app



def reader_report(config: Path, token: str) -> tuple[int, dict[str, Any], float]:
    """A token reader's (uid 65534, the socket's group) report: HTTP code, answer, seconds."""
    sock = socket_of(config)
    Path(sock).parent.chmod(0o755)  # the hosts fixture's socket dir is 0700
    started = time.monotonic()
    result = curl(sock, "-w", "\n%{http_code}", "-X", "POST", "-d",
                  json.dumps({"invalid_token": token}), "http://localhost/v1/apps/main/refresh",
                  user=NOBODY, groups=[os.stat(sock).st_gid])
    took = time.monotonic() - started
    body, code = result.stdout.rsplit("\n", 1)
    return int(code), json.loads(body) if body else {}, took


@pytest.fixture
def fleet(hosts: Callable[..., Path], daemons: Callable[..., DaemonProcess]
          ) -> Callable[[], tuple[Path, Path, list[DaemonProcess]]]:
    def start() -> tuple[Path, Path, list[DaemonProcess]]:
        candidate, follower = hosts(MAIN), hosts(FOLLOW)
        procs = [daemons(candidate), daemons(follower)]
        for d in procs:
            d.wait_for("daemon.ready", timeout=15)
        return candidate, follower, procs
    return start


def test_a_report_the_spacing_refuses_is_answered_at_once_on_a_follower(
        emulator: Emulator, fleet: Callable[[], tuple[Path, Path, list[DaemonProcess]]]
        ) -> None:
    """A freshly issued token reported again within the spacing: 429 rate_limited at once on
    the candidate and on the follower (not after the follower's 90 s wait), with the same
    retry_after, and no upstream call."""
    candidate, follower, procs = fleet()
    first = token_of(candidate)
    assert first is not None
    wait_until(lambda: token_of(follower) == first, timeout=10)
    code, answer, _ = reader_report(candidate, first)  # a forced refresh: a new token
    assert code == 200, answer
    second = str(answer["access_token"])
    assert second != first
    wait_until(lambda: token_of(follower) == second, timeout=10)
    calls = emulator.calls()
    code, on_candidate, took = reader_report(candidate, second)
    assert code == 429 and on_candidate["error_class"] == "rate_limited", on_candidate
    code, on_follower, took = reader_report(follower, second)
    assert code == 429 and on_follower["error_class"] == "rate_limited", on_follower
    assert took < 2
    assert abs(float(on_follower["retry_after"]) - float(on_candidate["retry_after"])) < 2
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == calls


def test_a_hard_error_wait_is_waiting_on_the_follower_too(
        emulator: Emulator, fleet: Callable[[], tuple[Path, Path, list[DaemonProcess]]]
        ) -> None:
    """While a hard error (40164, IP not whitelisted) holds the fleet back, a token reader's
    report is 429 `waiting` on the follower as on the candidate, at once, with a retry_after
    no shorter than the candidate's; no call is made for it."""
    emulator.add_fault("ip")
    candidate, follower, procs = fleet()
    procs[0].wait_for("refresh.failed", timeout=15)
    calls = emulator.calls()
    code, on_candidate, _ = reader_report(candidate, "t-s3cr3t-0")
    assert code == 429 and on_candidate["error_class"] == "waiting", on_candidate
    code, on_follower, took = reader_report(follower, "t-s3cr3t-0")
    assert code == 429 and on_follower["error_class"] == "waiting", on_follower
    assert took < 2
    assert float(on_follower["retry_after"]) >= float(on_candidate["retry_after"]) - 2
    for d in procs:
        assert d.stop() == 0
    assert emulator.calls() == calls
