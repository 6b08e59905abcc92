"""check-config on an installed system (no $CREDENTIALS_DIRECTORY): as root each
secret_credential is read from the unit's LoadCredential=NAME:PATH (`systemctl cat`: the unit
and its drop-ins) and checked; what cannot be resolved is a warning naming why, not a failure;
the service's User= must be able to read every secret_file. `run` still needs systemd's
directory. The unit text is the shipped unit's own; a fake `systemctl` first on PATH prints it
(a real process)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from wxtoken.credentials import Credential, parse_unit

from helpers import APPID, APPID2, NOBODY, SECRET, run_cli, stdlib_reader_copy

REPO = Path(__file__).resolve().parent.parent
UNIT_FILE = REPO / "deploy" / "systemd" / "wxtoken.service"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="only root reads the unit's credentials")


def systemctl_cat(*dropins: str) -> str:
    """What `systemctl cat wxtoken.service` prints: the unit, then each drop-in, each after a
    comment naming its file."""
    out = f"# /etc/systemd/system/wxtoken.service\n{UNIT_FILE.read_text()}"
    for i, text in enumerate(dropins):
        out += f"\n# /etc/systemd/system/wxtoken.service.d/{i}-local.conf\n{text}"
    return out


def fake_systemctl(tmp_path: Path, output: str | None,
                   fail: str = "No files found for wxtoken.service.") -> dict[str, str]:
    """An environment without $CREDENTIALS_DIRECTORY whose PATH starts with a `systemctl` that
    answers `systemctl cat wxtoken.service` with ``output`` (None: fails saying ``fail``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    if output is None:
        script.write_text(f"#!/bin/sh\necho '{fail}' >&2\nexit 1\n")
    else:
        (tmp_path / "unit.txt").write_text(output)
        script.write_text('#!/bin/sh\n[ "$*" = "cat wxtoken.service" ] || '
                          '{ echo "unexpected: $*" >&2; exit 2; }\n'
                          f'exec cat "{tmp_path / "unit.txt"}"\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def config_file(directory: Path, body: str) -> Path:
    path = directory / "config.toml"
    path.write_text(body)
    path.chmod(0o640)  # the installed layout (root:wxtoken 0640): no inline secret in it
    return path


def check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli("check-config", "--config", str(config), env=env)


CREDENTIAL_APP = f'[apps.main]\nappid = "{APPID}"\nsecret_credential = "main"\n'


# --- the unit's text ----------------------------------------------------------------------------

def test_the_shipped_unit_loads_no_credential_and_runs_as_wxtoken() -> None:
    """The shipped unit alone: its LoadCredential= example is a comment; User=wxtoken."""
    unit = parse_unit(systemctl_cat())
    assert unit.user == "wxtoken" and unit.group == "wxtoken" and not unit.dynamic_user
    assert unit.credential("main") is None


def test_drop_ins_add_override_and_reset_credentials() -> None:
    """LoadCredential= lines from the drop-ins in order: a later one for the same name wins, an
    empty assignment forgets the earlier ones, specifiers of a system unit's directories are
    resolved, other sections are ignored."""
    unit = parse_unit(systemctl_cat(
        "[Service]\nLoadCredential=main:/etc/old/main.secret\nLoadCredential=gone:/etc/gone\n",
        "[Service]\nLoadCredential=\nLoadCredential=main:/etc/wxtoken/main.secret\n"
        "LoadCredential=mini:%E/wxtoken/mini.secret\n"
        "[Install]\nLoadCredential=other:/etc/other\n"))
    assert unit.credential("main") == Credential(path="/etc/wxtoken/main.secret")
    assert unit.credential("mini") == Credential(path="/etc/wxtoken/mini.secret")
    assert unit.credential("gone") is None and unit.credential("other") is None


@pytest.mark.parametrize(("line", "why"), [
    ("LoadCredentialEncrypted=main:/etc/wxtoken/main.cred",
     "wxtoken.service decrypts it at start (LoadCredentialEncrypted=)"),
    ("ImportCredential=ma*", "wxtoken.service imports it from the system's credentials "
     "(ImportCredential=ma*)"),
    ("SetCredential=main:value-in-the-unit", "its value is written in wxtoken.service "
     "(SetCredential=)"),
    ("LoadCredential=main", "LoadCredential=main names no absolute path (systemd looks for it "
     "in its credential stores)"),
    ("LoadCredential=main:main.secret", "LoadCredential=main:main.secret names no absolute path "
     "(systemd looks for it in its credential stores)"),
    ("LoadCredential=main:%d/main", "LoadCredential=main:%d/main uses a specifier check-config "
     "does not resolve"),
], ids=["encrypted", "imported", "set", "no path", "relative", "specifier"])
def test_credentials_systemd_resolves_only_at_start(line: str, why: str) -> None:
    """What only systemd can resolve (at start) is named with why."""
    unit = parse_unit(systemctl_cat(f"[Service]\n{line}\n"))
    assert unit.credential("main") == Credential(unchecked=why)


def test_user_settings() -> None:
    """User= (the last one; empty: root), Group=, SupplementaryGroups= (a continued line
    joined) and DynamicUser=."""
    unit = parse_unit(systemctl_cat("[Service]\nUser=\nSupplementaryGroups=adm\n"
                                    "SupplementaryGroups=audio \\\n# a comment\n  video\n"
                                    "DynamicUser=yes\n"))
    assert unit.user is None and unit.supplementary == ("adm", "audio", "video")
    assert unit.dynamic_user
    assert parse_unit("[Service]\nUser=nobody\n").user == "nobody"


# --- check-config as root with the unit ---------------------------------------------------------

@needs_root
def test_check_config_as_root_reads_the_units_credentials(tmp_path: Path) -> None:
    """No $CREDENTIALS_DIRECTORY, as root: each credential is read from the unit's
    LoadCredential= path, a drop-in's included; `run` still requires systemd's directory."""
    main = tmp_path / "main.secret"
    main.write_text(SECRET + "\n")
    main.chmod(0o600)
    password = tmp_path / "redis.password"
    password.write_text("redis-s3cr3t-0123\n")
    password.chmod(0o400)
    env = fake_systemctl(tmp_path, systemctl_cat(f"[Service]\nLoadCredential=main:{main}\n",
                                                 f"[Service]\nLoadCredential=redis:{password}\n"))
    config = config_file(tmp_path, '[redis]\nurl = "redis://127.0.0.1:1/0"\n'
                         'password_credential = "redis"\n' + CREDENTIAL_APP)
    result = check(config, env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (f'secret = "***"  # from secret_credential=main (LoadCredential=main:{main})\n'
            in result.stdout)
    assert 'password = "***"  # from password_credential=redis (LoadCredential=redis:' \
        in result.stdout
    run = run_cli("run", "--config", str(config), env=env)
    assert run.returncode == 78
    assert run.stderr.strip().endswith("apps.main.secret_credential: $CREDENTIALS_DIRECTORY is "
                                       "not set (use LoadCredential= in the systemd unit)")


@needs_root
@pytest.mark.parametrize("case", ["missing", "empty", "others can read", "a directory",
                                  "not in the unit"])
def test_a_units_credential_that_would_fail_the_service_is_refused(tmp_path: Path,
                                                                   case: str) -> None:
    """What would stop the service at start (or leave it without its secret) is exit 78, one
    line naming the key and the file."""
    source = tmp_path / "main.secret"
    expected = {
        "missing": f"cannot read '{source}' (LoadCredential=main): No such file or directory",
        "empty": f"the secret is empty ({source}, LoadCredential=main)",
        "others can read": f"{source} is readable by others than its owner (mode 0644); make it "
                           "readable by its owner only (chmod 0600; systemd reads it as root)",
        "a directory": f"cannot read '{source}' (LoadCredential=main): Is a directory",
        "not in the unit": "wxtoken.service has no LoadCredential=main:PATH (add one: "
                           "systemctl edit wxtoken)",
    }[case]
    if case == "empty":
        source.write_text("\n")
        source.chmod(0o600)
    elif case == "others can read":
        source.write_text(SECRET)
        source.chmod(0o644)
    elif case == "a directory":
        source.mkdir()
    dropin = "" if case == "not in the unit" else f"[Service]\nLoadCredential=main:{source}\n"
    config = config_file(tmp_path, CREDENTIAL_APP)
    result = check(config, fake_systemctl(tmp_path, systemctl_cat(dropin)))
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip() == f"wxtoken: {config}: apps.main.secret_credential: {expected}"
    assert result.stdout == ""


UNCHECKED = [
    ("encrypted", "[Service]\nLoadCredentialEncrypted=main:/etc/wxtoken/main.cred\n",
     "wxtoken.service decrypts it at start (LoadCredentialEncrypted=)"),
    ("imported", "[Service]\nImportCredential=main\n",
     "wxtoken.service imports it from the system's credentials (ImportCredential=main)"),
    ("set", "[Service]\nSetCredential=main:s3cr3t-in-the-unit\n",
     "its value is written in wxtoken.service (SetCredential=)"),
    ("relative", "[Service]\nLoadCredential=main:main.secret\n",
     "LoadCredential=main:main.secret names no absolute path (systemd looks for it in its "
     "credential stores)"),
    ("no unit", None, "`systemctl cat wxtoken.service` failed: No files found for "
     "wxtoken.service."),
]


@needs_root
@pytest.mark.parametrize(("name", "dropin", "why"), UNCHECKED, ids=[u[0] for u in UNCHECKED])
def test_a_credential_only_systemd_can_resolve_is_a_warning(tmp_path: Path, name: str,
                                                            dropin: str | None, why: str) -> None:
    """Encrypted, imported, set in the unit, a relative path, no unit: the secret is unknown
    here; check-config says so on stderr and exits 0."""
    config = config_file(tmp_path, CREDENTIAL_APP)
    env = fake_systemctl(tmp_path, None if dropin is None else systemctl_cat(dropin))
    result = check(config, env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (f"wxtoken: warning: {config}: apps.main.secret_credential: "
                                     f"credential 'main' not checked: {why}")
    assert 'secret = "***"  # from secret_credential=main (not checked)' in result.stdout


@needs_root
def test_without_systemctl_a_credential_is_a_warning(tmp_path: Path) -> None:
    """No systemctl at all (a container, another init): a warning, exit 0."""
    config = config_file(tmp_path, CREDENTIAL_APP)
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env["PATH"] = str(tmp_path / "empty")
    result = check(config, env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (f"wxtoken: warning: {config}: apps.main.secret_credential: "
                                     "credential 'main' not checked: systemctl is not installed")


def test_not_as_root_a_credential_is_a_warning(tmp_path: Path, sock_dir: Path) -> None:
    """Another user than root cannot read the unit's credential files: a warning, exit 0 (run
    as nobody, with the system Python and a copy of the package)."""
    if not ROOT:
        pytest.skip("needs root to become nobody")
    lib = stdlib_reader_copy(sock_dir / "lib")
    config = sock_dir / "config.toml"
    config.write_text(CREDENTIAL_APP)
    config.chmod(0o644)
    result = subprocess.run(["/usr/bin/python3", "-m", "wxtoken", "check-config", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            user=NOBODY, group=NOBODY, extra_groups=[],
                            env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"wxtoken: warning: {config}: apps.main.secret_credential: credential 'main' not "
        "checked: only root can read the unit's credentials (run check-config as root)")


# --- the service's user and secret_file ---------------------------------------------------------

@needs_root
def test_a_secret_file_the_services_user_cannot_read_is_refused(tmp_path: Path,
                                                                sock_dir: Path) -> None:
    """A root-owned 0600 secret_file passes the owner-only rule, but the service's User= cannot
    read it: exit 78 naming the file and the user. The same file owned by that user passes; in
    a directory the user cannot enter, it is refused again."""
    secret = sock_dir / "mini.secret"
    secret.write_text("mini-s3cr3t-0123\n")
    secret.chmod(0o600)
    env = fake_systemctl(tmp_path, systemctl_cat("[Service]\nUser=nobody\nGroup=nogroup\n"))
    config = config_file(tmp_path, f'[apps.mini]\nappid = "{APPID2}"\n'
                         f'secret_file = "{secret}"\n')
    result = check(config, env)
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip() == (
        f"wxtoken: {config}: apps.mini.secret_file: the service's user nobody cannot read "
        f"{secret} (owner root, mode 0600): make nobody its owner (chown nobody {secret}), or "
        "use secret_credential")
    os.chown(secret, NOBODY, -1)
    ok = check(config, env)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    hidden = tmp_path / "mini.secret"  # pytest's directories are root's, 0700
    hidden.write_text("mini-s3cr3t-0123\n")
    hidden.chmod(0o600)
    os.chown(hidden, NOBODY, -1)
    config.write_text(f'[apps.mini]\nappid = "{APPID2}"\nsecret_file = "{hidden}"\n')
    refused = check(config, env)
    assert refused.returncode == 78
    assert f"the service's user nobody cannot read {hidden} (owner nobody, mode 0600)" \
        in refused.stderr


@needs_root
@pytest.mark.parametrize(("dropin", "why"), [
    ("[Service]\nDynamicUser=yes\n", "DynamicUser=yes (a user allotted at start)"),
    ("[Service]\nUser=wxt-no-such-user\n", "the service's user wxt-no-such-user does not exist"),
], ids=["dynamic", "no such user"])
def test_a_user_that_cannot_be_checked_is_a_warning(tmp_path: Path, dropin: str,
                                                    why: str) -> None:
    """A user check-config cannot become: a warning naming why, exit 0."""
    secret = tmp_path / "main.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    config = config_file(tmp_path, f'[apps.main]\nappid = "{APPID}"\nsecret_file = "{secret}"\n')
    result = check(config, fake_systemctl(tmp_path, systemctl_cat(dropin)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"wxtoken: warning: {config}: apps.main.secret_file: not checked whether the service "
        f"can read {secret}: {why}")


@needs_root
def test_a_unit_running_as_root_reads_any_secret_file(tmp_path: Path) -> None:
    """A unit without User= runs as root: a root-owned 0600 secret_file is fine."""
    secret = tmp_path / "main.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    config = config_file(tmp_path, f'[apps.main]\nappid = "{APPID}"\nsecret_file = "{secret}"\n')
    result = check(config, fake_systemctl(tmp_path, "[Service]\nExecStart=/usr/bin/wxtoken run\n"))
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_root
def test_a_secret_env_the_unit_sets_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    """check-config outside the service (an upgrade's check) does not see the unit's
    Environment=: a secret_env it cannot read here is "not checked" (exit 0), not refused; the
    daemon itself still requires it."""
    config = config_file(tmp_path, f'[apps.main]\nappid = "{APPID}"\n'
                                   'secret_env = "WXT_MAIN_SECRET"\n')
    env = fake_systemctl(tmp_path, systemctl_cat("[Service]\nEnvironment=WXT_MAIN_SECRET=x\n"))
    env.pop("WXT_MAIN_SECRET", None)
    result = check(config, env)
    assert result.returncode == 0, result.stderr
    assert "apps.main.secret_env: environment variable WXT_MAIN_SECRET not checked" \
        in result.stderr
    assert run_cli("run", "--config", str(config), env=env).returncode == 78
