"""dev.sh, the README's two commands: what it leaves behind on the machine, and the lock it
installs from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POLICY_MARK = "# dev.sh: installing test packages"


def _apt_install_with_failing_apt(tmp_path: Path, before: str | None) -> tuple[int, Path]:
    """Run dev.sh's apt_install for a package that is not installed, with an apt-get that
    fails, in a private mount namespace whose /usr/sbin is a scratch directory; return its
    exit status and that directory."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    if before is not None:
        (sbin / "policy-rc.d").write_text(before)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    (fake / "apt-get").chmod(0o755)
    func = re.search(r"^apt_install\(\) \{\n.*?^\}\n", (REPO / "dev.sh").read_text(),
                     re.S | re.M)
    assert func is not None
    script = f"set -euo pipefail\n{func.group(0)}\napt_install wxtoken-no-such-package\n"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" /usr/sbin && exec bash -c "$2"', "sh", str(sbin), script],
        env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=60)
    return proc.returncode, sbin


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("dpkg-query") is None,
                    reason="needs root, unshare and dpkg-query (a private /usr/sbin)")
def test_a_failed_apt_install_leaves_no_policy_rc_d(tmp_path: Path) -> None:
    """When apt fails, dev.sh's policy-rc.d (which forbids services to start) is removed."""
    status, sbin = _apt_install_with_failing_apt(tmp_path, None)
    assert status != 0
    assert not (sbin / "policy-rc.d").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("dpkg-query") is None,
                    reason="needs root, unshare and dpkg-query (a private /usr/sbin)")
def test_a_policy_rc_d_that_was_there_before_is_left_alone(tmp_path: Path) -> None:
    """A policy-rc.d the machine already had (a container image's) is neither used nor removed."""
    before = "#!/bin/sh\n# the image's own\nexit 101\n"
    status, sbin = _apt_install_with_failing_apt(tmp_path, before)
    assert status != 0
    assert (sbin / "policy-rc.d").read_text() == before


def _pins(lock: Path) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9._-]+)==(\S+)", lock.read_text(), re.M))


def test_the_locks_pin_every_package_with_hashes_and_agree() -> None:
    """Every package of both locks is pinned with hashes (pip and setuptools included), and the
    test lock holds the runtime lock's versions, so the .deb and the suite run the same code."""
    runtime = _pins(REPO / "requirements" / "runtime.lock")
    dev = _pins(REPO / "requirements" / "dev.lock")
    for name in ("pip", "setuptools", "apscheduler", "requests", "filelock", "structlog",
                 "redis", "cryptography"):
        assert name in runtime, name
    for name in ("mypy", "ruff", "pytest"):
        assert name in dev and name not in runtime, name
    assert {name: dev[name] for name in runtime} == runtime
    for lock in ("runtime.lock", "dev.lock"):
        entries = re.split(r"\n(?=[a-z0-9._-]+==)", (REPO / "requirements" / lock).read_text())
        for entry in entries[1:]:
            assert "--hash=sha256:" in entry, entry.splitlines()[0]

