"""read_token: cached, sees replaced files, raises clearly; importing it stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wxtoken import TokenCorrupt, TokenExpired, TokenMissing, TokenUnavailable, read_token
from wxtoken.reader import CHECK_EVERY, drop_cache
from wxtoken.record import TokenRecord
from wxtoken.store import atomic_write

from helpers import NOBODY, run_as, stdlib_reader_copy


def write_token(state: Path, token: str, expires_in: int = 7200, app: str = "main") -> None:
    now = int(time.time())
    record = TokenRecord(app, "wx1", token, now + expires_in, now)
    atomic_write(str(state / f"{app}.json"), record.to_json(), 0o640)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    drop_cache()


def test_returns_a_str_token_with_expires_at(tmp_path: Path) -> None:
    """The result is a str usable as-is, carrying access_token and expires_at."""
    write_token(tmp_path, "tok-A-0123456789")
    token = read_token("main", str(tmp_path))
    assert token == "tok-A-0123456789" and isinstance(token, str)
    assert token.access_token == "tok-A-0123456789"
    assert token.expires_at > time.time() + 7000
    assert "tok-A-0123456789" not in repr(token)


def test_sees_a_replaced_file_within_the_check_interval(tmp_path: Path) -> None:
    """After an atomic replace, the new token is returned within 100 ms."""
    write_token(tmp_path, "tok-A")
    assert read_token("main", str(tmp_path)) == "tok-A"
    write_token(tmp_path, "tok-B")
    replaced = time.monotonic()
    while read_token("main", str(tmp_path)) != "tok-B":
        assert time.monotonic() - replaced < CHECK_EVERY + 0.05
    assert time.monotonic() - replaced <= CHECK_EVERY + 0.05


def test_missing_file_raises_token_missing(tmp_path: Path) -> None:
    """No file: TokenMissing (a LookupError) naming the path."""
    with pytest.raises(TokenMissing) as err:
        read_token("main", str(tmp_path))
    assert isinstance(err.value, LookupError)
    assert str(tmp_path / "main.json") in str(err.value)


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty"),
    (b'{"app": "main", "access_tok', "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"app": "other", "appid": "wx", "access_token": "t", "expires_at": 9999999999, '
     b'"refreshed_at": 1}', "belongs to app 'other'"),
    (b'{"app": "main", "appid": "wx", "access_token": "t", "expires_at": "soon", '
     b'"refreshed_at": 1}', "expires_at"),
    (b'{"app": "main", "appid": "wx", "expires_at": 9999999999, "refreshed_at": 1}',
     "access_token"),
])
def test_corrupt_file_raises_token_corrupt(tmp_path: Path, content: bytes, reason: str) -> None:
    """Empty, truncated, non-JSON or foreign files raise TokenCorrupt with the reason."""
    (tmp_path / "main.json").write_bytes(content)
    with pytest.raises(TokenCorrupt) as err:
        read_token("main", str(tmp_path))
    assert reason in str(err.value)


def test_app_names_cannot_reach_outside_the_state_dir(tmp_path: Path) -> None:
    """An app name with a path in it is refused before any file is opened."""
    (tmp_path / "state").mkdir()
    write_token(tmp_path, "tok-outside", app="evil")
    with pytest.raises(TokenMissing, match="not a valid app name"):
        read_token("../evil", str(tmp_path / "state"))


def test_directory_instead_of_file_raises_token_corrupt(tmp_path: Path) -> None:
    """A directory where the file belongs is reported, not crashed on."""
    (tmp_path / "main.json").mkdir()
    with pytest.raises(TokenCorrupt, match="is a directory"):
        read_token("main", str(tmp_path))


def test_expired_token_raises_and_is_never_served_from_cache(tmp_path: Path) -> None:
    """A token is never returned past expires_at, even when it was cached."""
    write_token(tmp_path, "tok-short", expires_in=2)
    assert read_token("main", str(tmp_path)) == "tok-short"
    deadline = time.time() + 5
    while True:
        called_at = time.time()
        try:
            token = read_token("main", str(tmp_path))
        except TokenExpired as exc:
            assert "expired" in str(exc)
            break
        assert token.expires_at > called_at
        assert time.time() < deadline
    with pytest.raises(TokenUnavailable):
        read_token("main", str(tmp_path))


def test_corrupted_after_a_good_read_is_seen(tmp_path: Path) -> None:
    """A good file later replaced by garbage is reported, not masked by the cache."""
    write_token(tmp_path, "tok-A")
    read_token("main", str(tmp_path))
    atomic_write(str(tmp_path / "main.json"), b"garbage", 0o640)
    time.sleep(CHECK_EVERY + 0.01)  # the cache looks at the file again after this
    with pytest.raises(TokenCorrupt):
        read_token("main", str(tmp_path))


def test_reader_import_loads_no_daemon_dependencies(tmp_path: Path) -> None:
    """`from wxtoken import read_token` imports none of requests, apscheduler, structlog."""
    write_token(tmp_path, "tok-A")
    code = ("import sys; from wxtoken import read_token; "
            f"assert read_token('main', {str(tmp_path)!r}) == 'tok-A'; "
            "import json; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('requests', 'apscheduler', 'structlog', 'filelock', "
            "'urllib3', 'tomllib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []


def test_a_state_dir_that_is_a_file_or_a_loop_is_token_unavailable(tmp_path: Path) -> None:
    """A state dir that is a regular file, or a symlink loop: TokenUnavailable with a reason,
    never a raw OSError."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(TokenMissing, match="not a directory"):
        read_token("main", str(not_a_dir))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(TokenUnavailable, match="symbolic links"):
        read_token("main", str(loop))


