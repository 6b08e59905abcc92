"""Torture: SIGKILL at random moments, torn-read hunting, and a WeChat failing half the time."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wxtoken import TokenUnavailable, read_token
from wxtoken.emulator import Emulator

from helpers import APPID, SECRET, DaemonProcess, wait_until

pytestmark = pytest.mark.slow

# A reader in its own process: parse the given files continuously until `stop` appears, then
# print what it saw. Raw open + read + json.loads on every iteration (no caching), like any
# program in any language would.
READER = r"""
import json, os, sys, time
stop, min_reads, pause, paths = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
reads = bad = missing_after_seen = 0
seen_file, tokens, samples = set(), set(), []
while not os.path.exists(stop) or reads < min_reads:
    for path in paths:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            if path in seen_file:
                missing_after_seen += 1
            continue
        seen_file.add(path)
        reads += 1
        try:
            data = json.loads(raw)
            assert isinstance(data["access_token"], str) and data["access_token"]
            assert isinstance(data["expires_at"], int) and isinstance(data["refreshed_at"], int)
            tokens.add(data["access_token"])
        except Exception:
            bad += 1
            if len(samples) < 5:
                samples.append(raw[:80].decode("latin-1"))
    if pause:
        time.sleep(pause)
print(json.dumps({"reads": reads, "bad": bad, "missing_after_seen": missing_after_seen,
                  "tokens": sorted(tokens), "samples": samples}))
