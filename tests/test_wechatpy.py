"""A real wechatpy WeChatClient fed by the daemon: it never calls the token endpoint itself."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from wechatpy.session.memorystorage import MemoryStorage

from wxtoken.emulator import Emulator
from wxtoken.reader import drop_cache, read_token
from wxtoken.record import TokenRecord
from wxtoken.store import atomic_write
from wxtoken.wechatpy_session import WeChatClient, WxtokenStorage

from helpers import APPID, SECRET, DaemonProcess


def test_wechatpy_client_uses_the_daemons_token_and_reports_refused_ones(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """Business calls go through with the file's token; a refused one is refreshed centrally."""
    config = make_config({"main": {"appid": APPID, "secret": SECRET, "tickets": ["jsapi"]}})
    state = str(config.parent / "state")
    d = daemons(config)
    d.wait_for("daemon.ready")
    drop_cache()
    sock = tomllib.loads(config.read_text())["control_socket"]
    client = WeChatClient("main", APPID, state_dir=state, control_socket=sock)
    client.API_BASE_URL = f"{emulator.url}/cgi-bin/"
    assert client.misc.get_wechat_ips() == ["127.0.0.1"]
    assert client.access_token == read_token("main", state)
    # WeChat drops the token (fetched elsewhere, say): wechatpy's retry goes through the daemon
    emulator.invalidate(read_token("main", state))
    assert client.misc.get_wechat_ips() == ["127.0.0.1"]
    assert emulator.calls(APPID, "token") == 2  # the daemon's start and its passive refresh
    assert [e["forced"] for e in d.events() if e["event"] == "token.refreshed"] == [False, True]
    # the JS-SDK ticket comes from the file too: no getticket call by wechatpy
    ticket_calls = emulator.calls(APPID, "ticket_jsapi")
    file_ticket = json.loads((config.parent / "state" / "main.json").read_text())["jsapi_ticket"]
    assert client.jsapi.get_jsapi_ticket() == file_ticket
    assert emulator.calls(APPID, "ticket_jsapi") == ticket_calls
    d.stop()


def test_storage_answers_from_the_file_and_keeps_other_keys_in_its_fallback(
        tmp_path: Path) -> None:
    """The token (and configured tickets) come from the file, whatever the fallback holds;
    set() never writes them; other keys (OAuth, tickets wxtoken does not keep) live in the
    fallback."""
    fallback = MemoryStorage()
    storage = WxtokenStorage("main", state_dir=str(tmp_path), fallback=fallback)
    storage.set("wx1_access_token", "ignored", 7200)
    assert fallback.get("wx1_access_token") is None  # set() never writes the daemon's keys
    assert storage.get("wx1_access_token", "none") == "none"  # no file yet
    now = int(time.time())
    atomic_write(str(tmp_path / "main.json"), TokenRecord(
        "main", "wx1", "file-token-0123456789", now + 7200, now,
        {"jsapi": ("file-ticket-0123", now + 7200)}).to_json(), 0o640)
    fallback.set("wx1_access_token", "stale-token-in-the-fallback", 7200)
    assert storage.get("wx1_access_token") == "file-token-0123456789"
    assert storage.get("wx1_jsapi_ticket") == "file-ticket-0123"
    assert storage.get("wx1_jsapi_ticket_expires_at") == now + 7200
    fallback.set("wx1_wx_card_ticket", "wechatpy-own-card-ticket", 7200)
    assert storage.get("wx1_wx_card_ticket") == "wechatpy-own-card-ticket"  # not in the file
    storage.set("wx1_refresh_token", "r-123", 7200)
    assert fallback.get("wx1_refresh_token") == "r-123"
    storage.delete("wx1_refresh_token")
    assert storage.get("wx1_refresh_token", "gone") == "gone"
