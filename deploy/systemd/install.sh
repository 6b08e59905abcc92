#!/bin/sh
# Install wxtoken as a systemd service (Debian 12 / Ubuntu 22.04+), as root. Idempotent.
#   deploy/systemd/install.sh            install or upgrade; does not start anything
#   deploy/systemd/install.sh --now      ... and enable + (re)start the service
#   deploy/systemd/install.sh --uninstall  remove all but /var/lib/wxtoken and /etc/wxtoken
set -eu

PREFIX=/opt/wxtoken
UNIT=/etc/systemd/system/wxtoken.service
SYSUSERS=/usr/lib/sysusers.d/wxtoken.conf
LINK=/usr/local/bin/wxtoken
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
command -v systemctl >/dev/null || die "systemd is required"

# the wxtoken package (apt) and this script would shadow each other's unit and command (ours in
# /etc/systemd/system and /usr/local/bin win): one method at a time
package_state() { dpkg-query -W -f='${Status}' wxtoken 2>/dev/null || true; }
owned_by_package() { dpkg-query -S "$1" >/dev/null 2>&1; }

case "${1:-}" in
--uninstall)
    # only what this script installed: never the package's files
    if grep -qs '^# Installed by deploy/systemd/install.sh' "$UNIT"; then
        systemctl disable --now wxtoken.service 2>/dev/null || true
        rm -f "$UNIT"
    fi
    [ "$(readlink "$LINK" 2>/dev/null)" != "$PREFIX/bin/wxtoken" ] || rm -f "$LINK"
    owned_by_package "$SYSUSERS" || rm -f "$SYSUSERS"
    rm -rf "$PREFIX"
    systemctl daemon-reload
    say "removed; kept /var/lib/wxtoken, /etc/wxtoken and the wxtoken user"
    exit 0 ;;
--now|"") ;;
*) die "usage: install.sh [--now | --uninstall]" ;;
esac

case "$(package_state)" in
*" config-files")
    # removed, not purged: /etc/wxtoken/config.toml is still its conffile, which a later
    # `apt purge` (or autoremove --purge) would delete under this script's service
    die "the wxtoken package was removed but not purged: a later purge would delete" \
        "/etc/wxtoken/config.toml. Back it up, run: apt purge wxtoken, put it back, then run" \
        "install.sh again" ;;
*" not-installed"|"") ;;
*)
    die "the wxtoken package is installed (apt): this script's unit and command would shadow" \
        "its own. Upgrade the package instead, or remove it first with: apt purge wxtoken" \
        "(back up /etc/wxtoken/config.toml first; /var/lib/wxtoken stays)" ;;
esac

# The service must not depend on anything under /root or /home (ProtectHome=yes hides them):
# the venv is made with the system's Python.
PY=/usr/bin/python3
[ -x "$PY" ] || die "$PY is missing (apt-get install python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than 3.11"
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    say "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

[ -x "$PREFIX/bin/python" ] || "$PY" -m venv "$PREFIX"
# build from a copy: the checkout may be read-only and must not collect build artefacts
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/daemon" "$SRC/requirements" "$build/"
# pip's own status decides (a pipe into a filter would hide it); its output is shown on failure.
# The dependencies at requirements/runtime.lock's versions and hashes, then the project alone.
if ! { "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
           -r "$build/requirements/runtime.lock" &&
       "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
           --no-build-isolation --upgrade --force-reinstall "$build" &&
       "$PREFIX/bin/python" -m pip check; } >"$build/pip.log" 2>&1; then
    cat "$build/pip.log" >&2
    die "pip install failed (see above); the unit, user and config were not touched"
fi
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
ln -sf "$PREFIX/bin/wxtoken" "$LINK"

install -D -m 0644 "$HERE/wxtoken.sysusers" "$SYSUSERS"
systemd-sysusers "$SYSUSERS"
install -d -m 0750 -o root -g wxtoken /etc/wxtoken
# the daemon (group wxtoken) reads the config, nobody else. An existing config keeps the owner
# and mode the operator chose (a wxtoken-owned 0600 config may hold an inline secret), unless
# the daemon could not read it: then it becomes root:wxtoken 0640, and the script says so
if [ ! -e /etc/wxtoken/config.toml ]; then
    install -m 0640 -o root -g wxtoken "$SRC/config.example.toml" /etc/wxtoken/config.toml
    say "wrote /etc/wxtoken/config.toml from the example: edit it, then: systemctl restart wxtoken"
elif ! runuser -u wxtoken -- test -r /etc/wxtoken/config.toml; then
    chown root:wxtoken /etc/wxtoken/config.toml
    chmod 0640 /etc/wxtoken/config.toml
    say "made /etc/wxtoken/config.toml readable by the daemon (root:wxtoken 0640)"
fi
install -m 0644 "$HERE/wxtoken.service" "$UNIT"
systemctl daemon-reload

if [ "${1:-}" = --now ]; then
    systemctl enable --quiet wxtoken.service
    # the new version checks the config first (like nginx's upgrade): a refused one would
    # leave the service down (exit 78 is not retried); a running one goes on as it was
    if ! out=$("$PREFIX/bin/wxtoken" check-config --config /etc/wxtoken/config.toml 2>&1 \
               >/dev/null); then
        why=$(echo "$out" | grep -v '^wxtoken: warning: ' | head -n 1 | sed 's/^wxtoken: //')
        if systemctl --quiet is-active wxtoken.service; then
            say "installed, not restarted: the new version refuses the config: $why"
            say "the service goes on with the version it runs; fix /etc/wxtoken/config.toml" \
                "(wxtoken check-config), then: systemctl restart wxtoken"
        else
            say "installed, not started: $why"
            say "fix /etc/wxtoken/config.toml (wxtoken check-config), then: systemctl start wxtoken"
        fi
        exit 0
    fi
    systemctl restart wxtoken.service
    say "started: systemctl status wxtoken; journalctl -u wxtoken"
else
    say "installed; start with: systemctl enable --now wxtoken"
fi
