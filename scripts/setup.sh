#!/usr/bin/env bash
# Installs what pyvmm and its tests need, idempotently: Debian packages for the
# guests (kernel, busybox, binutils), the Python package with its test extras,
# and the default guest initramfs. Safe to run again: it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(linux-image-cloud-amd64 busybox-static binutils gcc make qemu-system-x86 seabios qemu-utils cpio e2fsprogs iproute2 syslinux syslinux-common mtools acpica-tools)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c "import pyvmm, iced_x86, lz4, zstandard, mpmath, pytest, xdist, hypothesis, unicorn, qemu.qmp" 2>/dev/null \
   || [ "$(python3 -c 'import pyvmm, os; print(os.path.dirname(os.path.dirname(pyvmm.__file__)))')" != "$PWD" ]; then
    echo "setup: installing the pyvmm Python package (editable) and its test tools"
    python3 -m pip install -q --disable-pip-version-check -e '.[test]'
fi

bash scripts/install-kernel-build-deps.sh
python3 -m pyvmm guest build >/dev/null
echo "setup: ready"
