"""check-config on an installed system: what the systemd unit hands the daemon.

``run`` reads a ``secret_credential`` from ``$CREDENTIALS_DIRECTORY``, which systemd fills at
start from the unit's ``LoadCredential=NAME:PATH`` lines. ``check-config`` run by hand has no
such directory: as root it takes each path from the unit (``systemctl cat``: the unit and its
drop-ins) and reads the file itself, and it checks that the unit's ``User=`` can read every
``secret_file``. What cannot be resolved outside the service is said, with why, instead of
failing. ``run`` never uses this module. Standard library only.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import re
import shlex
import subprocess
from dataclasses import dataclass

UNIT = "wxtoken.service"
SHIPPED_USER = "wxtoken"  # the shipped unit's User=, assumed when the unit cannot be read
# the specifiers a system unit's credential paths may use for its standard directories
SPECIFIERS = {"%%": "%", "%E": "/etc", "%S": "/var/lib", "%C": "/var/cache", "%L": "/var/log",
              "%t": "/run"}
TRUE = ("1", "yes", "true", "on")


class UnitUnknown(Exception):
    """The unit's text could not be had (why, as one line)."""


@dataclass(frozen=True)
class Credential:
    """Where systemd takes a credential from at start: an absolute ``path`` it reads, or why it
    cannot be checked beforehand (``unchecked``)."""

    path: str = ""
    unchecked: str = ""


@dataclass(frozen=True)
class Unit:
    """The settings of the unit's ``[Service]`` section that check-config needs."""

    loaded: tuple[tuple[str, str, bool], ...] = ()  # (name, source, encrypted), in order
    set_names: frozenset[str] = frozenset()  # SetCredential[Encrypted]=
    imports: tuple[str, ...] = ()  # ImportCredential= globs
    user: str | None = None  # None: root
    group: str | None = None
    supplementary: tuple[str, ...] = ()
    dynamic_user: bool = False
    environment: frozenset[str] = frozenset()  # the names Environment= sets
    environment_files: tuple[str, ...] = ()  # EnvironmentFile= (they may set any name)

    def sets_env(self, name: str) -> str | None:
        """How the unit hands the daemon the environment variable ``name`` (None: it does
        not)."""
        if name in self.environment:
            return "Environment="
        if self.environment_files:
            return f"EnvironmentFile={self.environment_files[-1]}"
        return None

    def credential(self, name: str) -> Credential | None:
        """Where the credential ``name`` comes from (None: the unit gives none of that name).
        As systemd: LoadCredential[Encrypted]= first, then ImportCredential=, then
        SetCredential= (a default for when the others find nothing)."""
        found = [(source, encrypted) for n, source, encrypted in self.loaded if n == name]
        if found:
            source, encrypted = found[-1]  # the last assignment wins
            if encrypted:
                return Credential(unchecked=f"{UNIT} decrypts it at start "
                                            "(LoadCredentialEncrypted=)")
            if any(spec not in SPECIFIERS for spec in re.findall(r"%.?", source)):
                return Credential(unchecked=f"LoadCredential={name}:{source} uses a specifier "
                                            "check-config does not resolve")
            path = re.sub(r"%.", lambda m: SPECIFIERS[m.group()], source)
            if not os.path.isabs(path):
                return Credential(unchecked=f"LoadCredential={name}"
                                            + (f":{source}" if source != name else "")
                                            + " names no absolute path (systemd looks for it "
                                            "in its credential stores)")
            return Credential(path=path)
        for pattern in self.imports:
            if fnmatch.fnmatchcase(name, pattern):
                return Credential(unchecked=f"{UNIT} imports it from the system's credentials "
                                            f"(ImportCredential={pattern})")
        if name in self.set_names:
            return Credential(unchecked=f"its value is written in {UNIT} (SetCredential=)")
        return None


def _logical_lines(text: str) -> list[str]:
    """The unit's lines as systemd reads them: comments dropped, continuations joined."""
    lines: list[str] = []
    pending: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line[:1] in ("#", ";") or (not line and pending is None):
            continue
        if line.endswith("\\"):
            pending = (pending or "") + line[:-1] + " "
            continue
        lines.append((pending or "") + line)
        pending = None
    if pending is not None:
        lines.append(pending)
    return lines


