#!/usr/bin/env bash
# The two commands of the README, each installing what it needs into ./.venv:
#   ./dev.sh demo   emulator + daemon on a temporary state dir (no WeChat account needed)
#   ./dev.sh test   ruff, mypy and the whole test suite
#   ./dev.sh bench  the benchmarks (not part of the tests; prints a table)
# Every package comes from the committed, hashed locks in requirements/ (never the newest
# release by accident):
#   ./dev.sh lock [--upgrade]   refresh the locks on purpose (--upgrade: newest in pyproject's ranges)
#   ./dev.sh test-latest        ruff, mypy and the fast tests on the newest releases inside
#                               pyproject's ranges, in ./.venv-latest (never part of CI)
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
    # tests start their own servers, so nothing may start here (policy-rc.d, exit 101). One
    # that was there before is left alone; ours goes on every exit path, or it would forbid
    # every later package from starting its service.
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        trap 'rm -f "$policy"' EXIT
        trap 'rm -f "$policy"; exit 130' INT TERM HUP
        printf '#!/bin/sh\n# dev.sh: installing test packages\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    local status=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } || status=$?
    if grep -qs '^# dev.sh: installing test packages$' "$policy"; then
        rm -f "$policy"
    fi
    trap - EXIT INT TERM HUP
    return "$status"
}

venv() {  # venv LOCK: create .venv, install the lock (hashes checked), then the project
    local lock=requirements/$1.lock stamp=.venv/.installed-$1 sum
    if [ ! -x .venv/bin/python ]; then
        "$(need_python)" -m venv .venv
    fi
    sum=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
        # pip's output is shown only when it fails: a first run shows the demo, not pip.
        # Hash mode refuses `-e .`, so the lock first, then the project without dependencies;
        # pip check catches a dependency added to pyproject.toml but not to the lock.
        local log=.venv/pip.log
        if ! { .venv/bin/python -m pip install -q --require-hashes -r "$lock" &&
               .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . &&
               .venv/bin/python -m pip check; } >"$log" 2>&1; then
            cat "$log" >&2
            echo "dev.sh: installing $lock failed (see above; after changing pyproject.toml's" \
                "dependencies, run ./dev.sh lock)" >&2
            exit 1
        fi
        echo "$sum" >"$stamp"
    fi
}

lock() {  # refresh requirements/*.lock with uv (a pinned release, in a throwaway venv)
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # $tmp is expanded now: it is local
    trap "rm -rf '$tmp'" EXIT
    "$(need_python)" -m venv "$tmp/venv"
    "$tmp/venv/bin/python" -m pip install -q uv==0.13.10 2>&1 | { grep -v 'is ignored' || true; } >&2
    # one universal lock (every platform's hashes, markers for each Python >= 3.11); the
    # test tools are held to the runtime's versions, so the .deb and the tests run the same
    local compile=("$tmp/venv/bin/uv" pip compile --quiet --universal --python-version 3.11
                   --generate-hashes --custom-compile-command "./dev.sh lock" "$@")
    "${compile[@]}" pyproject.toml requirements/tools.in -o requirements/runtime.lock
    "${compile[@]}" pyproject.toml requirements/tools.in --extra test \
        -c requirements/runtime.lock -o requirements/dev.lock
    git diff --stat -- requirements/ || true
}

cmd=${1:-}
shift || true
case "$cmd" in
demo)
    venv runtime
    exec .venv/bin/wxtoken demo "$@"
    ;;
test)
    # the systemd tests boot a throwaway container (they skip, saying why, when not root);
    # libfaketime steps a daemon's wall clock; the fleet tests start their own redis-server;
    # the package test builds a .deb (python3-venv, binutils' strip) and runs lintian on it
    [ "$(id -u)" != 0 ] || apt_install systemd-container faketime redis-server python3-venv \
        binutils lintian
    venv dev
    .venv/bin/ruff check daemon tests bench
    .venv/bin/mypy
    # whole files to each worker, the longest first (tests/conftest.py). The suite mostly
    # waits: two workers per core (about 7 minutes on 2 cores). Three per core saturate the
    # CPU, and tests bound to real time fail. WXTOKEN_TEST_WORKERS overrides.
    workers=${WXTOKEN_TEST_WORKERS:-$((2 * $(nproc)))}
    exec .venv/bin/pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
    ;;
test-latest)
    # what `pip install wxtoken` users get tomorrow: the newest releases in pyproject's ranges
    [ -x .venv-latest/bin/python ] || "$(need_python)" -m venv .venv-latest
    .venv-latest/bin/python -m pip install -q --upgrade pip
    .venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
    .venv-latest/bin/python -m pip list --format=freeze | grep -Ei \
        '^(apscheduler|requests|filelock|structlog|prometheus.client|redis|cryptography|mypy|ruff)=' >&2
    .venv-latest/bin/ruff check daemon tests bench
    .venv-latest/bin/mypy
    exec .venv-latest/bin/pytest -n 4 --dist loadfile --no-loadscope-reorder -m 'not slow' "$@"
    ;;
lock)
    lock "$@"
    ;;
bench)
    # not part of the test suite: prints figures (README "Performance")
    [ "$(id -u)" != 0 ] || apt_install redis-server || true
    venv dev
    exec .venv/bin/python bench/run.py "$@"
    ;;
*)
    echo "usage: ./dev.sh demo [--duration S] | test [pytest args] | bench | test-latest | lock [--upgrade]" >&2
    exit 2
    ;;
esac
