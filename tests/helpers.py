"""Test helpers shared by every module: the test credentials, config files, real daemon
processes, the real CLI, and the leak check every output goes through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

APPID = "wx1111111111111111"
SECRET = "s3cr3t-main-0123456789abcdef"
APPID2 = "wx2222222222222222"
SECRET2 = "s3cr3t-mini-0123456789abcdef"
CORPID = "ww3333333333333333"
CORPSECRET = "s3cr3t-corp-0123456789abcdef"
TEST_SECRETS = (SECRET, SECRET2, CORPSECRET)
# Every secret any test uses contains this marker; every output the suite collects from wxtoken
# (daemon logs, CLI stdout/stderr, container journals) is checked for it.
LEAK_MARKER = "s3cr3t"


def assert_no_secret(text: str, where: str) -> None:
    """Fail when a test secret appears in output wxtoken produced."""
    if LEAK_MARKER in text:
        line = next(line for line in text.splitlines() if LEAK_MARKER in line)
        raise AssertionError(f"a secret leaked into {where}: {line[:300]}")


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and string lists are valid TOML values


def write_config(path: Path, top: dict[str, Any], apps: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML config file (values are simple: str, int, float, bool, list of str)."""
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, table in apps.items():
        lines.append(f"\n[apps.{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class DaemonProcess:
    """A real `wxtoken run` process whose JSON log lines are collected from stderr."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wxtoken", "run", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "unparsed", "line": line})
        return out

    def wait_for(self, event: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.get("event") == event]
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} (x{count}) within {timeout}s; log:\n"
                             + self.log_path.read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
            assert_no_secret(self.log_path.read_text(), f"the daemon log {self.log_path}")


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the real `wxtoken` command line (its output is checked for leaked secrets)."""
    result = subprocess.run([sys.executable, "-m", "wxtoken", *args], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert_no_secret(result.stdout + result.stderr, f"the output of wxtoken {' '.join(args)}")
    return result


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def socket_of(config: Path) -> str:
    """The control socket a test config names."""
    return str(tomllib.loads(config.read_text())["control_socket"])


def curl(sock: str, *args: str, user: int | None = None,
         groups: list[int] | None = None) -> subprocess.CompletedProcess[str]:
    """curl over the control socket, optionally as another user with extra groups."""
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--unix-socket", sock, *args],
                          capture_output=True, text=True, timeout=30, user=user,
                          extra_groups=groups, group=user)