def test_a_fifo_in_place_of_the_token_file_does_not_hang_the_reader(tmp_path: Path) -> None:
    """Something that is not a regular file at <app>.json is TokenCorrupt at once (opening a
    FIFO would block for ever)."""
    os.mkfifo(tmp_path / "main.json")
    with pytest.raises(TokenCorrupt, match="not a regular file"):
        read_token("main", str(tmp_path))


def test_permission_denied_is_not_reported_as_missing(sock_dir: Path) -> None:
    """A reader outside the files' group is told "permission denied", not "missing"."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root (CI runs as root)")
    state = sock_dir / "state"
    state.mkdir(mode=0o755)
    write_token(state, "tok-private")
    (state / "main.json").chmod(0o600)
    code = ("import sys\nfrom wxtoken import read_token, TokenMissing, TokenUnavailable\n"
            "try:\n    read_token('main', sys.argv[1])\n"
            "except TokenMissing as e:\n    print('missing', e)\n"
            "except TokenUnavailable as e:\n    print(type(e).__name__, e)\n")
    lib = stdlib_reader_copy(sock_dir / "lib")
    result = run_as(NOBODY, [], code.replace("sys.argv[1]", repr(str(state))), lib)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TokenCorrupt ") and "permission denied" in result.stdout


STEPPING_READER = r"""
import sys, time
from pathlib import Path
from wxtoken import read_token
from wxtoken.record import TokenRecord
from wxtoken.store import atomic_write
state, offset = Path(sys.argv[1]), Path(sys.argv[2])

def write(token, expires_in):
    now = int(time.time())
    atomic_write(str(state / "main.json"),
                 TokenRecord("main", "wx1", token, now + expires_in, now).to_json(), 0o640)

write("tok-before", 7200)
assert read_token("main", str(state)) == "tok-before"  # cached for 100 ms
offset.write_text("-3600\n")  # the wall clock steps back an hour
write("tok-after", 7200 + 3600)
seen = read_token("main", str(state))  # at once: the entry is from the clock's future
offset.write_text("+0\n")
write("tok-short", 30)
assert read_token("main", str(state)) == "tok-short"  # cached
offset.write_text("+60\n")  # a step forward past its expiry
try:
    late = str(read_token("main", str(state)))
except LookupError as exc:
    late = type(exc).__name__
print(seen, late)
"""


def test_a_stepped_wall_clock_neither_keeps_an_old_token_nor_serves_an_expired_one(
        tmp_path: Path) -> None:
    """The cache's times are the wall clock's, as expires_at is: stepped back an hour, the
    next read sees the replaced file at once (not an hour later); stepped forward past a
    cached token's expiry, the next read raises TokenExpired. (libfaketime steps the reading
    process's clock; the monotonic clock is left alone.)"""
    from test_daemon import FAKETIME
    if not FAKETIME:
        pytest.skip("libfaketime is not installed (./dev.sh test installs the faketime package)")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {**os.environ, "LD_PRELOAD": FAKETIME[0], "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    done = subprocess.run([sys.executable, "-c", STEPPING_READER, str(tmp_path), str(offset)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tok-after", "TokenExpired"]
