"""`wxtoken run` (its checks of the state dir and the files' groups) and `wxtoken demo`."""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import tempfile

from wxtoken.config import Config, load_config
from wxtoken.errors import ConfigError, StoreError

EX_CONFIG = 78  # sysexits.h's EX_CONFIG: a bad config


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from wxtoken import logs  # the daemon's modules load only when the daemon runs
    logs.configure(config.log_format)
    logs.register_secrets(app.secret for app in config.apps)
    log = logs.get_logger()
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)
    _check_state_dir(config, args.allow_other_owner)
    _check_file_groups(config)
    from wxtoken.serve import run  # the scheduler and the HTTP client: only for `run`
    return run(config)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_state_dir(config: Config, allow_other_owner: bool) -> None:
    """The state dir exists (created if need be), is a directory, is writable, and belongs to
    this user: the daemon owns it. A run as another user (root by hand, say) would leave files
    the service cannot read."""
    state_dir = config.state_dir
    try:
        created = not os.path.lexists(state_dir)
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        if created:  # makedirs' mode is masked by the umask (077 by hand or in a container)
            os.chmod(state_dir, 0o750)  # noqa: S103 - the readers' group traverses it
        st = os.stat(state_dir)
    except FileExistsError:
        raise ConfigError([f"{config.path}: state_dir: {state_dir} is not a directory"]) from None
    except OSError as exc:
        raise StoreError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError([f"{config.path}: state_dir: {state_dir} is not a directory"])
    if st.st_uid != os.geteuid() and not allow_other_owner:
        raise ConfigError([f"{config.path}: state_dir: {state_dir} belongs to user "
                           f"{_user(st.st_uid)}, not {_user(os.geteuid())}: run wxtoken as that "
                           "user (systemctl start wxtoken), or pass --allow-other-owner"])
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(f"state_dir {state_dir} is not writable by this user")


def _check_file_groups(config: Config) -> None:
    """Every file_group is one this process can give files to, tried for real on a scratch
    file: under the shipped unit (PrivateUsers=yes) no group but the daemon's is mapped, and a
    daemon that cannot chown would fail every write."""
    problems = []
    tried: dict[str, str | None] = {}
    for app in config.apps:
        if app.file_group is None:
            continue
        if app.file_group not in tried:
            tried[app.file_group] = _chown_problem(config.state_dir, app.file_group)
        if (problem := tried[app.file_group]) is not None:
            problems.append(f"{config.path}: apps.{app.name}.file_group: {problem}")
    if problems:
        raise ConfigError(problems)


def _chown_problem(state_dir: str, group: str) -> str | None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"group {group!r} does not exist"
    with tempfile.TemporaryFile(dir=state_dir) as probe:
        try:
            os.fchown(probe.fileno(), -1, gid)
        except OSError as exc:
            return (f"the daemon cannot give files to group {group!r} ({exc.strerror}): the "
                    "daemon's user is not in that group, or the service runs with "
                    "PrivateUsers=yes, which maps no other group; leave file_group unset and "
                    "add the readers to the daemon's group")
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from wxtoken.demo import run_demo  # the emulator and the daemon: only for the demo
    return run_demo(args.duration)