def parse_unit(text: str) -> Unit:
    """The ``[Service]`` settings of a unit and its drop-ins, as ``systemctl cat`` prints them
    (in order: a later assignment overrides, an empty one resets a list)."""
    loaded: list[tuple[str, str, bool]] = []
    set_names: set[str] = set()
    imports: list[str] = []
    user = group = None
    supplementary: list[str] = []
    dynamic = False
    environment: set[str] = set()
    environment_files: list[str] = []
    section = ""
    for line in _logical_lines(text):
        if line.startswith("["):
            section = line
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if section != "[Service]" or not sep:
            continue
        if key in ("LoadCredential", "LoadCredentialEncrypted"):
            if not value:
                loaded.clear()
            else:
                name, _, source = value.partition(":")
                loaded.append((name, source or name, key.endswith("Encrypted")))
        elif key in ("SetCredential", "SetCredentialEncrypted"):
            if not value:
                set_names.clear()
            else:
                set_names.add(value.partition(":")[0])
        elif key == "ImportCredential":
            imports = [*imports, value] if value else []
        elif key == "User":
            user = value or None
        elif key == "Group":
            group = value or None
        elif key == "SupplementaryGroups":
            supplementary = supplementary + value.split() if value else []
        elif key == "DynamicUser":
            dynamic = value.lower() in TRUE
        elif key == "Environment":
            if not value:
                environment.clear()
            else:
                try:
                    words = shlex.split(value)
                except ValueError:
                    words = value.split()
                environment.update(w.partition("=")[0] for w in words if "=" in w)
        elif key == "EnvironmentFile":
            environment_files = [*environment_files, value] if value else []
    return Unit(loaded=tuple(loaded), set_names=frozenset(set_names), imports=tuple(imports),
                user=user, group=group, supplementary=tuple(supplementary), dynamic_user=dynamic,
                environment=frozenset(environment), environment_files=tuple(environment_files))


def systemctl_cat(unit: str = UNIT) -> str:
    """The unit and its drop-ins, from ``systemctl cat`` (UnitUnknown when it fails)."""
    try:
        result = subprocess.run(["systemctl", "cat", unit], capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UnitUnknown("systemctl is not installed") from None
    except subprocess.TimeoutExpired:
        raise UnitUnknown("`systemctl cat` did not answer within 30 s") from None
    except OSError as exc:
        raise UnitUnknown(f"cannot run systemctl: {exc.strerror}") from None
    if result.returncode != 0:
        said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise UnitUnknown(f"`systemctl cat {unit}` failed: "
                          + (said[0] if said else f"exit status {result.returncode}"))
    return result.stdout


def can_read_as(path: str, uid: int, gid: int, groups: list[int]) -> bool:
    """Whether a process of that user and those groups can open ``path`` (the kernel decides:
    modes, ACLs and every directory on the way). Root only: a child process drops to them."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


class Service:
    """The installed service as check-config sees it from outside: the unit is read once, and
    only when needed."""

    def __init__(self, root: bool | None = None) -> None:
        self.root = os.geteuid() == 0 if root is None else root
        self._unit: Unit | None = None
        self._why = ""

    def unit(self) -> Unit:
        if self._unit is None and not self._why:
            try:
                self._unit = parse_unit(systemctl_cat())
            except UnitUnknown as exc:
                self._why = str(exc)
        if self._unit is None:
            raise UnitUnknown(self._why)
        return self._unit

    def env_source(self, name: str) -> str | None:
        """How the installed unit hands the daemon the environment variable ``name`` (None:
        it does not, or there is no unit to read)."""
        try:
            return self.unit().sets_env(name)
        except UnitUnknown:
            return None

    def credential(self, name: str) -> Credential | None:
        """Where the unit loads credential ``name`` from (None: it loads none of that name)."""
        if not self.root:
            return Credential(unchecked="only root can read the unit's credentials (run "
                                        "check-config as root)")
        try:
            return self.unit().credential(name)
        except UnitUnknown as exc:
            return Credential(unchecked=str(exc))

    def reader_problem(self, path: str, st: os.stat_result, kind: str) -> tuple[str, str]:
        """(problem, "") when the service's user cannot read ``path`` (whose stat is ``st``);
        ("", why) when that cannot be checked; ("", "") when it can read it, or only root could
        tell."""
        if not self.root:
            return "", ""
        try:
            unit: Unit | None = self.unit()
        except UnitUnknown:
            unit = None  # not installed under systemd here, or not readable: the shipped user
        if unit is not None and unit.dynamic_user:
            return "", "DynamicUser=yes (a user allotted at start)"
        user = unit.user if unit is not None else SHIPPED_USER
        if user is None:
            return "", ""  # no User=: the service runs as root
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:  # no unit and no wxtoken user: not an installed system
            return "", ("" if unit is None else f"the service's user {user} does not exist")
        named = [*([unit.group] if unit and unit.group else []),
                 *(unit.supplementary if unit else ())]
        gids = []
        for name in named:
            try:
                gids.append(int(name) if name.isdigit() else grp.getgrnam(name).gr_gid)
            except KeyError:
                return "", f"the service's group {name} does not exist"
        gid = gids[0] if unit and unit.group else entry.pw_gid
        groups = os.getgrouplist(entry.pw_name, gid) + gids
        if entry.pw_uid == 0 or can_read_as(path, entry.pw_uid, gid, groups):
            return "", ""
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        return (f"the service's user {user} cannot read {path} (owner {owner}, mode "
                f"{st.st_mode & 0o7777:04o}): make {user} its owner (chown {user} {path}), or "
                f"use {kind}_credential"), ""

