#!/usr/bin/env bash
# Install the Debian packages the embedded servers and the tests run:
# a distribution registry, htpasswd, PostgreSQL, skopeo, mkfs.ext4, CA roots,
# and what App VMs boot with: QEMU, a static busybox, cpio and xz.
# Idempotent: when everything is installed it does nothing and needs no network.
set -euo pipefail

PACKAGES=(
    docker-registry
    apache2-utils
    postgresql
    skopeo
    e2fsprogs
    ca-certificates
    qemu-system-x86
    busybox-static
    cpio
    xz-utils
)

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
for package in "${PACKAGES[@]}"; do
    installed "$package" || missing+=("$package")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "need root or sudo to install: ${missing[*]}" >&2
    exit 1
fi

echo "system packages: installing ${missing[*]}"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
