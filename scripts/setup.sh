#!/usr/bin/env bash
# Installs what iovirt's example VMM and its tests need on a fresh Debian 12 machine
# (run as root), and builds the shared guest image (SeaBIOS, Debian's cloud kernel,
# a busybox initramfs) into .cache/guest. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(seabios qemu-system-x86 qemu-utils cpio kmod lz4 zstd busybox-static xorriso nasm cryptsetup-bin python3-cryptography)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -x tools/guest-image/build.sh ]; then
    tools/guest-image/build.sh --cache "${IOVIRT_CACHE:-$PWD/.cache}" --out "${IOVIRT_GUEST_DIR:-$PWD/.cache/guest}"
    # Debian's 6.12 cloud kernel (virtio-iommu as a module) for the vhost-user-blk vIOMMU test.
    tools/guest-image/build.sh --cache "${IOVIRT_CACHE:-$PWD/.cache}" --out "${IOVIRT_GUEST_612_DIR:-${IOVIRT_GUEST_DIR:-$PWD/.cache/guest}-6.12}" \
        --kernel-package linux-image-6.12-cloud-amd64 --module virtio_iommu
fi
