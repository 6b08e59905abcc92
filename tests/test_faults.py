"""Deliberate failure behaviour: hard errors, budget, hostile disks, TLS, and config fuzzing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wxtoken.config import APP_KEYS, TOP_KEYS, Config, load_config
from wxtoken.emulator import Emulator
from wxtoken.errcodes import ErrorClass
from wxtoken.errors import ConfigError, UpstreamError
from wxtoken.refresher import Refresher
from wxtoken.upstream import WeChatClient

from helpers import APPID, SECRET, DaemonProcess, fill, run_cli, small_tmpfs


@pytest.mark.parametrize(("fault", "errcode", "hint"), [
    ("ip", 40164, "whitelist"),
    ("errcode:40001", 40001, "secret is wrong"),
])
def test_hard_errors_back_off_to_a_handful_of_calls_per_scaled_hour(
        fault: str, errcode: int, hint: str, emulator: Emulator,
        make_config: Callable[..., Path], daemons: Callable[..., DaemonProcess]) -> None:
    """IP not whitelisted / wrong secret: few calls over 5 scaled hours, error lines, status 1."""
    emulator.add_fault(fault)
    config = make_config(refresh_interval=3)  # a scaled "hour" of 3 s
    d = daemons(config)
    d.wait_for("daemon.ready")
    time.sleep(15)  # five scaled hours: how many calls they cost is the point
    status = run_cli("status", "--config", str(config))
    assert d.stop() == 0
    calls = emulator.calls()  # after the stop: no attempt can fall between count and log
    failed = [e for e in d.events() if e["event"] == "refresh.failed"]
    # hard backoff from refresh_interval/6 doubling to refresh_interval (equal jitter): about
    # two calls per scaled hour; a retry loop would make thousands
    assert 3 <= calls <= 10, calls
    assert len(failed) == calls
    waits = [e["next_in"] for e in failed]
    assert min(waits) >= 1.0 and min(waits[3:]) >= 1.5, waits
    assert all(e["level"] == "error" and e["errcode"] == errcode and hint in e["error"]
               for e in failed)
    assert status.returncode == 1 and f"errcode {errcode}" in status.stdout


def test_daily_budget_stops_calls_across_a_restart(
        emulator: Emulator, make_config: Callable[..., Path],
        daemons: Callable[..., DaemonProcess]) -> None:
    """daily_budget = 3: three calls, an error line, none after a restart; status says so."""
    config = make_config(refresh_interval=0.3, daily_budget=3)
    d = daemons(config)
    d.wait_for("budget.exhausted", timeout=10)
    time.sleep(1)  # three periods of 0.3 s: a call past the budget would come within this
    assert d.stop() == 0
    assert emulator.calls() == 3
    exhausted = [e for e in d.events() if e["event"] == "budget.exhausted"]
    assert len(exhausted) == 1 and exhausted[0]["level"] == "error"
    again = daemons(config)
    again.wait_for("daemon.ready")
    time.sleep(1.5)  # a restarted daemon's calls, were it to make any, come within this
    assert again.stop() == 0
    assert emulator.calls() == 3
    status = run_cli("status", "--json", "--config", str(config))
    app = json.loads(status.stdout)["apps"][0]
    assert status.returncode == 1 and app["calls_today"] == 3
    assert "daily budget of 3 calls reached" in app["problems"]


def test_disk_full_keeps_the_old_token_and_recovers(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """With the state dir's disk full the token file is intact, errors are logged, then recovery."""
    with small_tmpfs(tmp_path / "small") as state:
        config = make_config(state_dir=str(state), refresh_interval=1)
        d = daemons(config)
        d.wait_for("daemon.ready")
        before = (state / "main.json").read_bytes()
        filler = fill(state)
        failed = d.wait_for("store.failed", timeout=10)
        assert "no space left on device" in failed["error"] and failed["level"] == "error"
        time.sleep(2)  # retries keep failing meanwhile: the file must not change
        assert (state / "main.json").read_bytes() == before
        calls = emulator.calls()
        filler.unlink()
        d.wait_for("token.refreshed", count=2, timeout=20)
        assert json.loads((state / "main.json").read_bytes())["access_token"] != \
            json.loads(before)["access_token"]
        assert calls <= 2  # no call was spent while nothing could be written
        assert d.stop() == 0
        assert [p for p in os.listdir(state) if p.endswith(".tmp")] == []


