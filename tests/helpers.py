"""Test helpers shared by every module: the test credentials, config files, real daemon
processes, the real CLI, and the leak check every output goes through."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from wxtoken.emulator import Emulator
from wxtoken.record import TokenRecord, load_record, token_path

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


def write_config(path: Path, top: dict[str, Any], apps: dict[str, dict[str, Any]],
                 redis: dict[str, Any] | None = None) -> Path:
    """Write a TOML config file (values are simple: str, int, float, bool, list of str)."""
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    if redis is not None:
        lines.append("\n[redis]")
        lines += [f"{key} = {toml_value(value)}" for key, value in redis.items()]
    for name, table in apps.items():
        lines.append(f"\n[apps.{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class DaemonProcess:
    """A real `wxtoken run` process whose JSON log lines are collected from stderr."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, args: list[str] | None = None) -> None:
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "wxtoken", "run", "--config", str(config),
             *(args or [])],
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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `wxtoken` command line (its output is checked for leaked secrets)."""
    result = subprocess.run([sys.executable, "-m", "wxtoken", *args], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})},
                            input=stdin)
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


NOBODY = 65534


def raw_request(sock_path: str, data: bytes, timeout: float = 5.0,
                close_write: bool = False) -> bytes:
    """Send raw bytes over a Unix socket and return what comes back before EOF or ``timeout``
    (b"" when nothing came): for requests no well-behaved client would send."""
    import socket
    out = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def status_line(answer: bytes) -> str:
    """The status line of a raw HTTP answer ("" when there was none)."""
    return answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else ""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS: line")


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def wait_until(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``check()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(interval)


def stdlib_reader_copy(dest: Path) -> Path:
    """A copy of the wxtoken package that any user can import (the readers' modules are
    standard-library only; the repository may sit under a private home directory)."""
    import shutil
    pkg = Path(__file__).resolve().parent.parent / "daemon" / "wxtoken"
    target = dest / "wxtoken"
    shutil.copytree(pkg, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def run_as(user: int, groups: list[int], code: str, pythonpath: Path,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as another user (the system Python, which every user can run)."""
    return subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                          timeout=timeout, user=user, group=user, extra_groups=groups,
                          env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"})


def stored(state_dir: Path | str, app: str = "main") -> TokenRecord:
    """The record in ``<state_dir>/<app>.json``, read with the contract's one loader."""
    return load_record(token_path(str(state_dir), app), app)[0]


def pids_talking_to(port: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` have a TCP connection open to 127.0.0.1:``port`` right now (read from
    /proc: the socket inodes of each process against the kernel's connection table)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    talking = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        talking.append(pid)
                        break
    return talking


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus text file's samples, parsed with prometheus_client's parser:
    (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made here) for the test's length: a disk to
    fill up for real (root only: the test is skipped otherwise)."""
    if os.geteuid() != 0:
        print("SKIP: mounting a tmpfs needs root (CI runs as root)")
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system ``directory`` is on, to ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def state_of(config: Path) -> Path:
    """A fleet host's state dir (the ``hosts`` fixture puts it beside the config)."""
    return config.parent / "state"


def token_of(config: Path, app: str = "main") -> str | None:
    """The token in a host's file (None while it has none yet)."""
    try:
        return str(read_json(state_of(config) / f"{app}.json")["access_token"])
    except FileNotFoundError:
        return None


def emulator_port(emulator: Emulator) -> int:
    return int(emulator.url.rsplit(":", 1)[1])


def iso(stamp: str) -> float:
    """A log line's timestamp as epoch seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
