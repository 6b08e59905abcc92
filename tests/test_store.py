"""The store: atomic replacement, modes, the writers' lock, stale temp files."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from wxtoken.errors import StoreError, TokenCorrupt
from wxtoken.record import TokenRecord, parse_record
from wxtoken.status import AppStatus, LastResult
from wxtoken.store import FileStore, atomic_write, clean_state_dir

from helpers import NOBODY, stored


def record(token: str, refreshed_at: int | None = None) -> TokenRecord:
    now = refreshed_at or int(time.time())
    return TokenRecord("main", "wx1", token, now + 7200, now)


def test_write_produces_the_contract_file_with_explicit_mode(tmp_path: Path) -> None:
    """The file is the contract JSON, mode set explicitly whatever the umask."""
    old = os.umask(0o077)
    try:
        FileStore(str(tmp_path), "main", file_mode=0o640).write(record("tok"))
    finally:
        os.umask(old)
    path = tmp_path / "main.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert parse_record(path.read_bytes(), "main") == record("tok", int(
        parse_record(path.read_bytes(), "main").refreshed_at))
    assert [p.name for p in tmp_path.iterdir()] == ["main.json"]


def test_file_group_is_applied(tmp_path: Path) -> None:
    """file_group chgrps the token file (here to the caller's own primary group)."""
    group = grp.getgrgid(os.getgid()).gr_name
    FileStore(str(tmp_path), "main", file_group=group).write(record("tok"))
    assert (tmp_path / "main.json").stat().st_gid == os.getgid()
    with pytest.raises(StoreError, match="does not exist"):
        FileStore(str(tmp_path), "main", file_group="no-such-group-wxt").write(record("tok"))


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    """When the write fails (group missing), the previous token file is untouched."""
    FileStore(str(tmp_path), "main").write(record("old"))
    before = (tmp_path / "main.json").read_bytes()
    with pytest.raises(StoreError):
        FileStore(str(tmp_path), "main", file_group="no-such-group-wxt").write(record("new"))
    assert (tmp_path / "main.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.json"]


def test_unwritable_directory_is_a_clear_store_error(tmp_path: Path) -> None:
    """A directory that cannot take the temp file raises StoreError naming the file."""
    store = FileStore(str(tmp_path / "missing-dir"), "main")
    with pytest.raises(StoreError, match=r"cannot write .*main.json: No such file or directory"):
        store.write(record("tok"))


def test_directory_in_place_of_the_token_file_is_replaced(tmp_path: Path) -> None:
    """An empty directory squatting on <app>.json is removed and the file written."""
    (tmp_path / "main.json").mkdir()
    store = FileStore(str(tmp_path), "main")
    with pytest.raises(TokenCorrupt):
        store.read()
    store.write(record("tok"))
    assert stored(tmp_path).access_token == "tok"


def test_start_removes_every_apps_temp_files_in_one_scan(tmp_path: Path) -> None:
    """A crash's leftovers (.<app>.*.tmp) go, whatever the app; other files stay."""
    for name in (".main.abc123.tmp", ".main.zz.tmp", ".other.abc.tmp", "main.json.bak",
                 "main.json"):
        (tmp_path / name).write_text("x")
    removed = clean_state_dir(str(tmp_path))
    assert sorted(removed) == [f"removed {tmp_path}/{n}" for n in (
        ".main.abc123.tmp", ".main.zz.tmp", ".other.abc.tmp")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "main.json", "main.json.bak"]


WRITER = """
import os, sys
from wxtoken.store import held_temp_file
fd, tmp = held_temp_file(sys.argv[1], ".main.json.")
os.write(fd, b"new")
print(tmp, flush=True)
sys.stdin.readline()          # the test runs a start's clean-up meanwhile
os.replace(tmp, os.path.join(sys.argv[1], "main.json"))
print("replaced", flush=True)
"""


def test_a_start_leaves_the_temp_file_of_a_live_writer_alone(tmp_path: Path) -> None:
    """Daemons may share a state dir: one starting while another is between its temp file and
    the rename must not remove that file (seen as store.failed "cannot write main.json: No such
    file or directory" and a wasted call); a dead writer's temp file still goes."""
    (tmp_path / "main.json").write_text("old")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdin is not None
        tmp = writer.stdout.readline().strip()
        assert tmp.endswith(".tmp") and os.path.exists(tmp)
        (tmp_path / ".main.json.dead.tmp").write_text("x")  # a killed writer's
        assert clean_state_dir(str(tmp_path)) == [f"removed {tmp_path}/.main.json.dead.tmp"]
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "replaced"
    finally:
        writer.kill()
        writer.wait()
    assert (tmp_path / "main.json").read_text() == "new"


CLEAN = "import sys\nfrom wxtoken.store import clean_state_dir\n" \
        "print(sorted(clean_state_dir(sys.argv[1])))\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv: a leftover of another user's run")
