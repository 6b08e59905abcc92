"""WeChat's quota tools: `wxtoken quota`, `wxtoken rid`, `wxtoken clear-quota` (run by the daemon
for a privileged peer, 10 a month), and quota_watch's metrics, against the emulator."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from wxtoken.emulator import Emulator
from wxtoken.quota import redact

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
    read_json,
    run_cli,
    samples,
    socket_of,
    wait_until,
)

MAIN: dict[str, dict[str, Any]] = {"main": {"appid": APPID, "secret": SECRET}}
CLEAR = "/cgi-bin/clear_quota/v2"


def rid_in(text: str) -> str:
    return text.rsplit("rid: ", 1)[1].split()[0].rstrip(");")


def test_quota_prints_wechats_figures_and_names_a_bad_path(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken quota`: daily_limit/used/remain of /cgi-bin/token (the default) and of any API
    path, from openapi/quota/get with the app's token; 76021 with its rid for an unknown path;
    a WeCom app is refused with a reason."""
    config = make_config({**MAIN, "corp": {"corpid": CORPID, "agentid": "1000002",
                                           "secret": CORPSECRET, "api": "wecom"}})
    d = daemons(config)
    d.wait_for("daemon.ready")
    plain = run_cli("quota", "main", "--config", str(config))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0] == (
        f"main ({APPID}) /cgi-bin/token: 1 of 2,000 used today, 1,999 left (WeChat's day ends "
        "00:00 Asia/Shanghai)")
    token = json.loads((config.parent / "state" / "main.json").read_text())["access_token"]
    for _ in range(3):
        requests.get(f"{emulator.url}/cgi-bin/get_api_domain_ip",
                     params={"access_token": token}, timeout=5)
    got = run_cli("quota", "main", "--path", "/cgi-bin/get_api_domain_ip", "--json",
                  "--config", str(config))
    assert got.returncode == 0, got.stderr
    answer = json.loads(got.stdout)
    assert (answer["daily_limit"], answer["used"], answer["remain"]) == (10_000, 3, 9_997)
    assert answer["resets"] == {"month": answer["resets"]["month"], "used": 0, "left": 10,
                                "limit": 10}
    unknown = run_cli("quota", "main", "--path", "/cgi-bin/no/such/api", "--config", str(config))
    assert unknown.returncode == 1
    line = unknown.stderr.strip()
    assert line.startswith("wxtoken: quota: main: /cgi-bin/openapi/quota/get returned errcode "
                           "76021") and line.count("rid: ") == 1 and len(line.splitlines()) == 1
    bad = run_cli("quota", "main", "--path", "https://evil.example/x?y=1", "--config",
                  str(config))
    assert bad.returncode == 1 and "is not an API path" in bad.stderr
    corp = run_cli("quota", "corp", "--config", str(config))
    assert corp.returncode == 1 and "WeCom" in corp.stderr
    assert emulator.stats()["ops"] == {"/cgi-bin/openapi/quota/get": 3}
    d.stop()


