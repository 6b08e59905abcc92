"""journald's native protocol: entries with fields of their own, sent to a real AF_UNIX datagram
socket standing in for /run/systemd/journal/socket and parsed as journald parses them."""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import os
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from wxtoken import __version__, journal, logs
from wxtoken.emulator import Emulator

from helpers import APPID, APPID2, LEAK_MARKER, SECRET, DaemonProcess

FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # journald's rule for fields a client may set
ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class Entry:
    """One received entry: its fields (name -> value), the form each came in, and how."""

    def __init__(self, payload: bytes, via_memfd: bool, seals: int | None) -> None:
        self.payload = payload
        self.via_memfd = via_memfd
        self.seals = seals
        self.fields: dict[str, str] = {}
        self.forms: dict[str, str] = {}
        pos = 0
        while pos < len(payload):
            end = payload.index(b"\n", pos)
            line = payload[pos:end]
            if b"=" in line:
                name, value = line.split(b"=", 1)
                form, pos = "text", end + 1
            else:  # KEY\n, le64 size, value, \n
                name = line
                (size,) = struct.unpack_from("<Q", payload, end + 1)
                value = payload[end + 9:end + 9 + size]
                assert payload[end + 9 + size:end + 10 + size] == b"\n", "no newline after value"
                form, pos = "binary", end + 10 + size
            key = name.decode()
            assert FIELD_NAME.fullmatch(key), f"journald would refuse the field name {key!r}"
            self.fields[key] = value.decode()  # strict: every value is valid UTF-8
            self.forms[key] = form

    def __getitem__(self, name: str) -> str:
        return self.fields[name]

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


class FakeJournald:
    """An AF_UNIX datagram socket bound at ``path``, read by a thread as journald reads its
    native socket (a datagram's payload, or the memfd passed with it)."""

    def __init__(self, path: Path, reading: bool = True) -> None:
        self.path = path
        self.entries: list[Entry] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        if reading:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
            if not fds:
                self.entries.append(Entry(data, False, None))
                continue
            assert data == b"" and len(fds) == 1, "a memfd comes alone, with no payload"
            fd = fds[0]
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                size = os.fstat(fd).st_size
                self.entries.append(Entry(os.pread(fd, size, 0), True, seals))
            finally:
                os.close(fd)

    def wait(self, check: Callable[[Entry], bool], timeout: float = 15.0) -> Entry:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((e for e in list(self.entries) if check(e)), None)
            if found is not None:
                return found
            time.sleep(0.05)
        raise AssertionError("no such entry; got:\n" + "\n".join(
            e.get("MESSAGE") or "" for e in self.entries))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logs.configure("console", stream=io.StringIO())  # closes the test's journal socket
    structlog.reset_defaults()
    logs._secrets.clear()


@pytest.fixture
def journald(sock_dir: Path) -> Iterator[FakeJournald]:
    fake = FakeJournald(sock_dir / "journal.sock")
    yield fake
    fake.close()


def test_each_line_is_one_entry_with_the_apps_fields_and_nothing_on_the_stream(
        journald: FakeJournald) -> None:
    """MESSAGE is the journal line of old without <N>; PRIORITY, SYSLOG_IDENTIFIER, EVENT,
    APP, APPID and (on a failure) ERRCODE are fields of their own, as are other simple keys;
    the stream gets nothing, so nothing is logged twice."""
    out = io.StringIO()
    assert logs.configure("journal", stream=out, journal_socket=str(journald.path)) == "journal"
    log = logs.get_logger(app="main", appid=APPID)
    log.info("token.refreshed", expires_in=7200, api="stable_token", cached=False)
    log.error("refresh.failed", errcode=40164, errmsg="invalid ip 1.2.3.4, not in whitelist",
              apps=["main", "mini"])
    journald.wait(lambda e: e.get("EVENT") == "refresh.failed")
    ok, failed = journald.entries
    assert ok.fields == {
        "MESSAGE": f"event=token.refreshed app=main appid={APPID} expires_in=7200 "
                   "api=stable_token cached=false",
        "PRIORITY": "6", "SYSLOG_IDENTIFIER": "wxtoken", "EVENT": "token.refreshed",
        "APP": "main", "APPID": APPID, "EXPIRES_IN": "7200", "API": "stable_token",
        "CACHED": "false"}
    assert failed["MESSAGE"].startswith("event=refresh.failed app=main ")
    assert failed["PRIORITY"] == "3" and failed["ERRCODE"] == "40164"
    assert failed["ERRMSG"] == "invalid ip 1.2.3.4, not in whitelist"
    assert "APPS" not in failed.fields and "apps=\"['main', 'mini']\"" in failed["MESSAGE"]
    assert "ERRCODE" not in ok.fields
    assert not ok.via_memfd and set(ok.forms.values()) == {"text"}
    assert out.getvalue() == ""