"""


def start_readers(n: int, stop: Path, min_reads: int, paths: list[Path],
                  pause: float = 0.0) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-c", READER, str(stop), str(min_reads),
                              str(pause), *map(str, paths)], stdout=subprocess.PIPE, text=True)
            for _ in range(n)]


def collect(readers: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    results = []
    for r in readers:
        out, _ = r.communicate(timeout=120)
        results.append(json.loads(out))
    return results


def test_sigkill_at_random_moments_never_leaves_a_torn_file(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """200 SIGKILLs of daemons writing 4 files 10x/s (two at a time on one state dir, each
    killed at a random moment once it writes): readers never see a partial file."""
    apps = {}
    for i in range(4):
        appid = f"wx{i:016d}"
        emulator.state.apps[appid] = f"s3cr3t-kill-{i}"
        apps[f"app{i}"] = {"appid": appid, "secret": f"s3cr3t-kill-{i}"}
    config = make_config(apps, refresh_interval=0.1)
    state = tmp_path / "state"
    stop = tmp_path / "stop"
    files = [state / f"app{i}.json" for i in range(4)]
    # a short pause per round leaves CPU for the daemons being killed (2 cores in CI)
    readers = start_readers(2, stop, 0, files, 0.0002)
    leftovers = [0, 0]
    writing = [0, 0]  # kills that landed once the daemon had written (not during its start)

    def written() -> tuple[int, ...]:
        stamps = []
        for path in files:
            try:
                stamps.append(path.stat().st_mtime_ns)
            except FileNotFoundError:
                stamps.append(0)
        return tuple(stamps)

    def kill_loop(lane: int) -> None:
        rng = random.Random(20261124 + lane)
        for _ in range(100):
            before = written()
            proc = subprocess.Popen([sys.executable, "-m", "wxtoken", "run", "--config",
                                     str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # its start takes longer on a loaded machine: the kill comes once files change
            deadline = time.monotonic() + 10
            while written() == before and time.monotonic() < deadline:
                time.sleep(0.01)
            writing[lane] += written() != before
            time.sleep(rng.uniform(0.0, 0.25))  # a random moment of its writes to kill at
            proc.kill()
            proc.wait()
            leftovers[lane] += len([p for p in os.listdir(state) if p.endswith(".tmp")])

    # two lanes: the kills land at twice the rate, and on two writers of one state dir
    lanes = [threading.Thread(target=kill_loop, args=(lane,)) for lane in range(2)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    assert sum(writing) >= 150, writing  # the kills hit daemons at work
    stop.touch()
    results = collect(readers)
    for r in results:
        assert r["bad"] == 0, r["samples"]
        assert r["missing_after_seen"] == 0
        assert isinstance(r["reads"], int) and r["reads"] > 1000
    d = daemons(config)
    d.wait_for("daemon.ready")
    assert d.stop() == 0
    assert [p for p in os.listdir(state) if p.endswith(".tmp")] == []
    for i in range(4):
        data = json.loads((state / f"app{i}.json").read_text())
        assert emulator.token_status(data["access_token"]) == 0
    print(f"kill -9 torture: {emulator.calls()} refreshes, {sum(writing)} kills while writing, "
          f"temp files seen after kills: {sum(leftovers)}, "
          f"reads: {sum(int(str(r['reads'])) for r in results)}")


def test_100k_reads_during_continuous_refreshes_are_never_torn(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """3 reader processes, >= 100,000 reads while the file is replaced 10x/s: whole and real."""
    config = make_config(refresh_interval=0.1)
    d = daemons(config)
    d.wait_for("daemon.ready")
    stop = tmp_path / "stop"
    readers = start_readers(3, stop, 34_000, [tmp_path / "state" / "main.json"])
    calls = emulator.calls()
    wait_until(lambda: emulator.calls() >= calls + 20, timeout=30)  # reads across 20 refreshes
    stop.touch()
    results = collect(readers)
    assert d.stop() == 0
    issued = set(emulator.state.tokens)
    assert sum(int(str(r["reads"])) for r in results) >= 100_000
    for r in results:
        assert r["bad"] == 0, r["samples"]
        tokens = set(r["tokens"])  # type: ignore[call-overload]
        assert tokens <= issued
        assert len(tokens) >= 10  # it really read across refreshes
    assert emulator.calls(APPID) == len(issued)


def test_upstream_failing_half_the_time_never_hands_readers_an_expired_token(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """50 % mixed failures, 30 s tokens: every read token works, and calls stay bounded."""
    s = emulator.state.settings
    s.token_ttl, s.overlap, s.hang_seconds = 30, 5, 2.0
    # each fault is tried in turn at its rate: together they hit 50.0 % of token calls
    rates = (("busy", 0.1), ("5xx", 0.1), ("garbage", 0.1), ("reset", 0.1),
             ("minute_quota", 0.1), ("empty_token", 0.1), ("hang", 0.05))
    ok = 1.0
    for mode, rate in rates:
        emulator.add_fault(mode, rate=rate)
        ok *= 1 - rate
    assert abs(ok - 0.5) < 0.01
    config = make_config({"main": {"appid": APPID, "secret": SECRET}},
                         refresh_interval=3, renew_before=8)
    d = daemons(config)
    d.wait_for("token.refreshed", timeout=30)
    failures: list[str] = []
    seen: set[str] = set()
    deadline = time.monotonic() + 40
    state = str(config.parent / "state")

    def reader() -> None:
        while time.monotonic() < deadline:
            called_at = time.time()
            try:
                token = read_token("main", state)
            except TokenUnavailable as exc:
                failures.append(str(exc))
            else:
                if token.expires_at <= called_at:
                    failures.append("expired token handed out")
                if code := emulator.token_status(token):
                    failures.append(f"emulator rejected a read token: {code}")
                seen.add(str(token))
            time.sleep(0.05)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls_in_window = emulator.calls()
    assert d.stop() == 0
    events = d.events()
    failed = [e for e in events if e["event"] == "refresh.failed"]
    assert failures == []
    assert len(seen) >= 5 and failed  # refreshes happened, and so did failures
    assert all(e["error_class"] == "transient" for e in failed)
    assert calls_in_window <= 100  # ~45 s of 3 s refreshes at 50 % failure: ~30; a loop: 1000s
    print(f"chaos: {calls_in_window} calls, {len(failed)} failed, {len(seen)} tokens seen")
