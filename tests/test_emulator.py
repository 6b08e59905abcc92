"""The emulator itself behaves as WeChat documents (the other tests rely on it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import requests

from wxtoken.emulator import Emulator

from helpers import APPID, CORPID, CORPSECRET, SECRET


def token(emu: Emulator, **params: str) -> dict[str, Any]:
    q = {"grant_type": "client_credential", "appid": APPID, "secret": SECRET, **params}
    body: dict[str, Any] = requests.get(f"{emu.url}/cgi-bin/token", params=q, timeout=5).json()
    return body


def stable(emu: Emulator, force: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = requests.post(f"{emu.url}/cgi-bin/stable_token", timeout=5, json={
        "grant_type": "client_credential", "appid": APPID, "secret": SECRET,
        "force_refresh": force}).json()
    return body


def business(emu: Emulator, tok: str) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(f"{emu.url}/cgi-bin/get_api_domain_ip",
                                        params={"access_token": tok}, timeout=5).json()
    return body


def test_each_token_call_issues_a_new_token_and_the_old_one_dies_after_overlap(
        emulator: Emulator) -> None:
    """cgi-bin/token: a new token per call; the previous one works only `overlap` longer."""
    emulator.state.settings.overlap = 0.5
    first = token(emulator)["access_token"]
    second = token(emulator)["access_token"]
    assert first != second
    assert "ip_list" in business(emulator, first) and "ip_list" in business(emulator, second)
    time.sleep(0.6)
    assert business(emulator, first)["errcode"] == 42001
    assert "ip_list" in business(emulator, second)
    assert business(emulator, "made-up")["errcode"] == 40001
    assert emulator.stats()["rejected"] == 2


def test_stable_token_is_the_same_until_the_last_window(emulator: Emulator) -> None:
    """stable_token: same token outside the window, the next one inside it, both valid."""
    s = emulator.state.settings
    s.token_ttl, s.stable_window = 3, 1
    a = stable(emulator)
    assert stable(emulator)["access_token"] == a["access_token"]
    assert stable(emulator)["expires_in"] <= 3
    time.sleep(2.2)  # into the token's last second: its final window
    b = stable(emulator)
    assert b["access_token"] != a["access_token"] and b["expires_in"] == 3
    assert "ip_list" in business(emulator, a["access_token"])
    assert stable(emulator)["access_token"] == b["access_token"]


def test_stable_force_refresh_is_spaced_and_limited(emulator: Emulator) -> None:
    """force_refresh: 45011 within force_spacing, 45009 past force_per_day."""
    s = emulator.state.settings
    s.force_spacing, s.force_per_day = 0.3, 2
    first = stable(emulator, force=True)["access_token"]
    assert stable(emulator, force=True)["errcode"] == 45011
    time.sleep(0.35)
    assert stable(emulator, force=True)["access_token"] != first
    time.sleep(0.35)
    assert stable(emulator, force=True)["errcode"] == 45009


def test_wecom_returns_the_same_token_while_valid(emulator: Emulator) -> None:
    """WeCom gettoken: one token per (corpid, secret), repeated while valid."""
    url = f"{emulator.url}/cgi-bin/gettoken"
    a = requests.get(url, params={"corpid": CORPID, "corpsecret": CORPSECRET}, timeout=5).json()
    b = requests.get(url, params={"corpid": CORPID, "corpsecret": CORPSECRET}, timeout=5).json()
    assert a["errcode"] == 0 and a["access_token"] == b["access_token"]
    bad = requests.get(url, params={"corpid": CORPID, "corpsecret": "nope"}, timeout=5).json()
    assert bad["errcode"] == 40001


def test_daily_quota_and_errcodes(emulator: Emulator) -> None:
    """Quota exhaustion answers 45009; wrong secret 40001; bad grant_type 40002; no appid 41002."""
    emulator.state.settings.daily_quota = 2
    assert token(emulator, secret="wrong")["errcode"] == 40001
    assert "access_token" in token(emulator)
    assert token(emulator)["errcode"] == 45009
    assert token(emulator, grant_type="x")["errcode"] == 40002
    assert token(emulator, appid="")["errcode"] == 41002
    assert emulator.calls(APPID) == 2


def test_faults_through_the_control_endpoint(emulator: Emulator) -> None:
    """Faults set over HTTP apply to that many calls, then the API works again."""
    requests.post(f"{emulator.url}/_emu/faults", json={"mode": "busy", "count": 2}, timeout=5)
    assert token(emulator)["errcode"] == -1
    assert token(emulator)["errcode"] == -1
    assert "access_token" in token(emulator)
    resp = requests.get(f"{emulator.url}/_emu/stats", timeout=5).json()
    assert resp["calls"][APPID]["token"] == 3 and resp["issued"][APPID] == 1


def test_runs_as_a_command_and_prints_its_url() -> None:
    """`python -m wxtoken.emulator` serves on 127.0.0.1 and prints its URL first."""
    proc = subprocess.Popen([sys.executable, "-m", "wxtoken.emulator", "--app", "wxabc:sec",
                             "--token-ttl", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        body = requests.get(f"{url}/cgi-bin/token", timeout=5, params={
            "grant_type": "client_credential", "appid": "wxabc", "secret": "sec"}).json()
        assert body["expires_in"] == 60
    finally:
        proc.terminate()
        proc.wait(10)


def test_faults_can_target_one_endpoint(emulator: Emulator) -> None:
    """A fault with `api` hits only that endpoint: here getticket, not the token call."""
    emulator.add_fault("errcode:40001", api="ticket_jsapi")
    tok = token(emulator)["access_token"]
    ticket = requests.get(f"{emulator.url}/cgi-bin/ticket/getticket", timeout=5,
                          params={"access_token": tok, "type": "jsapi"}).json()
    assert ticket["errcode"] == 40001
    assert "access_token" in token(emulator)


def test_drip_answers_one_byte_at_a_time(emulator: Emulator) -> None:
    """"drip" sends a valid answer slowly: each read gets a byte well within its timeout."""
    s = emulator.state.settings
    s.drip_interval, s.hang_seconds = 0.05, 30
    emulator.add_fault("drip", count=1)
    started = time.monotonic()
    body = requests.get(f"{emulator.url}/cgi-bin/token", timeout=(2, 1), params={
        "grant_type": "client_credential", "appid": APPID, "secret": SECRET}).json()
    assert time.monotonic() - started > 3  # ~100 bytes x 50 ms, never a read timeout of 1 s
    assert body["expires_in"] == 7200


def test_redirect_fault_answers_307_with_its_location(emulator: Emulator) -> None:
    """"redirect" answers 307 with the given Location (and the client decides what to do)."""
    emulator.add_fault("redirect", count=1, location="http://127.0.0.1:9/elsewhere")
    resp = requests.post(f"{emulator.url}/cgi-bin/stable_token", timeout=5, json={
        "grant_type": "client_credential", "appid": APPID, "secret": SECRET},
        allow_redirects=False)
    assert resp.status_code == 307 and resp.headers["Location"] == "http://127.0.0.1:9/elsewhere"


def test_the_clock_can_be_driven_by_a_test() -> None:
    """With an injected clock, expiry follows that clock, not the wall clock."""
    now = [1_800_000_000.0]
    with Emulator({APPID: SECRET}, clock=lambda: now[0], token_ttl=100) as emu:
        tok = token(emu)["access_token"]
        assert emu.token_status(tok) == 0
        now[0] += 101
        assert emu.token_status(tok) == 42001


def post(emu: Emulator, path: str, body: dict[str, Any] | None = None,
         **params: str) -> dict[str, Any]:
    answer: dict[str, Any] = requests.post(f"{emu.url}{path}", params=params, json=body or {},
                                           timeout=5).json()
    return answer


def test_quota_get_counts_token_calls_and_knows_business_paths(emulator: Emulator) -> None:
    """openapi/quota/get: the token endpoint's daily_limit/used/remain; a business path has
    its own count; an unknown path is 76021; a bad token 40001."""
    emulator.state.settings.daily_quota = 50
    tok = token(emulator)["access_token"]
    token(emulator)
    got = post(emulator, "/cgi-bin/openapi/quota/get", {"cgi_path": "/cgi-bin/token"},
               access_token=tok)
    assert got["errcode"] == 0 and got["quota"] == {"daily_limit": 50, "used": 2, "remain": 48}
    business(emulator, tok)
    got = post(emulator, "/cgi-bin/openapi/quota/get",
               {"cgi_path": "/cgi-bin/get_api_domain_ip"}, access_token=tok)
    assert got["quota"]["used"] == 1 and got["quota"]["daily_limit"] == 10_000
    bad = post(emulator, "/cgi-bin/openapi/quota/get", {"cgi_path": "/cgi-bin/nope"},
               access_token=tok)
    assert bad["errcode"] == 76021
    assert post(emulator, "/cgi-bin/openapi/quota/get", {"cgi_path": "/cgi-bin/token"},
                access_token="made-up")["errcode"] == 40001


def test_clear_quota_v1_and_v2_share_ten_resets_a_month(emulator: Emulator) -> None:
    """clear_quota/v2 (appid + appsecret, no token) and clear_quota (token) empty the daily
    counts and share one count: the 11th reset of the month is 48006."""
    emulator.state.settings.daily_quota = 3
    tok = token(emulator)["access_token"]
    token(emulator)
    token(emulator)
    assert token(emulator)["errcode"] == 45009
    assert post(emulator, "/cgi-bin/clear_quota/v2", appid=APPID, appsecret=SECRET) == {
        "errcode": 0, "errmsg": "ok"}
    assert "access_token" in token(emulator)
    assert post(emulator, "/cgi-bin/clear_quota/v2", appid=APPID,
                appsecret="wrong")["errcode"] == 40125
    assert post(emulator, "/cgi-bin/clear_quota/v2", {"appid": APPID, "appsecret": SECRET}
                )["errcode"] == 0  # the newer pages put them in the body
    for _ in range(4):
        assert post(emulator, "/cgi-bin/clear_quota", {"appid": APPID},
                    access_token=tok)["errcode"] == 0
    for _ in range(4):
        assert post(emulator, "/cgi-bin/clear_quota/v2", appid=APPID,
                    appsecret=SECRET)["errcode"] == 0
    refused = post(emulator, "/cgi-bin/clear_quota/v2", appid=APPID, appsecret=SECRET)
    assert refused["errcode"] == 48006
    assert refused["errmsg"].startswith("forbid to clear quota because of reaching the limit")
    assert post(emulator, "/cgi-bin/clear_quota", {"appid": APPID},
                access_token=tok)["errcode"] == 48006


def test_errors_carry_a_rid_that_rid_get_looks_up_for_the_same_account(
        emulator: Emulator) -> None:
    """Every error's errmsg ends in "rid: <id>"; rid/get returns the call for that account's
    token, 76003 for another account's, 76002 for a malformed rid, 76001 for an unknown one."""
    emulator.state.apps["wxother0000000000"] = "other-secret"
    tok = token(emulator)["access_token"]
    failed = token(emulator, secret="wrong-secret")
    assert failed["errcode"] == 40001
    rid = failed["errmsg"].rsplit("rid: ", 1)[1]
    got = post(emulator, "/cgi-bin/openapi/rid/get", {"rid": rid}, access_token=tok)
    assert got["errcode"] == 0
    request = got["request"]
    assert "appid=" + APPID in request["request_url"]
    assert json.loads(request["response_body"])["errcode"] == 40001
    assert request["invoke_time"] <= time.time() and request["client_ip"] == "127.0.0.1"
    other = token(emulator, appid="wxother0000000000", secret="other-secret")["access_token"]
    assert post(emulator, "/cgi-bin/openapi/rid/get", {"rid": rid},
                access_token=other)["errcode"] == 76003
    assert post(emulator, "/cgi-bin/openapi/rid/get", {"rid": "nope"},
                access_token=tok)["errcode"] == 76002
    assert post(emulator, "/cgi-bin/openapi/rid/get", {"rid": "00000000-00000000-00000000"},
                access_token=tok)["errcode"] == 76001
