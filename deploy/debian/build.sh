#!/bin/sh
# Build wxtoken_<version>_<arch>.deb from this checkout (Debian 12; as root).
#   deploy/debian/build.sh [--version VERSION] [--out DIR]      (default: pyproject's, ./dist)
#
# The package holds a venv made with Debian's /usr/bin/python3 at its final path,
# /usr/lib/wxtoken (a venv cannot be moved: its scripts name their interpreter). It is built
# there inside a private mount namespace, over an overlay of /usr/lib on a tmpfs, so nothing on
# this machine changes. pip fetches the dependencies from the package index, at the versions
# and hashes of requirements/runtime.lock: a .deb built twice from one commit holds the same code.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
PY=/usr/bin/python3
VERSION=""
OUT="$SRC/dist"

die() { echo "build.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
    --version) VERSION=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) die "usage: build.sh [--version VERSION] [--out DIR]" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "run as root (the venv is built at /usr/lib/wxtoken in a private mount namespace)"
for tool in dpkg-deb unshare strip "$PY"; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
"$PY" -c 'import ensurepip, venv' 2>/dev/null || die "python3-venv is missing (apt-get install python3-venv)"
[ -n "$VERSION" ] || VERSION=$("$PY" -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$SRC/pyproject.toml")
ARCH=$(dpkg --print-architecture)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYNEXT=$("$PY" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root/DEBIAN" "$work/src" "$work/mnt"
# build from a copy: the checkout may be read-only and must not collect build artefacts
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/daemon" "$SRC/requirements" "$work/src/"

# the venv at its final path, copied out before the namespace (and its tmpfs) goes away
unshare --mount --propagation private sh -eu -c '
    work=$1 PY=$2 root=$3
    mount -t tmpfs -o mode=0755 tmpfs "$work/mnt"
    mkdir "$work/mnt/upper" "$work/mnt/work"
    mount -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$work/mnt/upper,workdir=$work/mnt/work" /usr/lib
    rm -rf /usr/lib/wxtoken
    "$PY" -m venv /usr/lib/wxtoken
    # the lock (hash mode), then the project alone: hash mode refuses a path without a hash
    if ! { /usr/lib/wxtoken/bin/python -m pip install -q --disable-pip-version-check \
               --no-compile --require-hashes -r "$work/src/requirements/runtime.lock" &&
           /usr/lib/wxtoken/bin/python -m pip install -q --disable-pip-version-check \
               --no-compile --no-deps --no-build-isolation "$work/src" &&
           /usr/lib/wxtoken/bin/python -m pip check &&
           /usr/lib/wxtoken/bin/python -m pip uninstall -q -y pip setuptools; } \
            >"$work/pip.log" 2>&1; then
        cat "$work/pip.log" >&2
        echo "build.sh: pip install failed (see above)" >&2
        exit 1
    fi
    find /usr/lib/wxtoken -name __pycache__ -type d -prune -exec rm -rf {} +
    # only the wxtoken command: no activate scripts, nor the commands of other packages
    find /usr/lib/wxtoken/bin -type f ! -name wxtoken -delete
    # Debian policy: shared objects stripped, modules not executable, symlinks relative
    find /usr/lib/wxtoken -name "*.so" -type f -exec strip --strip-unneeded {} +
    find /usr/lib/wxtoken/lib -name "*.py" -type f -perm /111 -exec chmod a-x {} +
    ln -sfn ../../../bin/python3 /usr/lib/wxtoken/bin/python3
    /usr/lib/wxtoken/bin/python -c "import wxtoken.serve" || {
        echo "build.sh: the venv does not run" >&2; exit 1; }
    find /usr/lib/wxtoken -name __pycache__ -type d -prune -exec rm -rf {} +
    mkdir -p "$root/usr/lib"
    cp -a /usr/lib/wxtoken "$root/usr/lib/wxtoken"
' build "$work" "$PY" "$root"

install -d "$root/usr/bin"
ln -s ../lib/wxtoken/bin/wxtoken "$root/usr/bin/wxtoken"
install -d "$root/lib/systemd/system"
sed -e 's|/opt/wxtoken/bin/wxtoken|/usr/bin/wxtoken|g' \
    -e 's|^Documentation=.*|Documentation=file:///usr/share/doc/wxtoken/README.md|' \
    -e 's|^# Installed by deploy/systemd/install.sh;|# Installed by the wxtoken package;|' \
    "$SRC/deploy/systemd/wxtoken.service" >"$root/lib/systemd/system/wxtoken.service"
chmod 0644 "$root/lib/systemd/system/wxtoken.service"
install -D -m 0644 "$SRC/deploy/systemd/wxtoken.sysusers" "$root/usr/lib/sysusers.d/wxtoken.conf"
install -D -m 0644 "$HERE/wxtoken.tmpfiles" "$root/usr/lib/tmpfiles.d/wxtoken.conf"
install -D -m 0644 "$SRC/config.example.toml" "$root/etc/wxtoken/config.toml"
install -D -m 0644 "$SRC/config.example.toml" "$root/usr/share/wxtoken/config.example.toml"
install -D -m 0644 "$SRC/README.md" "$root/usr/share/doc/wxtoken/README.md"
install -D -m 0644 "$HERE/copyright" "$root/usr/share/doc/wxtoken/copyright"
install -D -m 0644 "$HERE/lintian-overrides" "$root/usr/share/lintian/overrides/wxtoken"
install -d "$root/usr/share/man/man1"
gzip -9n <"$HERE/wxtoken.1" >"$root/usr/share/man/man1/wxtoken.1.gz"
date=$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || date +%s)}")
printf 'wxtoken (%s) unstable; urgency=medium\n\n  * Built from the wxtoken repository (deploy/debian/build.sh).\n\n -- wxtoken maintainers <wxtoken@example.org>  %s\n' \
    "$VERSION" "$date" | gzip -9n >"$root/usr/share/doc/wxtoken/changelog.gz"

for script in preinst postinst prerm postrm; do
    install -m 0755 "$HERE/$script" "$root/DEBIAN/$script"
done
echo /etc/wxtoken/config.toml >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: wxtoken
Version: $VERSION
Architecture: $ARCH
Maintainer: wxtoken maintainers <wxtoken@example.org>
Installed-Size: $size
Depends: python3 (>= $PYVER), python3 (<< $PYNEXT), systemd, libc6
Section: net
Priority: optional
Description: WeChat access_token central control server
 One daemon per host keeps every configured WeChat app's access_token (and
 JS-SDK tickets) fresh and writes it atomically to /var/lib/wxtoken/<app>.json,
 which any local program reads with no network call. A hardened systemd
 service (Type=notify, watchdog) with a control socket for passive refresh,
 quota tools and Prometheus textfile metrics; a fleet mode on Redis.
CONTROL
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$OUT"
deb="$OUT/wxtoken_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
