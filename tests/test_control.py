"""Passive refresh through the daemon's control socket, and tickets: real daemon processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wxtoken import ControlError, read_token, report_invalid
from wxtoken.clock import wechat_day
from wxtoken.emulator import Emulator
from wxtoken.reader import drop_cache

from helpers import (
    APPID,
    APPID2,
    CORPID,
    CORPSECRET,
    NOBODY,
    SECRET,
    SECRET2,
    DaemonProcess,
    curl,
    raw_request,
    rss_mb,
    run_cli,
    socket_of,
    status_line,
    thread_count,
    wait_until,
)

MAIN = {"main": {"appid": APPID, "secret": SECRET}}


@pytest.fixture
def running(emulator: Emulator, make_config: Callable[..., Path],
            daemons: Callable[..., DaemonProcess]) -> tuple[Path, DaemonProcess, str]:
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("control.listening")
    d.wait_for("daemon.ready")
    drop_cache()
    return config, d, str(config.parent / "state")


def test_reported_stale_token_is_replaced_within_a_second(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """WeChat refuses the token: report_invalid returns a new, working one in under 1 s."""
    config, d, state = running
    old = read_token("main", state)
    emulator.invalidate(old)
    assert emulator.token_status(old) == 42001
    started = time.monotonic()
    new = report_invalid("main", old, state, socket_of(config))
    assert time.monotonic() - started < 1.0
    assert new != old and emulator.token_status(new) == 0
    assert read_token("main", state) == new  # the cache was dropped
    assert emulator.calls() == 2
    forced = d.wait_for("token.refreshed", count=2)
    assert forced["forced"] is True


def test_cli_refresh_with_invalid_prints_the_new_token(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """`wxtoken refresh APP --invalid TOKEN` prints the new token; 0 upstream calls if stale."""
    config, _, state = running
    old = read_token("main", state)
    result = run_cli("refresh", "main", "--invalid", old, "--config", str(config))
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip()
    assert new != old and emulator.token_status(new) == 0
    again = run_cli("refresh", "main", "--invalid", old, "--config", str(config))
    assert again.returncode == 0 and again.stdout.strip() == new
    assert emulator.calls() == 2


def test_twenty_concurrent_reports_make_exactly_one_upstream_call(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """20 threads report the same stale token at once: one upstream call, one new token."""
    config, _, state = running
    old = str(read_token("main", state))
    results: list[str] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(20)

    def report() -> None:
        barrier.wait()
        try:
            results.append(str(report_invalid("main", old, state, socket_of(config))))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and results[0] != old
    assert emulator.calls() == 2  # the start, and one passive refresh


def test_report_of_an_already_replaced_token_makes_no_call(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """A token that is no longer the file's: the current one comes back, no upstream call."""
    config, _, state = running
    current = read_token("main", state)
    answer = report_invalid("main", "an-old-token-long-gone-0123456789", state,
                            socket_of(config))
    assert answer == current and emulator.calls() == 1