def test_quota_with_a_token_wechat_refused_reports_it_and_tries_the_new_one(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A token WeChat no longer takes (fetched elsewhere) is reported as invalid: one passive
    refresh, then quota/get works with the new token."""
    config = make_config(MAIN)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    old = read_json(state / "main.json")["access_token"]
    emulator.invalidate(old)
    got = run_cli("quota", "main", "--json", "--config", str(config))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["used"] == 2
    new = read_json(state / "main.json")["access_token"]
    assert new != old and emulator.token_status(new) == 0 and emulator.calls(APPID) == 2
    refused = d.wait_for("quota.token_refused")
    assert refused["token"] == old[:6] + "…"
    d.stop()


def test_rid_looks_up_a_failed_refresh_with_secrets_and_tokens_masked(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A failed refresh logs WeChat's rid as its own field and keeps it in the status; `wxtoken
    rid` shows that call (the secret in its URL or body masked); a malformed or unknown rid is
    one clear line."""
    emulator.add_fault("busy", count=1, appid=APPID)
    emulator.add_fault("busy", count=1, appid=APPID2)
    config = make_config({**MAIN, "mini": {"appid": APPID2, "secret": SECRET2,
                                           "api": "stable_token"}})
    d = daemons(config)
    d.wait_for("token.refreshed", count=2, timeout=20)  # after the retries
    failed = {e["app"]: e for e in d.events() if e.get("event") == "refresh.failed"}
    assert failed["main"]["errcode"] == -1 and failed["mini"]["errcode"] == -1
    rid = failed["main"]["rid"]
    assert failed["main"]["errmsg"].endswith(f"rid: {rid}")
    shown = run_cli("rid", "main", rid, "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert f"appid={APPID}" in fields["request_url"] and "secret=***" in fields["request_url"]
    assert json.loads(fields["response_body"])["errcode"] == -1
    assert fields["invoke_time"].endswith("Asia/Shanghai")
    mini = run_cli("rid", "mini", failed["mini"]["rid"], "--json", "--config", str(config))
    assert mini.returncode == 0, mini.stderr
    body = json.loads(json.loads(mini.stdout)["request"]["request_body"])
    assert body["appid"] == APPID2 and body["secret"] == "***"
    other = run_cli("rid", "mini", rid, "--config", str(config))  # main's rid, mini's token
    assert other.returncode == 1 and "errcode 76003" in other.stderr
    malformed = run_cli("rid", "main", "x;rm", "--config", str(config))
    assert malformed.returncode == 1 and "is not a rid" in malformed.stderr
    unknown = run_cli("rid", "main", "00000000-00000000-00000000", "--config", str(config))
    assert unknown.returncode == 1 and "errcode 76001" in unknown.stderr
    assert "7 days" in unknown.stderr
    d.stop()


def test_a_failed_refresh_keeps_its_rid_in_the_status(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """`wxtoken status --json` shows the last error's rid, the one the log line has."""
    config = make_config({"main": {"appid": APPID, "secret": "wrong-s3cr3t-000000"}})
    d = daemons(config)
    failed = d.wait_for("refresh.failed")
    status = run_cli("status", "--json", "--config", str(config))
    last = json.loads(status.stdout)["apps"][0]["last_error"]
    assert last["errcode"] == 40001 and last["rid"] == failed["rid"]
    d.stop()


def test_redact_walks_json_inside_strings_and_nested_values() -> None:
    """A response body is JSON inside a string; nested objects are walked; login codes and
    session keys are hidden too."""
    body = json.dumps({"errcode": 0, "access_token": "FULLTOKEN123456", "expires_in": 7200})
    shown = json.loads(redact(body))
    assert shown == {"errcode": 0, "access_token": "FULLTO…", "expires_in": 7200}
    nested = redact({"list": [{"session_key": "abc", "openid": "o1"}], "ticket": "t-123456789"},
                    "request")
    assert nested == {"list": [{"session_key": "***", "openid": "o1"}], "ticket": "t-1234…"}
    assert redact("appid=wx1&js_code=0a1b2c&grant_type=authorization_code") == \
        "appid=wx1&js_code=***&grant_type=authorization_code"


def test_redact_masks_secrets_tokens_and_tickets() -> None:
    """What rid/get returns is masked: secrets as ***, tokens and tickets to a short prefix."""
    url = ("grant_type=client_credential&appid=wx1&secret=abcdef123456&access_token="
           "TOKEN1234567890&component_appsecret=zzz")
    assert redact(url) == ("grant_type=client_credential&appid=wx1&secret=***&access_token="
                           "TOKEN1…&component_appsecret=***")
    body = '{"appid": "wx1", "appsecret": "abc", "authorizer_refresh_token": "refresh-1234567"}'
    assert redact(body) == ('{"appid": "wx1", "appsecret": "***", "authorizer_refresh_token": '
                            '"refres…"}')
    assert redact("ticket=kgt8ON7yVITDhtdwci0qeYfdpQ") == "ticket=kgt8ON…"


def test_quota_watch_exports_remaining_and_limit_metrics(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """quota_watch polls openapi/quota/get (every min(15 min, refresh_interval / 4)) and the
    metrics file carries wxtoken_api_quota_remaining/_limit per app and path; a path WeChat
    does not know is one warning with its errcode and rid, not one per poll."""
    prom = tmp_path / "wxtoken.prom"
    config = make_config({"main": {**MAIN["main"], "quota_watch": [
        "/cgi-bin/token", "/cgi-bin/message/custom/send", "/cgi-bin/no/such"]}},
        refresh_interval=4, metrics_file=str(prom))
    d = daemons(config)
    d.wait_for("daemon.ready")
    key = ("wxtoken_api_quota_remaining", (("app", "main"), ("path", "/cgi-bin/token")))
    wait_until(lambda: prom.exists() and key in samples(prom), timeout=15)
    first = samples(prom)
    assert first[("wxtoken_api_quota_limit", (("app", "main"), ("path", "/cgi-bin/token")))] \
        == 2000
    assert first[("wxtoken_api_quota_limit", (("app", "main"),
                                              ("path", "/cgi-bin/message/custom/send")))] \
        == 500_000
    remain = first[key]
    for _ in range(5):  # calls made elsewhere count against the same quota
        requests.get(f"{emulator.url}/cgi-bin/token", timeout=5, params={
            "grant_type": "client_credential", "appid": APPID, "secret": SECRET})
    wait_until(lambda: samples(prom).get(key, remain) <= remain - 5, timeout=15)
    unknown = [e for e in d.events() if e.get("event") == "quota.watch_failed"]
    assert len(unknown) == 1 and unknown[0]["path"] == "/cgi-bin/no/such"
    assert unknown[0]["errcode"] == 76021 and unknown[0]["rid"]
    assert not any(p == "/cgi-bin/no/such" for (_, labels) in samples(prom)
                   for k, p in labels if k == "path")
    d.stop()


def test_an_ip_not_whitelisted_gets_the_refreshers_hint_in_quota_and_quota_watch(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """40164 on openapi/quota/get: `wxtoken quota` and the `quota.watch_failed` line give the
    refresher's hint (the IP whitelist) beside WeChat's errmsg, which names the IP."""
    config = make_config({"main": {**MAIN["main"], "quota_watch": ["/cgi-bin/token"]}},
                         refresh_interval=4, metrics_file=str(tmp_path / "wxtoken.prom"))
    emulator.add_fault("ip", api="quota_get")
    d = daemons(config)
    d.wait_for("daemon.ready")
    failed = d.wait_for("quota.watch_failed", timeout=15)
    assert failed["errcode"] == 40164 and "IP whitelist" in failed["error"], failed
    out = run_cli("quota", "main", "--config", str(config))
    assert out.returncode == 1 and "IP whitelist" in out.stderr
    assert "not in whitelist" in out.stderr and out.stderr.count("rid: ") == 1, out.stderr
    d.stop()


def test_clear_quota_resets_the_quota_and_ends_the_45009_wait(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """45009 makes the app wait for WeChat's midnight; `wxtoken clear-quota --yes` (root)
    resets the account's quota with clear_quota/v2 and the app refreshes at once, untouched."""
    emulator.state.settings.daily_quota = 1
    config = make_config(MAIN)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    token = read_json(state / "main.json")["access_token"]
    emulator.invalidate(token)
    refused = run_cli("refresh", "main", "--invalid", token, "--config", str(config))
    assert refused.returncode == 1 and "45009" in refused.stderr
    status = read_json(state / "main.status.json")
    assert status["error_class"] == "quota_exhausted" and status["retry_at"] > time.time() + 60
    cleared = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.strip().startswith(f"cleared: the daily quota of main ({APPID}) is "
                                             "reset; 1 of 10 resets used in ")
    d.wait_for("token.refreshed", count=2, timeout=10)
    assert emulator.token_status(read_json(state / "main.json")["access_token"]) == 0
    assert list(emulator.stats()["resets"].values()) == [1]
    ledger = read_json(state / ".quota_resets.json")
    assert ledger[APPID]["count"] == 1
    assert (state / ".quota_resets.json").stat().st_mode & 0o777 == 0o600
    logged = d.wait_for("quota.cleared")
    assert logged["resets_left"] == 9 and logged["level"] == "warning"
    d.stop()


def test_clear_quota_needs_a_confirmation_and_a_privileged_peer(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """Without --yes and without a terminal nothing is done; a token reader (a member of the
    socket's group) is refused 403 and logged; neither reaches WeChat."""
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("daemon.ready")
    unconfirmed = run_cli("clear-quota", "main", "--config", str(config))
    assert unconfirmed.returncode == 1
    assert unconfirmed.stderr.strip() == ("wxtoken: clear-quota: not confirmed: run it in a "
                                          "terminal, or pass --yes")
    sock = socket_of(config)
    reader = curl(sock, "-w", "\n%{http_code}", "-X", "POST", "-d", "{}",
                  "http://localhost/v1/apps/main/clear-quota", user=NOBODY,
                  groups=[os.stat(sock).st_gid])
    body, code = reader.stdout.rsplit("\n", 1)
    assert code == "403", reader.stdout + reader.stderr
    assert json.loads(body)["error_class"] == "forbidden"
    assert d.wait_for("control.forbidden")["uid"] == NOBODY
    quota = curl(sock, "-w", "\n%{http_code}", "http://localhost/v1/apps/main/quota",
                 user=NOBODY, groups=[os.stat(sock).st_gid])
    assert quota.stdout.rsplit("\n", 1)[1] == "200"  # a reader may look at the quota
    assert emulator.stats()["ops"] == {"/cgi-bin/openapi/quota/get": 1}
    d.stop()


def test_a_token_reader_gets_at_most_twenty_lookups_a_minute(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """Each lookup is an upstream call: a reader's 21st in a minute is 429 with retry_after and
    never reaches WeChat; the operator is not limited."""
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("daemon.ready")
    sock = socket_of(config)
    urls = ["-o", "/dev/null", "http://localhost/v1/apps/main/quota"] * 21
    reader = curl(sock, "-w", "%{http_code}\n", *urls, user=NOBODY,
                  groups=[os.stat(sock).st_gid])
    codes = reader.stdout.split()
    assert codes == ["200"] * 20 + ["429"], reader.stdout + reader.stderr
    assert emulator.stats()["ops"]["/cgi-bin/openapi/quota/get"] == 20
    root = run_cli("quota", "main", "--config", str(config))
    assert root.returncode == 0, root.stderr
    d.stop()


def test_ten_resets_a_month_counted_across_restarts(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """After 10 resets this month the 11th is refused locally (no call), also after a
    restart of the daemon."""
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("daemon.ready")
    for n in range(1, 11):
        done = run_cli("clear-quota", "main", "--yes", "--config", str(config))
        assert done.returncode == 0 and f"{n} of 10 resets used" in done.stdout, done.stderr
    assert d.stop() == 0
    d = daemons(config)
    d.wait_for("daemon.ready")
    refused = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert refused.returncode == 1
    assert "10 of WeChat's 10 quota resets of " + APPID in refused.stderr
    assert "none is made before " in refused.stderr and "-01 00:00 Asia/Shanghai" in \
        refused.stderr
    assert emulator.stats()["ops"] == {CLEAR: 10}
    d.stop()


def test_48006_from_wechat_is_reported_as_such_and_ends_the_month(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """Resets made elsewhere (the v1 call with a token) are unknown to wxtoken until WeChat
    answers 48006: that is shown as exactly that (errcode, errmsg, rid) and the month's count
    goes to 10, so the next try makes no call."""
    config = make_config(MAIN)
    state = config.parent / "state"
    d = daemons(config)
    d.wait_for("daemon.ready")
    token = read_json(state / "main.json")["access_token"]
    for _ in range(10):
        assert requests.post(f"{emulator.url}/cgi-bin/clear_quota", json={"appid": APPID},
                             params={"access_token": token}, timeout=5).json()["errcode"] == 0
    refused = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert refused.returncode == 1
    line = refused.stderr.strip()
    assert line.startswith("wxtoken: clear-quota: main: /cgi-bin/clear_quota/v2 returned "
                           "errcode 48006: WeChat refuses: this month's 10 quota resets are "
                           "used up")
    assert "errmsg: forbid to clear quota because of reaching the limit" in line
    assert rid_in(line)
    assert read_json(state / ".quota_resets.json")[APPID]["count"] == 10
    again = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert again.returncode == 1 and "10 of WeChat's 10 quota resets" in again.stderr
    assert emulator.stats()["ops"] == {CLEAR: 1, "/cgi-bin/clear_quota": 10}
    failed = d.wait_for("quota.clear_failed")
    assert failed["errcode"] == 48006 and failed["level"] == "error"
    d.stop()


def test_clear_quota_with_the_daemon_stopped_says_so(
        make_config: Callable[..., Path]) -> None:
    """The reset runs in the daemon (the secret may be a credential no shell can read)."""
    config = make_config(MAIN)
    out = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert out.returncode == 1 and "cannot reach the wxtoken daemon" in out.stderr


def test_the_secret_never_appears_when_clear_quota_fails(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A wrong secret: 40125 from clear_quota/v2, reported and logged without the secret (run_cli
    and the daemon's log are checked for it); the month's count is unchanged."""
    emulator.state.apps[APPID] = "changed-in-the-console-s3cr3t"
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("refresh.failed")
    out = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert out.returncode == 1 and "errcode 40125" in out.stderr
    assert not (config.parent / "state" / ".quota_resets.json").exists()
    assert d.stop(signal.SIGTERM) == 0


def test_reload_starts_and_stops_a_quota_watch_without_touching_the_refresher(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A reload that only adds quota_watch starts the polls (the app's refresher is not
    replaced); one that removes it stops them."""
    from helpers import write_config
    prom = tmp_path / "wxtoken.prom"
    config = make_config(MAIN, refresh_interval=8, metrics_file=str(prom))
    d = daemons(config)
    d.wait_for("daemon.ready")
    top = {k: v for k, v in __import__("tomllib").loads(config.read_text()).items()
           if k != "apps"}
    write_config(config, top, {"main": {**MAIN["main"], "quota_watch": ["/cgi-bin/token"]}})
    added = run_cli("reload", "--config", str(config))
    assert added.stdout.strip() == "reloaded: quota_watch changed for main", added.stderr
    key = ("wxtoken_api_quota_remaining", (("app", "main"), ("path", "/cgi-bin/token")))
    wait_until(lambda: prom.exists() and key in samples(prom), timeout=15)
    write_config(config, top, MAIN)
    removed = run_cli("reload", "--config", str(config))
    assert removed.stdout.strip() == "reloaded: quota_watch changed for main", removed.stderr
    polls = emulator.stats()["ops"]["/cgi-bin/openapi/quota/get"]
    time.sleep(5)  # more than two polling intervals (2 s)
    assert emulator.stats()["ops"]["/cgi-bin/openapi/quota/get"] == polls
    d.stop()


def test_the_month_of_a_reset_is_asia_shanghais_and_old_months_are_dropped(
        tmp_path: Path) -> None:
    """A reset counts in WeChat's month (2026-11-30 16:00 UTC is already December in
    Shanghai); last month's count does not hold this month back and leaves the ledger."""
    from datetime import UTC, datetime

    from wxtoken.clock import wechat_month
    from wxtoken.config import parse_config
    from wxtoken.quota import RESETS_FILE, Operations
    assert wechat_month(datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC).timestamp()) == "2026-11"
    assert wechat_month(datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC).timestamp()) == "2026-12"
    config = parse_config({"state_dir": str(tmp_path), "apps": {"main": {
        "appid": APPID, "secret": SECRET}}}, str(tmp_path / "c.toml"))
    (tmp_path / RESETS_FILE).write_text(json.dumps({
        APPID: {"month": "2026-11", "count": 10}, "wxother": {"month": "2026-11", "count": 3}}))
    december = datetime(2026, 11, 30, 16, 0, 1, tzinfo=UTC).timestamp()
    ops = Operations(lambda: config, lambda: None, lambda *a: None,  # type: ignore[arg-type,return-value]
                     clock=lambda: december)
    assert ops.resets_info(APPID) == {"month": "2026-12", "used": 0, "left": 10, "limit": 10}
    assert ops._count(APPID, "2026-12", 1) == 1
    assert read_json(tmp_path / RESETS_FILE) == {
        APPID: {"month": "2026-12", "count": 1, "last_at": int(december)}}


def test_an_unreadable_reset_ledger_refuses_the_reset(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """A damaged .quota_resets.json is not counted as zero resets: clear-quota is refused,
    saying which file to fix, and WeChat is not asked."""
    config = make_config(MAIN)
    d = daemons(config)
    d.wait_for("daemon.ready")
    (config.parent / "state" / ".quota_resets.json").write_text("{not json")
    out = run_cli("clear-quota", "main", "--yes", "--config", str(config))
    assert out.returncode == 1 and "cannot read " in out.stderr and "nothing was reset" \
        in out.stderr
    assert CLEAR not in emulator.stats()["ops"]
    looked = run_cli("quota", "main", "--json", "--config", str(config))
    assert looked.returncode == 0 and json.loads(looked.stdout)["resets"] is None
    d.stop()
