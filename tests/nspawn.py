"""A throwaway systemd container for tests: overlay of / on a tmpfs, booted by systemd-nspawn.

Never boot systemd on the live root filesystem (its tmpfiles service would empty /tmp). Here the
container writes only to a tmpfs upper layer inside a private mount namespace, so everything it
wrote vanishes when it stops. It shares the host's network, so services inside reach an emulator
on the host's 127.0.0.1. It boots only to basic.target: the host image's own services
(databases, timers, gettys) have no business starting in it, and may fight over the shared network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

BOOT_SCRIPT = """\
set -e
mount -t tmpfs -o mode=0755 tmpfs "$1"
mkdir -p "$1/upper" "$1/work" "$1/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/root"
exec systemd-nspawn --directory="$1/root" --boot --register=no --keep-unit --resolv-conf=off \
    --timezone=off --link-journal=no --console=pipe --bind-ro="$2":/src -- systemd.unit=basic.target
"""


def cannot_boot_reason() -> str | None:
    """Why a container cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (CI runs as root)"
    for tool in ("systemd-nspawn", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package systemd-container / util-linux)"
    if not os.path.exists("/lib/systemd/systemd"):
        return "systemd is not installed"
    return None


class Container:
    """A booted container; ``run()`` executes a command inside it as root."""

    def __init__(self, base: Path, src: Path, log: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", BOOT_SCRIPT, "boot",
             str(base), str(src)], stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.leader = self._find_leader(timeout=60)
            self._wait_booted(timeout=120)
        except BaseException:
            self.stop()
            raise

    def _find_leader(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("systemd-nspawn exited: " + self.log.read_text()[-2000:])
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if comm == "systemd" and ppid == self.proc.pid:
                    return int(entry)
            time.sleep(0.1)
        raise RuntimeError("container init did not appear")

    def _wait_booted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"container did not finish booting (state {state!r})")

    def run(self, *cmd: str, check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *cmd],
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    def sh(self, script: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}',
                 input=text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM to systemd-nspawn itself (never its init): it powers the container off
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