def test_a_leftover_the_daemon_cannot_open_goes_once_it_is_old(tmp_path: Path) -> None:
    """A crashed run as another user (root by hand, say) leaves a 0600 temp file the daemon's
    user can neither open nor flock: removed once older than a minute, kept while it could
    still be live. (The clean-up runs as root without CAP_DAC_OVERRIDE: as the daemon's user,
    it owns the directory, not the file.)"""
    old, fresh = tmp_path / ".main.json.old.tmp", tmp_path / ".main.json.new.tmp"
    for path in (old, fresh):
        path.write_text("x")
        path.chmod(0o600)
        os.chown(path, NOBODY, NOBODY)
    os.utime(old, (time.time() - 120, time.time() - 120))
    out = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                          sys.executable, "-c", CLEAN, str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr([f"removed {old}"])
    assert not old.exists() and fresh.exists()


def test_a_temp_file_removed_before_its_writer_held_it_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clean-up can win the race between mkstemp() and the writer's flock(): the writer
    sees its file unlinked and makes another, so its write still lands. (mkstemp is wrapped
    only to put the clean-up exactly in that window, which no real timing hits on demand.)"""
    real_mkstemp = tempfile.mkstemp
    raced: list[str] = []

    def mkstemp_then_clean(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, tmp = real_mkstemp(*args, **kwargs)
        if not raced:  # a start's clean-up runs right here, once
            raced.extend(clean_state_dir(str(tmp_path)))
        return fd, tmp

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_clean)
    atomic_write(str(tmp_path / "main.json"), b"new", 0o640)
    assert len(raced) == 1 and raced[0].startswith(f"removed {tmp_path}/.main.json.")
    assert (tmp_path / "main.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "main.json"]


@pytest.mark.parametrize("shared", [False, True], ids=["two-stores", "one-store"])
def test_lock_serialises_writers(tmp_path: Path, shared: bool) -> None:
    """Writers never hold the lock at once: separate Store objects (as in two daemons) or
    threads sharing one Store (scheduler and control endpoint; filelock alone is reentrant)."""
    one = FileStore(str(tmp_path), "main")
    holders: list[int] = []
    overlaps: list[int] = []

    def worker(n: int) -> None:
        store = one if shared else FileStore(str(tmp_path), "main")
        for _ in range(20):
            with store.locked():
                holders.append(n)
                if len(holders) > 1:
                    overlaps.append(n)
                time.sleep(0.001)
                holders.remove(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


def test_lock_timeout_is_a_store_error(tmp_path: Path) -> None:
    """Waiting too long for the lock is reported as a StoreError, not a hang."""
    a, b = FileStore(str(tmp_path), "main"), FileStore(str(tmp_path), "main")
    with a.locked(), pytest.raises(StoreError, match="timed out"), b.locked(timeout=0.2):
        pass


def test_status_roundtrip_and_damaged_status_starts_afresh(tmp_path: Path) -> None:
    """The status file round-trips; a damaged one reads as a fresh status."""
    store = FileStore(str(tmp_path), "main")
    status = AppStatus(last_result=LastResult.OK, calls_day="2026-11-24", calls_today=3)
    store.write_status(status)
    assert store.read_status() == status
    (tmp_path / "main.status.json").write_text("{not json")
    assert store.read_status() == AppStatus()


def test_atomic_write_never_shows_a_partial_file(tmp_path: Path) -> None:
    """A reader thread hammering the path during 300 replaces always parses a whole file."""
    path = str(tmp_path / "main.json")
    atomic_write(path, record("t0").to_json(), 0o640)
    stop = threading.Event()
    bad: list[bytes] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            with open(path, "rb") as fh:
                raw = fh.read()
            reads += 1
            try:
                parse_record(raw, "main")
            except TokenCorrupt:
                bad.append(raw)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        atomic_write(path, record(f"t{i}" * (1 + i % 50)).to_json(), 0o640)
    stop.set()
    t.join()
    assert bad == [] and reads > 0



def test_lock_files_are_the_daemons_alone(tmp_path: Path) -> None:
    """Lock files live in .locks/ (0700) and are 0600: a reader in the files' group could
    otherwise flock() one read-only and stop every refresh. The daemon's start removes the
    lock files of earlier versions (<app>.lock, 0640) and makes .locks 0700 again."""
    with FileStore(str(tmp_path), "main").locked():
        pass
    locks = tmp_path / ".locks"
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700
    assert stat.S_IMODE((locks / "main.lock").stat().st_mode) == 0o600
    old = tmp_path / "main.lock"
    old.write_text("")
    old.chmod(0o640)  # as an earlier version left it
    locks.chmod(0o750)
    assert sorted(clean_state_dir(str(tmp_path))) == [
        f"made {locks} 0700", f"removed {old} (locks now live in .locks/)"]
    assert not old.exists() and stat.S_IMODE(locks.stat().st_mode) == 0o700