def test_a_registered_secret_is_scrubbed_from_every_field(journald: FakeJournald) -> None:
    """A secret that slips into any value (a string, a list, a dict, a bound key, a multi-line
    value, the event name itself) reaches no field and not MESSAGE."""
    logs.configure("journal", stream=io.StringIO(), journal_socket=str(journald.path))
    logs.register_secrets([SECRET])
    log = logs.get_logger(app="main", url=f"https://x/token?secret={SECRET}")
    log.error(f"odd {SECRET}", errmsg=f"first\nsecret={SECRET}\n", items=[SECRET, {"s": SECRET}],
              mapping={"k": (SECRET,)}, note=SECRET)
    entry = journald.wait(lambda e: e.get("APP") == "main")
    assert LEAK_MARKER not in entry.payload.decode()
    assert entry["EVENT"] == "odd ***" and entry["NOTE"] == "***"
    assert entry["URL"] == "https://x/token?secret=***"
    assert entry["ERRMSG"] == "first\nsecret=***\n"
    assert "items=\"['***', {'s': '***'}]\"" in entry["MESSAGE"]
    assert "mapping=\"{'k': ('***',)}\"" in entry["MESSAGE"]


def test_multi_line_values_use_the_binary_form(journald: FakeJournald) -> None:
    """A value holding a newline is sent as KEY, a 64-bit little-endian length and the value,
    so it stays one entry; MESSAGE (logfmt escapes newlines) stays a text field."""
    logs.configure("journal", stream=io.StringIO(), journal_socket=str(journald.path))
    logs.get_logger(app="main").warning("callback.refused", reason="line one\nline two",
                                        detail="a=b\r\nc")
    entry = journald.wait(lambda e: e.get("EVENT") == "callback.refused")
    assert entry["REASON"] == "line one\nline two" and entry.forms["REASON"] == "binary"
    assert entry["DETAIL"] == "a=b\r\nc" and entry.forms["DETAIL"] == "binary"
    assert entry.forms["MESSAGE"] == "text" and "\n" not in entry["MESSAGE"]
    assert 'reason="line one\\nline two"' in entry["MESSAGE"]
    assert entry["PRIORITY"] == "4"
    raw = struct.pack("<Q", len(b"line one\nline two"))
    assert b"\nREASON\n" + raw + b"line one\nline two\n" in entry.payload


def test_a_large_entry_arrives_whole_in_a_sealed_memfd(journald: FakeJournald) -> None:
    """An entry too large for a datagram (a 300 KB value) is passed as a sealed memfd with an
    empty datagram, as journald requires, and arrives whole."""
    logs.configure("journal", stream=io.StringIO(), journal_socket=str(journald.path))
    big = "".join(f"{i:07d}," for i in range(37_500))  # 300,000 bytes, every part distinct
    logs.get_logger(app="main").error("rid.answer", errmsg=big)
    entry = journald.wait(lambda e: e.get("EVENT") == "rid.answer")
    assert entry.via_memfd and entry.seals is not None and entry.seals & ALL_SEALS == ALL_SEALS
    assert entry["ERRMSG"] == big and entry["MESSAGE"] == f"event=rid.answer app=main errmsg={big}"
    logs.get_logger(app="main").info("token.refreshed")  # small entries go inline again
    assert not journald.wait(lambda e: e.get("EVENT") == "token.refreshed").via_memfd


def test_an_oversized_value_is_cut_on_a_character_boundary(journald: FakeJournald) -> None:
    """A value over 1 MiB is cut there, on a UTF-8 character boundary, saying how much went;
    the rest of the entry is intact."""
    logs.configure("journal", stream=io.StringIO(), journal_socket=str(journald.path))
    huge = "微信" * 600_000  # 3.6 MB of three-byte characters
    logs.get_logger(app="main").warning("huge", errmsg=huge, errcode=-1)
    entry = journald.wait(lambda e: e.get("EVENT") == "huge")
    value = entry["ERRMSG"]  # Entry decodes strictly: a cut character would raise
    assert len(value.encode()) <= journal.VALUE_MAX
    assert re.fullmatch(r"(微信)+微?… \[\d+ more bytes cut\]", value)
    cut = int(value.rsplit("[", 1)[1].split()[0])
    assert len(value.split("…")[0].encode()) + cut == len(huge.encode())
    assert len(entry["MESSAGE"].encode()) <= journal.VALUE_MAX
    assert entry["ERRCODE"] == "-1" and entry["APP"] == "main" and entry["PRIORITY"] == "4"


