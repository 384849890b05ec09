#!/bin/sh
# Downloads Debian's open-vm-tools (apt-get download, cached under
# ~/.cache/pyvmm/packages/), takes vmware-rpctool with the libraries and
# loader it needs, and writes pyvmm's busybox initramfs with them appended.
# Prints the initrd's path.  Usage: scripts/fetch-open-vm-tools.sh [OUT]
# Then: pyvmm run --engine bt --initrd PATH --vmware-backdoor --guestinfo color=blue
set -e
cd "$(dirname "$0")/.."
exec python3 -m pyvmm.guest.extra "$@"
