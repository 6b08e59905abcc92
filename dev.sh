#!/usr/bin/env bash
# The two commands of the README, each installing what it needs into ./.venv:
#   ./dev.sh demo   emulator + daemon on a temporary state dir (no WeChat account needed)
#   ./dev.sh test   ruff, mypy and the whole test suite
#   ./dev.sh bench  the benchmarks (not part of the tests; prints a table)
set -euo pipefail
cd "$(dirname "$0")"

need_python() {
    local py=${PYTHON:-python3}
    if ! "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
        echo "dev.sh: wxtoken needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install python3-venv
    fi
    echo "$py"
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "dev.sh: please install: ${missing[*]}" >&2
        return 1
    fi
    echo "dev.sh: installing ${missing[*]}" >&2
    # a package such as redis-server would start a service of its own (on port 6379): the
    # tests start their own servers, so nothing may start here (policy-rc.d, exit 101)
    local policy=/usr/sbin/policy-rc.d added=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    [ -z "$added" ] || rm -f "$policy"
}

venv() {  # venv EXTRAS: create .venv and install the project (again when pyproject changes)
    local extras=$1 stamp=.venv/.installed-$1
    if [ ! -x .venv/bin/python ]; then
        "$(need_python)" -m venv .venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        # pip's output is shown only when it fails: a first run shows the demo, not pip
        local log=.venv/pip.log
        if ! { .venv/bin/python -m pip install -q --upgrade pip &&
               .venv/bin/python -m pip install -q -e ".[$extras]"; } >"$log" 2>&1; then
            cat "$log" >&2
            echo "dev.sh: pip install failed (see above)" >&2
            exit 1
        fi
        touch "$stamp"
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
demo)
    venv redis
    exec .venv/bin/wxtoken demo "$@"
    ;;
test)
    # the systemd tests boot a throwaway container (they skip, saying why, when not root);
    # libfaketime steps a daemon's wall clock; the fleet tests start their own redis-server;
    # the package test builds a .deb (python3-venv, binutils' strip) and runs lintian on it
    [ "$(id -u)" != 0 ] || apt_install systemd-container faketime redis-server python3-venv \
        binutils lintian
    venv test,redis
    .venv/bin/ruff check daemon tests bench
    .venv/bin/mypy
    exec .venv/bin/pytest -n 2 --dist loadfile "$@"
    ;;
bench)
    # not part of the test suite: prints figures (README "Performance")
    [ "$(id -u)" != 0 ] || apt_install redis-server || true
    venv test,redis
    exec .venv/bin/python bench/run.py "$@"
    ;;
*)
    echo "usage: ./dev.sh demo [--duration S] | ./dev.sh test [pytest args] | ./dev.sh bench" >&2
    exit 2
    ;;
esac
