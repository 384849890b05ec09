#!/usr/bin/env bash
# Installs what `pyvmm kernel config|build` needs, idempotently: Debian's
# kernel source tarball and the tools a tinyconfig-based x86_64 bzImage build
# runs. Packages already installed are skipped; nothing is done when all are.
#
# Why each package (checked against a build of linux-source-6.1 here):
#   linux-source-6.1  /usr/src/linux-source-6.1.tar.xz, unpacked by pyvmm
#   xz-utils          unpacks the tarball
#   gcc make          compiler and make (build-essential is more than needed)
#   libc6-dev         host programs the build compiles (fixdep, kconfig, relocs)
#   flex bison        the kconfig parser and dtc/genksyms lexers
#   bc                kernel/time/timeconst.bc
#   lz4               compresses the bzImage payload (CONFIG_KERNEL_LZ4)
#   libelf-dev        objtool, which every x86_64 build runs (HAVE_STATIC_CALL_INLINE
#                     and HAVE_UACCESS_VALIDATION select OBJTOOL unconditionally)
# Not needed for the fitted config: libssl-dev (module signing and trusted
# keys are off), cpio (kheaders are off), build-essential (g++, dpkg-dev).
set -euo pipefail

KERNEL_SOURCE_PACKAGE="${PYVMM_KERNEL_SOURCE_PACKAGE:-linux-source-6.1}"
PACKAGES=("$KERNEL_SOURCE_PACKAGE" xz-utils gcc make libc6-dev flex bison bc lz4 libelf-dev)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} == 0)); then
    echo "install-kernel-build-deps: all present"
    exit 0
fi
echo "install-kernel-build-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-kernel-build-deps: done"