def test_a_restart_on_a_full_disk_starts_and_serves_the_valid_token(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """A restart (an upgrade's, a reboot's) while the state dir's disk is full: the daemon
    still starts and keeps the valid token (its .daemon.json is best effort, a warning), instead
    of failing until the start limit gives up."""
    with small_tmpfs(tmp_path / "small") as state:
        config = make_config(state_dir=str(state))
        first = daemons(config)
        first.wait_for("daemon.ready")
        assert first.stop() == 0
        before = (state / "main.json").read_bytes()
        fill(state)
        d = daemons(config)
        d.wait_for("daemon.ready")
        assert d.wait_for("daemon.run_info_failed")["level"] == "warning"
        assert (state / "main.json").read_bytes() == before
        assert d.stop() == 0
        assert emulator.calls() == 1


def test_read_only_state_dir_keeps_the_old_token_and_recovers(
        emulator: Emulator, make_config: Callable[..., Path], tmp_path: Path,
        daemons: Callable[..., DaemonProcess]) -> None:
    """Read-only state dir: clear error, file intact, no upstream call; rw again: recovery."""
    with small_tmpfs(tmp_path / "small", "1m") as state:
        config = make_config(state_dir=str(state), refresh_interval=1)
        d = daemons(config)
        d.wait_for("daemon.ready")
        before = (state / "main.json").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        failed = d.wait_for("store.failed", timeout=10)
        assert "read-only file system" in failed["error"]
        calls = emulator.calls()
        time.sleep(2)  # retries of the write meanwhile must not call WeChat again
        assert emulator.calls() == calls == 1
        assert (state / "main.json").read_bytes() == before
        subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        d.wait_for("token.refreshed", count=2, timeout=20)
        assert d.stop() == 0


def test_fetched_token_that_cannot_be_written_is_written_later_without_a_new_call(
        emulator: Emulator, tmp_path: Path) -> None:
    """A token fetched but not written (file blocked) is kept and written once possible."""
    squatter = tmp_path / "main.json"
    squatter.mkdir()
    (squatter / "x").write_text("blocks rmdir")
    from helpers import write_config
    config = load_config(str(write_config(tmp_path / "c.toml", {
        "state_dir": str(tmp_path), "api_base": emulator.url},
        {"main": {"appid": APPID, "secret": SECRET}})))
    client = WeChatClient(emulator.url)
    r = Refresher(config, config.apps[0], client)
    assert r.run(first=True).state == "failed"
    assert r.pending is not None and emulator.calls() == 1
    (squatter / "x").unlink()
    outcome = r.run()
    assert outcome.state == "refreshed" and r.pending is None
    assert emulator.calls() == 1
    assert json.loads(squatter.read_text())["access_token"] == outcome_token(tmp_path)
    client.close()


def outcome_token(state: Path) -> str:
    return str(json.loads((state / "main.json").read_text())["access_token"])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_ca_bundle_makes_a_private_ca_trusted_and_tls_stays_verified(
        ca: trustme.CA, tmp_path: Path) -> None:
    """HTTPS emulator with a private CA: fails clearly without ca_bundle, works with it."""
    import ssl
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    from helpers import write_config
    with Emulator({APPID: SECRET}, ssl_context=server_ctx) as emu:
        assert emu.url.startswith("https://127.0.0.1:")
        app = load_config(str(write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path)},
                                           {"main": {"appid": APPID, "secret": SECRET}}))).apps[0]
        with pytest.raises(UpstreamError) as err:
            WeChatClient(emu.url).fetch(app)
        assert err.value.kind is ErrorClass.TRANSIENT
        assert "TLS verification failed" in str(err.value) and SECRET not in str(err.value)
        fetched = WeChatClient(emu.url, ca_bundle=str(bundle)).fetch(app)
        assert emu.token_status(fetched.access_token) == 0
        # end to end: the daemon with ca_bundle in its config
        config = write_config(tmp_path / "tls.toml", {
            "state_dir": str(tmp_path), "api_base": emu.url, "ca_bundle": str(bundle),
            "log_format": "json"}, {"main": {"appid": APPID, "secret": SECRET}})
        d = DaemonProcess(config)
        try:
            d.wait_for("token.refreshed")
        finally:
            d.stop()


# -- config fuzzing ----------------------------------------------------------------------------
scalars = st.one_of(st.text(max_size=20), st.integers(-10**6, 10**6), st.booleans(),
                    st.floats(allow_nan=True, allow_infinity=True))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
app_tables = st.dictionaries(st.sampled_from([*sorted(APP_KEYS), "bogus"]), values, max_size=6)
documents = st.fixed_dictionaries({}, optional={
    **{key: values for key in sorted(TOP_KEYS - {"apps"})},
    "apps": st.one_of(values, st.dictionaries(st.text(max_size=10), app_tables, max_size=3)),
    "unknown_key": values,
})


def check_outcome(path: Path) -> None:
    try:
        config = load_config(str(path))
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line.startswith(f"{path}: ") and "\n" not in line
    else:
        assert isinstance(config, Config) and config.apps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents)
def test_any_toml_document_is_a_config_or_a_config_error(tmp_path_factory: Any,
                                                        doc: dict[str, Any]) -> None:
    """Random TOML documents over the real keys: a valid Config or ConfigError, nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    check_outcome(path)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_is_a_config_or_a_config_error(tmp_path_factory: Any, text: str) -> None:
    """Arbitrary text as the config file: a valid Config or ConfigError, nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_outcome(path)


def test_fuzzed_configs_exit_78_from_the_cli(tmp_path: Path) -> None:
    """A sample of hostile configs through the real CLI: exit 78, no traceback."""
    samples = ["apps = 5", "[apps.a]\nappid = 1\nsecret = []", "\x00", "[[apps]]\nx=1",
               'state_dir = "/\\u0000"\n[apps.a]\nappid="x"\nsecret="s3cr3t-fuzz"',
               "refresh_interval = inf\n[apps.a]\nappid='x'\nsecret='s3cr3t-fuzz'",
               "[apps.a]\nappid='x'\nsecret_file='/dev/zero'"]
    for i, text in enumerate(samples):
        path = tmp_path / f"c{i}.toml"
        path.write_text(text)
        result = run_cli("check-config", "--config", str(path))
        assert result.returncode == 78, (text, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.strip()