def test_forced_refreshes_are_spaced_30_s_apart(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """Two refreshes in a row: the second is refused (429, rate_limited), no upstream call. (The
    first replaced a token issued a moment before, so the spacing has already doubled.)"""
    config, _, state = running
    first = run_cli("refresh", "main", "--config", str(config))
    assert first.returncode == 0
    second = run_cli("refresh", "main", "--config", str(config))
    assert second.returncode == 1 and "rate-limited" in second.stderr
    assert emulator.calls() == 2
    with pytest.raises(ControlError) as err:
        report_invalid("main", first.stdout.strip(), state, socket_of(config))
    assert err.value.status == 429 and err.value.error_class == "rate_limited"
    assert err.value.retry_after is not None and 30 < err.value.retry_after <= 60


def test_stable_token_passive_refresh_uses_force_and_its_daily_limit(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """stable_token: force_refresh=true only here; 20 forced a day (persisted) is the limit."""
    config = make_config({"mini": {"appid": APPID2, "secret": SECRET2, "api": "stable_token"}})
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    old = read_token("mini", str(state))
    assert emulator.state.stable[APPID2].forces_today == 0
    new = report_invalid("mini", old, str(state), socket_of(config))
    assert new != old and emulator.state.stable[APPID2].forces_today == 1
    assert d.stop() == 0
    status = json.loads((state / "mini.status.json").read_text())
    status.update(forced_today=20, last_forced_at=0, calls_day=wechat_day(time.time()))
    (state / "mini.status.json").write_text(json.dumps(status))
    d = daemons(config)
    d.wait_for("daemon.ready")
    with pytest.raises(ControlError) as err:
        report_invalid("mini", new, str(state), socket_of(config))
    assert err.value.error_class == "rate_limited" and (err.value.retry_after or 0) > 30
    assert emulator.state.stable[APPID2].forces_today == 1
    d.stop()


def test_upstream_errors_are_answered_with_their_class(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """An upstream error comes back as 502 with errcode and class; never a hang."""
    config, _, state = running
    emulator.add_fault("ip")
    started = time.monotonic()
    with pytest.raises(ControlError) as err:
        report_invalid("main", read_token("main", state), state, socket_of(config))
    assert time.monotonic() - started < 5
    assert err.value.status == 502 and err.value.error_class == "permanent"
    assert err.value.errcode == 40164 and "whitelist" in str(err.value)
    assert read_token("main", state)  # the current token is kept


def test_a_spent_daily_budget_is_a_429_for_everyone(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """Once daily_budget is spent, a passive refresh (the operator's too) is 429 `budget` with
    retry_after until the WeChat day ends, and makes no call."""
    config = make_config(MAIN, daily_budget=2, refresh_interval=0.5)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("budget.exhausted", timeout=15)
    with pytest.raises(ControlError) as err:
        report_invalid("main", read_token("main", str(state)), str(state), socket_of(config))
    assert err.value.status == 429 and err.value.error_class == "budget"
    assert err.value.retry_after is not None and err.value.retry_after > 60
    assert "daily_budget" in str(err.value) or "budget" in str(err.value)
    assert d.stop() == 0
    assert emulator.calls() == 2


def test_operator_refresh_overrides_the_quota_wait(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After 45009 the daemon waits for the daily reset; `wxtoken refresh` tries at once."""
    emulator.add_fault("quota", count=1)
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("refresh.failed")
    assert emulator.calls() == 1
    result = run_cli("refresh", "main", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert emulator.token_status(result.stdout.strip()) == 0
    assert emulator.calls() == 2
    d.stop()


def test_control_endpoint_over_curl_and_its_permissions(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """curl --unix-socket works; the socket is 0660; users outside its group are refused."""
    config, _, state = running
    sock = socket_of(config)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    apps = json.loads(curl(sock, "http://localhost/v1/apps").stdout)["apps"]
    assert apps[0]["app"] == "main" and apps[0]["healthy"] is True
    one = json.loads(curl(sock, "http://localhost/v1/apps/main").stdout)
    assert one["access_token"] == read_token("main", state) and 0 < one["expires_in"] <= 7200
    missing = curl(sock, "-w", "%{http_code}", "http://localhost/v1/apps/nope")
    assert missing.stdout.endswith("404")
    bad = curl(sock, "-w", "%{http_code}", "-X", "POST", "-d", "[1", "-H",
               "Content-Type: application/json", "http://localhost/v1/apps/main/refresh")
    assert bad.stdout.endswith("400")
    if os.geteuid() != 0:
        pytest.skip("the permission check needs root to switch users")
    group = os.stat(sock).st_gid
    refused = curl(sock, "http://localhost/v1/apps", user=65534)
    assert refused.returncode == 7  # couldn't connect
    probe = subprocess.run(  # the kernel's reason, from the system Python as that user
        ["/usr/bin/python3", "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
         "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('EACCES')", sock],
        capture_output=True, text=True, timeout=30, user=65534, group=65534)
    assert probe.stdout.strip() == "EACCES", probe.stderr
    member = curl(sock, "http://localhost/v1/apps", user=65534, groups=[group])
    assert member.returncode == 0 and json.loads(member.stdout)["apps"]


def test_tickets_are_fetched_stored_refreshed_and_printed(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """jsapi and wx_card tickets: in the file, valid, renewed with the token, `token --ticket`."""
    emulator.state.settings.token_ttl = 8
    config = make_config({"main": {"appid": APPID, "secret": SECRET,
                                   "tickets": ["jsapi", "wx_card"]}},
                         refresh_interval=60, renew_before=3)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    first = json.loads((state / "main.json").read_text())
    assert {"jsapi_ticket", "jsapi_ticket_expires_at", "wx_card_ticket",
            "wx_card_ticket_expires_at"} <= set(first)
    for kind in ("jsapi", "wx_card"):
        assert emulator.ticket_status(first[f"{kind}_ticket"]) == 0
        printed = run_cli("token", "main", "--ticket", kind, "--config", str(config))
        assert printed.returncode == 0 and printed.stdout.strip() == first[f"{kind}_ticket"]
    d.wait_for("token.refreshed", count=2, timeout=15)
    second = json.loads((state / "main.json").read_text())
    assert second["access_token"] != first["access_token"]
    assert second["jsapi_ticket"] != first["jsapi_ticket"]
    assert emulator.ticket_status(second["jsapi_ticket"]) == 0
    assert second["jsapi_ticket_expires_at"] > first["jsapi_ticket_expires_at"]
    d.stop()


def test_wecom_agent_token_is_kept_in_its_own_file(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """api = "wecom" with corpid + agentid: the agent's token in <app>.json, accepted by WeCom."""
    config = make_config({"agent1": {"api": "wecom", "corpid": CORPID, "agentid": 1000002,
                                     "secret": CORPSECRET}})
    d = daemons(config)
    d.wait_for("daemon.ready")
    data: dict[str, Any] = json.loads((config.parent / "state" / "agent1.json").read_text())
    assert data["app"] == "agent1" and data["appid"] == CORPID
    assert emulator.token_status(data["access_token"]) == 0
    assert emulator.calls(CORPID, "wecom") == 1
    d.stop()


# -- hardening (issue: adversarial review) -------------------------------------------------------
REFRESH_HEAD = b"POST /v1/apps/main/refresh HTTP/1.1\r\nHost: localhost\r\n"


@pytest.mark.parametrize(("headers", "body", "status"), [
    (b"Content-Length: -1\r\n", b"", "400"),
    (b"Content-Length: lots\r\n", b"", "400"),
    (b"Content-Length: 1e3\r\n", b"", "400"),
    (b"Content-Length: 99999999\r\n", b"", "413"),
    (b"", b"", "411"),
    (b"Transfer-Encoding: chunked\r\n", b"17\r\n{\"invalid_token\": \"x\"}\r\n0\r\n\r\n", "411"),
], ids=["negative", "not-a-number", "float", "oversized", "missing", "chunked"])
def test_bad_or_missing_lengths_are_refused_at_once(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator, headers: bytes,
        body: bytes, status: str) -> None:
    """Bad, missing or oversized lengths and chunked bodies: 400/411/413 at once, no refresh."""
    config, d, _ = running
    started = time.monotonic()
    answer = raw_request(socket_of(config), REFRESH_HEAD + headers + b"\r\n" + body)
    assert status_line(answer).startswith(f"HTTP/1.1 {status} "), answer[:200]
    assert time.monotonic() - started < 2
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error_class"] == "bad_request"
    assert emulator.calls() == 1  # the start only: nothing forced a refresh
    assert "Traceback" not in d.log_path.read_text()


def test_an_empty_reported_token_is_a_400_and_costs_nothing(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """`wxtoken refresh APP --invalid ""` and {"invalid_token": ""} never force a refresh."""
    config, _, _ = running
    cli = run_cli("refresh", "main", "--invalid", "", "--config", str(config))
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and "empty" in cli.stderr
    body = b'{"invalid_token": ""}'
    answer = raw_request(socket_of(config), REFRESH_HEAD + b"Content-Length: %d\r\n\r\n%s" % (
        len(body), body))
    assert status_line(answer).startswith("HTTP/1.1 400 ")
    assert emulator.calls() == 1


def test_malformed_requests_get_an_answer_and_never_a_traceback(
        running: tuple[Path, DaemonProcess, str]) -> None:
    """Junk on the socket: each gets a 4xx (or a close), the daemon logs no traceback and
    keeps serving."""
    config, d, _ = running
    sock = socket_of(config)
    junk = [b"\x00\xff\xfe garbage\r\n\r\n", b"GET /v1/apps/%C3%A9 HTTP/1.1\r\n\r\n",
            b"GET /v1/apps/\xc3\xa9 HTTP/1.1\r\n\r\n", b"POST /v1/apps/../../x/refresh HTTP/1.1\r\n"
            b"Content-Length: 2\r\n\r\n{}", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"DELETE /v1/apps HTTP/1.1\r\n\r\n"]
    for data in junk:
        answer = raw_request(sock, data, close_write=True)
        if answer:
            assert status_line(answer)[9:10] == "4", (data[:40], answer[:100])
    assert json.loads(curl(sock, "http://localhost/v1/apps").stdout)["apps"]
    assert "Traceback" not in d.log_path.read_text()


def test_idle_connections_are_capped_and_timed_out(
        running: tuple[Path, DaemonProcess, str]) -> None:
    """300 connections that send nothing hold neither 300 threads nor the socket for good."""
    import socket
    config, d, _ = running
    sock = socket_of(config)
    baseline = thread_count(d.proc.pid)
    idle = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            idle.append(s)
        time.sleep(0.5)
        assert thread_count(d.proc.pid) <= baseline + 40
        for s in idle:  # the server closes every one of them within its read timeout
            s.settimeout(15)
            try:
                assert s.recv(100) is not None
            except (TimeoutError, ConnectionResetError) as exc:
                raise AssertionError("an idle connection was kept open") from exc
    finally:
        for s in idle:
            s.close()
    assert json.loads(curl(sock, "http://localhost/v1/apps").stdout)["apps"]


def test_get_of_a_corrupt_token_file_is_a_json_503(
        running: tuple[Path, DaemonProcess, str]) -> None:
    """GET /v1/apps/NAME with a corrupt file answers 503 JSON, not an empty reply."""
    config, d, state = running
    Path(state, "main.json").write_text("{garbage")
    result = curl(socket_of(config), "-w", "\n%{http_code}", "http://localhost/v1/apps/main")
    body, code = result.stdout.rsplit("\n", 1)
    assert code == "503" and json.loads(body)["error_class"] == "unavailable"
    assert "not valid JSON" in json.loads(body)["error"]
    assert "Traceback" not in d.log_path.read_text()


def test_reports_during_a_quota_wait_are_429_for_readers_but_root_may_try(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After 45009 a token reader's report is answered 429 with retry_after (no call); the
    operator (root, the daemon's own user) may still force one."""
    emulator.add_fault("quota", count=1)
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("refresh.failed")
    sock = socket_of(config)
    group = os.stat(sock).st_gid
    reader = curl(sock, "-w", "\n%{http_code}", "-X", "POST", "-d", '{"invalid_token": "t-0"}',
                  "http://localhost/v1/apps/main/refresh", user=NOBODY, groups=[group])
    body, code = reader.stdout.rsplit("\n", 1)
    assert code == "429", reader.stdout + reader.stderr
    answer = json.loads(body)
    assert answer["error_class"] == "waiting" and answer["retry_after"] > 60
    assert emulator.calls() == 1
    root = run_cli("refresh", "main", "--config", str(config))
    assert root.returncode == 0, root.stderr
    assert emulator.token_status(root.stdout.strip()) == 0 and emulator.calls() == 2
    d.stop()


def test_forced_refreshes_leave_a_reserve_of_the_budget_for_scheduled_ones(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """With 80 % of daily_budget spent, a token reader's passive refresh is 429 `budget` with
    retry_after, while the scheduled refresh still runs on the remaining 20 %."""
    emulator.state.settings.token_ttl = 6
    config = make_config(MAIN, daily_budget=10, refresh_interval=3600, renew_before=2)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    assert d.stop() == 0
    status = json.loads((state / "main.status.json").read_text())
    status.update(calls_today=8, calls_day=wechat_day(time.time()))
    (state / "main.status.json").write_text(json.dumps(status))
    d = daemons(config)
    d.wait_for("daemon.ready")
    sock = socket_of(config)
    token = read_token("main", str(state))
    reader = curl(sock, "-w", "\n%{http_code}", "-X", "POST", "-d",
                  json.dumps({"invalid_token": token}), "http://localhost/v1/apps/main/refresh",
                  user=NOBODY, groups=[os.stat(sock).st_gid])
    body, code = reader.stdout.rsplit("\n", 1)
    assert code == "429", reader.stdout + reader.stderr
    answer = json.loads(body)
    assert answer["error_class"] == "budget" and answer["retry_after"] > 60
    assert emulator.calls() == 1
    d.wait_for("token.refreshed", timeout=15)  # the 6 s token is renewed on schedule
    assert d.stop() == 0
    assert emulator.calls() == 2
    assert json.loads((state / "main.status.json").read_text())["calls_today"] == 9


def test_a_passive_refresh_that_cannot_be_written_is_written_within_seconds(
        running: tuple[Path, DaemonProcess, str], emulator: Emulator) -> None:
    """The new token of a passive refresh whose write failed is written on the store's backoff,
    not at the next scheduled refresh an hour later, and without fetching again."""
    config, d, state = running
    old = read_token("main", state)
    refreshed = sum(e["event"] == "token.refreshed" for e in d.events())
    blocker = Path(state, "main.json")
    blocker.unlink()
    blocker.mkdir()
    (blocker / "keeps-rmdir-from-working").write_text("x")
    failed = run_cli("refresh", "main", "--invalid", old, "--config", str(config))
    assert failed.returncode == 1 and "cannot" in failed.stderr
    assert emulator.calls() == 2
    (blocker / "keeps-rmdir-from-working").unlink()
    blocker.rmdir()
    wait_until(lambda: Path(state, "main.json").is_file(), timeout=10)
    # the file is renamed into place before its log line is written
    d.wait_for("token.refreshed", timeout=5, count=refreshed + 1)
    drop_cache()
    new = read_token("main", state)
    assert new != old and emulator.token_status(new) == 0
    assert emulator.calls() == 2
    assert d.events()[-1]["event"] == "token.refreshed"


def test_headers_are_bounded_in_bytes_not_only_per_line(
        running: tuple[Path, DaemonProcess, str]) -> None:
    """32 connections each sending 99 headers of 65,000 bytes (http.server alone would take
    6.5 MB each) are answered 431 at 8 KiB; the daemon's memory stays put."""
    import socket
    config, d, _ = running
    sock = socket_of(config)
    before = rss_mb(d.proc.pid)
    header = b"X-A: " + b"a" * 65000 + b"\r\n"
    answers: list[bytes] = []

    def flood() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(sock)
            with contextlib.suppress(OSError):  # the daemon may answer and close before the end
                s.sendall(b"GET /v1/apps HTTP/1.1\r\n" + header * 99 + b"\r\n")
            try:
                answers.append(s.recv(200))
            except OSError:
                answers.append(b"")

    threads = [threading.Thread(target=flood) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rss_mb(d.proc.pid) - before < 20
    assert any(a.startswith(b"HTTP/1.1 431 ") for a in answers), answers[:3]
    assert "Traceback" not in d.log_path.read_text()


def test_one_user_cannot_take_every_connection(
        running: tuple[Path, DaemonProcess, str]) -> None:
    """A token reader holding as many connections as it can leaves room for other readers and
    for the operator: its 17th is refused, root is still served."""
    import socket
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root (CI runs as root)")
    config, _, _ = running
    sock = socket_of(config)
    group = os.stat(sock).st_gid
    code = ("import socket, sys, time\n"
            "held = []\n"
            "for _ in range(40):\n"
            "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); held.append(s)\n"
            "time.sleep(0.5)\n"
            "busy = 0\n"
            "for s in held:\n"
            "    s.setblocking(False)\n"
            "    try:\n"
            "        busy += s.recv(100).startswith(b'HTTP/1.1 503')\n"
            "    except BlockingIOError:\n"
            "        pass\n"
            "print(busy, flush=True)\n"
            "time.sleep(3)\n")
    hog = subprocess.Popen(["/usr/bin/python3", "-c", code, sock], stdout=subprocess.PIPE,
                           text=True, user=NOBODY, group=NOBODY, extra_groups=[group])
    assert hog.stdout is not None
    assert int(hog.stdout.readline()) == 40 - 16  # each user: 16 connections at most
    other = subprocess.run(["curl", "-sS", "--unix-socket", sock, "http://localhost/v1/apps"],
                           capture_output=True, text=True, timeout=10, user=1, group=1,
                           extra_groups=[group])
    assert json.loads(other.stdout)["apps"], other.stderr
    with socket.socket(socket.AF_UNIX) as mine:  # root: the operator
        mine.connect(sock)
        assert json.loads(curl(sock, "http://localhost/v1/apps").stdout)["apps"]
    hog.wait(10)


def test_a_failed_passive_refresh_is_retried_without_another_report(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A reader reports its token and the forced refresh fails (WeChat busy): the retry after
    the backoff replaces the reported token, although the file's token looks valid and is not
    due, and nobody reports it again."""
    config = make_config(MAIN)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    token = json.loads((state / "main.json").read_text())["access_token"]
    emulator.invalidate(token)
    emulator.add_fault("busy", count=1)
    refused = run_cli("refresh", "main", "--invalid", token, "--config", str(config))
    assert refused.returncode == 1 and "errcode -1" in refused.stderr
    d.wait_for("token.refreshed", count=2, timeout=20)
    new = json.loads((state / "main.json").read_text())["access_token"]
    assert new != token and emulator.token_status(new) == 0
    assert emulator.calls(APPID) == 3
    d.stop()


def test_a_report_refused_by_the_spacing_costs_no_call_at_the_next_restart(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A reader that reports each fresh token is held back by the spacing; its refused report
    is not remembered as a token to replace, so a restart reuses the valid token (no call)."""
    config = make_config(MAIN)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    sock = socket_of(config)
    group = os.stat(sock).st_gid
    for expected in ("200", "429"):
        token = json.loads((state / "main.json").read_text())["access_token"]
        reader = curl(sock, "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d",
                      json.dumps({"invalid_token": token}),
                      "http://localhost/v1/apps/main/refresh", user=NOBODY, groups=[group])
        assert reader.stdout == expected, reader.stdout + reader.stderr
    assert d.stop() == 0 and emulator.calls(APPID) == 2
    d = daemons(config)
    d.wait_for("daemon.ready")
    assert emulator.calls(APPID) == 2
    d.stop()


def test_a_missing_socket_directory_is_an_error_line_at_start(
        emulator: Emulator, make_config: Callable[..., Path], sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """The control socket's directory missing when the daemon starts: tokens are still kept
    fresh, but passive refresh is off, so it is an error line (readers would find out during
    an outage), naming the socket and what to do."""
    config = make_config(MAIN, control_socket=str(sock_dir / "missing" / "control.sock"))
    d = daemons(config)
    d.wait_for("daemon.ready")
    disabled = d.wait_for("control.disabled")
    assert disabled["level"] == "error" and disabled["socket"].endswith("missing/control.sock")
    assert "passive refresh" in disabled["impact"]
    assert d.stop() == 0


def test_a_socket_left_by_a_killed_daemon_is_taken_over_and_a_live_one_is_not(
        emulator: Emulator, make_config: Callable[..., Path], sock_dir: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A control socket left behind by a SIGKILLed daemon is replaced at the next start;
    a second daemon started on the socket of a running one serves none (an error line naming
    the socket) and leaves the first one's socket serving."""
    config = make_config(MAIN)
    first = daemons(config)
    first.wait_for("daemon.ready")
    first.proc.kill()
    first.proc.wait(10)
    assert (sock_dir / "control.sock").is_socket()  # left behind
    again = daemons(config)
    again.wait_for("control.listening")
    sock = str(sock_dir / "control.sock")
    assert json.loads(curl(sock, "http://localhost/v1/apps/main").stdout)["app"] == "main"
    second = daemons(config)  # the same config: the same socket
    disabled = second.wait_for("control.disabled")
    assert disabled["socket"] == sock
    assert "another running" in disabled["reason"], disabled
    assert second.stop() == 0
    # still the first one's: the second neither took it nor removed it at its stop
    assert json.loads(curl(sock, "http://localhost/v1/apps/main").stdout)["app"] == "main"
    assert again.stop() == 0
