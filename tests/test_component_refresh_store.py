"""Issue 16 item 10: a refresh-token write that fails (the disk under ``.private/refresh/`` is
read-only or full) is a store failure: backed off, no call while the last refresh token cannot
be made durable, the published token kept, and recovery once the directory is writable."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from test_component import COMP, Platform, auth, has_ticket, wait_component
from wxtoken.emulator import Emulator

from helpers import DaemonProcess, fill, run_cli, wait_until

# a read-only bind mount and a tmpfs: real OS failures (CI runs as root)
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` becomes a read-only bind mount of itself (writes fail with EROFS) until
    the block ends."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@contextlib.contextmanager
def full(directory: Path) -> Iterator[Callable[[], None]]:
    """``directory`` moves onto a small tmpfs (its files copied over), which is then filled
    (writes fail with ENOSPC); the block gets the function that frees the space. Unmounted at
    the end (after the daemon has stopped)."""
    files = {f.name: f.read_bytes() for f in directory.iterdir()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs",
                    str(directory)], check=True)
    try:
        for name, data in files.items():
            (directory / name).write_bytes(data)
            (directory / name).chmod(0o600)
        filler = fill(directory)
        yield filler.unlink
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def failures(d: DaemonProcess, appid: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("app") == appid
            and e.get("event") in ("store.failed", "refresh.crashed")]


def rotated_to(emulator: Emulator, appid: str) -> str:
    with emulator.state.lock:
        return str(emulator.platforms.components[COMP].authorizers[appid].latest)


@pytest.mark.parametrize("failure", ["read-only file system", "no space left on device"])
def test_a_due_authorizer_makes_no_call_while_its_refresh_token_cannot_be_written(
        failure: str, tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The authorizer is due while ``.private/refresh`` cannot be written (the token directory
    can): no api_authorizer_token call (each would rotate the refresh token and retire the
    token readers hold), store.failed lines with backoff, never refresh.crashed; the token in
    the file stays accepted; once the directory is writable the authorizer refreshes."""
    emulator.state.settings.token_ttl = 8
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=4,
                 renew_before=2)
    d = daemons(p.config)
    wait_component(d, p)
    appid = auth(1)
    emulator.platforms.authorize(COMP, appid)
    wait_until(lambda: (p.dir / f"{appid}.json").exists(), timeout=15)
    refresh_dir = p.dir / ".private" / "refresh"
    with contextlib.ExitStack() as stack:
        if failure == "read-only file system":
            writable = stack.close
            stack.enter_context(read_only(refresh_dir))
        else:
            writable = stack.enter_context(full(refresh_dir))
        before = p.token(appid)
        calls = p.calls("authorizer_token")
        # the token is due within 8 s; then a few retries (about a second apart)
        wait_until(lambda: len(failures(d, appid)) >= 4, timeout=30)
        assert p.calls("authorizer_token") == calls
        assert p.token(appid) == before and emulator.token_status(before) == 0
        failed = failures(d, appid)
        assert {e["event"] for e in failed} == {"store.failed"}, failed
        assert all(e["level"] == "error" and failure in e["error"] for e in failed)
        assert [e["attempt"] for e in failed[:4]] == [1, 2, 3, 4]
        writable()
        wait_until(lambda: p.token(appid) != before, timeout=15)
        wait_until(lambda: emulator.token_status(p.token(appid)) == 0, timeout=10)
        assert d.stop() == 0
        assert p.refresh_token(appid) == rotated_to(emulator, appid)
    assert not [e for e in d.events() if e.get("event") == "refresh.crashed"]


def test_a_refresh_token_that_could_not_be_written_is_kept_and_its_token_published_later(
        tmp_path: Path, emulator: Emulator, sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The directory becomes read-only while the call is on its way (after the daemon found it
    writable): the rotated refresh token and its access token are kept in memory; no further
    call while they cannot be written (store.failed with backoff); once the directory is
    writable the refresh token is written, then that same access token is published (one call
    in all), and WeChat accepts it."""
    emulator.state.settings.token_ttl = 60  # not due during the test: one forced refresh
    p = Platform(tmp_path, emulator, sock_dir, push_every=2, refresh_interval=600,
                 renew_before=10)
    d = daemons(p.config)
    wait_component(d, p)
    appid = auth(1)
    emulator.platforms.authorize(COMP, appid)
    path = p.dir / f"{appid}.json"
    wait_until(lambda: path.exists() and has_ticket(path), timeout=15)
    before = p.token(appid)
    calls = p.calls("authorizer_token")
    emulator.state.settings.latency = 1.5  # the call waits in the emulator before it is made
    refresh_dir = p.dir / ".private" / "refresh"
    answers: list[subprocess.CompletedProcess[str]] = []
    forced = threading.Thread(target=lambda: answers.append(run_cli(
        "refresh", "--component", "plat", appid, "--invalid", before, "--config",
        str(p.config))))
    forced.start()
    wait_until(lambda: emulator.state.inflight >= 1, timeout=10)
    try:
        with read_only(refresh_dir):
            forced.join(30)
            emulator.state.settings.latency = 0.0
            wait_until(lambda: p.calls("authorizer_token") == calls + 1, timeout=10)
            issued = rotated_to(emulator, appid)
            wait_until(lambda: len(failures(d, appid)) >= 4, timeout=30)
            assert p.calls("authorizer_token") == calls + 1
            assert p.token(appid) == before and emulator.token_status(before) == 0
            failed = failures(d, appid)
            assert {e["event"] for e in failed} == {"store.failed"}, failed
            assert failed[-1]["attempt"] >= 3
    finally:
        emulator.state.settings.latency = 0.0
        forced.join(30)
    assert answers and answers[0].returncode != 0
    wait_until(lambda: p.token(appid) != before, timeout=15)
    assert emulator.token_status(p.token(appid)) == 0
    assert p.refresh_token(appid) == issued
    assert d.stop() == 0
    assert p.calls("authorizer_token") == calls + 1  # the token that call issued: published
