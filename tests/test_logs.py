"""Logging: journald's <N> lines (when its socket is not there), JSON, console, secrets scrubbed.
The journal's native protocol is tested in test_journal.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from wxtoken import logs


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logs._secrets.clear()


def test_journal_lines_carry_syslog_priorities_and_no_timestamp(tmp_path: Path) -> None:
    """When journald's socket cannot take an entry, each line goes to the stream (which
    journald reads too) starting with <N> for its level, logfmt after it, no time."""
    out = io.StringIO()
    logs.configure("journal", stream=out, journal_socket=str(tmp_path / "no-journald"))
    log = logs.get_logger(app="main")
    log.info("token.refreshed", expires_in=7200)
    log.warning("refresh.failed", errcode=-1)
    log.error("refresh.failed", errcode=40164, errmsg="invalid ip 1.2.3.4, not in whitelist")
    lines = out.getvalue().splitlines()
    assert lines[0] == "<6>event=token.refreshed app=main expires_in=7200"
    assert lines[1] == "<4>event=refresh.failed app=main errcode=-1"
    assert lines[2].startswith("<3>event=refresh.failed app=main errcode=40164 errmsg=")
    assert "timestamp" not in out.getvalue()


def test_json_lines_have_stable_keys() -> None:
    """log_format = json: one JSON object per line with event, level and timestamp."""
    out = io.StringIO()
    logs.configure("json", stream=out)
    logs.get_logger(app="main", appid="wx1").info("token.refreshed", took_ms=3)
    data = json.loads(out.getvalue())
    assert data["event"] == "token.refreshed" and data["level"] == "info"
    assert data["app"] == "main" and data["took_ms"] == 3 and "timestamp" in data


def test_registered_secrets_are_scrubbed_from_every_value() -> None:
    """A secret that slips into a log value (also inside a list or a dict) is replaced before
    rendering; the values keep their types."""
    out = io.StringIO()
    logs.configure("json", stream=out)
    logs.register_secrets(["very-s3cr3t-value"])
    logs.get_logger().error("oops", error="call with secret=very-s3cr3t-value failed",
                            apps=["main", "very-s3cr3t-value"],
                            answer={"errcode": 0, "nested": ["x very-s3cr3t-value"]})
    assert "s3cr3t" not in out.getvalue()
    data = json.loads(out.getvalue())
    assert data["error"] == "call with secret=*** failed"
    assert data["apps"] == ["main", "***"]
    assert data["answer"] == {"errcode": 0, "nested": ["x ***"]}


def test_mask_keeps_only_a_short_prefix() -> None:
    """Tokens appear in logs only as a 6-character prefix."""
    assert logs.mask("78_abcdefghijklmnop") == "78_abc…"
    assert logs.mask("") == ""


def test_auto_format_detects_the_journal_stream(tmp_path: Path) -> None:
    """auto picks journal when stderr is the stream named by $JOURNAL_STREAM, else console
    (here journald's socket is missing, so the entry lands on the stream as a <N> line)."""
    err = tmp_path / "err.log"
    code = ("import sys; from wxtoken import logs; "
            f"print(logs.configure('auto', journal_socket={str(tmp_path / 'none')!r})); "
            "logs.get_logger().error('boom')")
    with open(err, "w") as fh:
        st = os.fstat(fh.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        out = subprocess.run([sys.executable, "-c", code], stderr=fh, stdout=subprocess.PIPE,
                             text=True, env=env, check=True).stdout
    assert out.strip() == "journal"
    assert err.read_text() == "<3>event=boom\n"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.strip() == "console"