def test_log_keys_become_valid_field_names() -> None:
    """Keys are upper-cased to [A-Z0-9_], never start with _ or a digit, and do not land on
    journald's own fields."""
    assert journal.field_name("appid") == "APPID"
    assert journal.field_name("took_ms") == "TOOK_MS"
    assert journal.field_name("state-dir.x") == "STATE_DIR_X"
    assert journal.field_name("_private") == "PRIVATE"
    assert journal.field_name("2fa") == "FA"
    assert journal.field_name("__") is None
    assert journal.field_name("unit") == "WXTOKEN_UNIT"
    assert journal.field_name("message") == "WXTOKEN_MESSAGE"
    assert journal.field_name("priority") == "WXTOKEN_PRIORITY"
    assert journal.field_name("x" * 100) == "X" * 64


def test_a_full_queue_or_a_missing_journald_falls_back_to_the_stream_and_a_new_one_is_found(
        sock_dir: Path) -> None:
    """journald's queue full for a second, or its socket gone: the entry becomes the old <N>
    line on the stream (each line once, somewhere). A journald started again at the same path
    gets the next entries."""
    path = sock_dir / "journal.sock"
    stalled = FakeJournald(path, reading=False)
    out = io.StringIO()
    logs.configure("journal", stream=out, journal_socket=str(path))
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    total = qlen + 3
    log = logs.get_logger(app="main")
    started = time.monotonic()
    for i in range(total):
        log.info("line", n=i)
    waited = time.monotonic() - started
    streamed = [int(line.removeprefix("<6>event=line app=main n="))
                for line in out.getvalue().splitlines()]
    stalled.start()
    stalled.wait(lambda _: len(stalled.entries) + len(streamed) >= total)
    sent = [int(e["N"]) for e in stalled.entries]
    assert streamed and sent == sorted(sent)
    assert sorted(sent + streamed) == list(range(total))
    assert waited >= journal.SEND_TIMEOUT * len(streamed) * 0.9  # each waited, then went on
    stalled.close()  # journald stops: the socket is gone
    log.error("refresh.failed", errcode=-1)
    assert out.getvalue().splitlines()[-1] == "<3>event=refresh.failed app=main errcode=-1"
    again = FakeJournald(path)  # and is back
    try:
        log.info("token.refreshed")
        assert again.wait(lambda e: e.get("EVENT") == "token.refreshed")["APP"] == "main"
        assert "token.refreshed" not in out.getvalue()
    finally:
        again.close()


@pytest.fixture
def journal_namespace(sock_dir: Path) -> Iterator[tuple[list[str], Path]]:
    """A command prefix running a process in a private mount namespace whose /run is a
    directory holding only systemd/journal/socket (and $JOURNAL_STREAM naming the process's
    stderr, as systemd sets it), and the path of that socket on this side."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private /run needs root and unshare (CI runs as root)")
    run = sock_dir / "run"
    (run / "systemd" / "journal").mkdir(parents=True)
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" /run && '
              'export JOURNAL_STREAM="$(stat -L -c %d:%i /proc/self/fd/2)" && exec "$@"',
              str(run)]
    yield prefix, run / "systemd" / "journal" / "socket"
    with contextlib.suppress(OSError):
        shutil.rmtree(run)


def test_a_daemon_under_systemd_logs_fields_to_the_journal_socket(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess],
        journal_namespace: tuple[list[str], Path]) -> None:
    """A real `wxtoken run` with log_format auto, stderr named by $JOURNAL_STREAM and journald's
    socket at its usual path: the start line names the version, an app's refresh carries APP
    and APPID (what `journalctl -u wxtoken APP=main` selects), a failing app ERRCODE; no secret
    in any field, and nothing on stderr."""
    prefix, path = journal_namespace
    fake = FakeJournald(path)
    try:
        config = make_config({"main": {"appid": APPID, "secret": SECRET},
                              "bad": {"appid": APPID2, "secret": "wrong-s3cr3t-0123456789abcd"}},
                             log_format="auto")
        d = daemons(config, prefix=prefix)
        start = fake.wait(lambda e: e.get("EVENT") == "daemon.starting")
        assert start["VERSION"] == __version__ and f"version={__version__}" in start["MESSAGE"]
        assert start["SYSLOG_IDENTIFIER"] == "wxtoken" and start["PRIORITY"] == "6"
        refreshed = fake.wait(lambda e: e.get("EVENT") == "token.refreshed")
        assert refreshed["APP"] == "main" and refreshed["APPID"] == APPID
        assert refreshed["MESSAGE"].startswith("event=token.refreshed app=main ")
        failed = fake.wait(lambda e: e.get("EVENT") == "refresh.failed")
        assert failed["APP"] == "bad" and failed["APPID"] == APPID2
        assert failed["ERRCODE"] == "40001" and int(failed["PRIORITY"]) <= 4  # a wrong secret
        fake.wait(lambda e: e.get("EVENT") == "daemon.ready")
        assert d.stop() == 0
        fake.wait(lambda e: e.get("EVENT") == "daemon.stopped")
        assert d.log_path.read_text() == ""  # every line went to the journal, none twice
        for entry in fake.entries:
            assert LEAK_MARKER not in entry.payload.decode()
    finally:
        fake.close()
