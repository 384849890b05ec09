"""`pyvmm guest disk OUT`: the parser and handler (pyvmm/guest/disk_image.py does the work)."""

from __future__ import annotations

import argparse

from ..guest.disk_image import DEFAULT_CMDLINE, DEFAULT_SIZE, DEFAULT_TIMEOUT_S, FORMATS


def add_guest_disk_parser(guest_sub) -> None:
    p = guest_sub.add_parser(
        "disk", help="write a bootable disk: MBR, SYSLINUX, ext4 root with busybox",
        description="Write a bootable PC disk offline (no mount, no loop device): an MBR, a FAT boot "
                    "partition with SYSLINUX (serial menu, short timeout), the kernel and an initramfs, "
                    "and an ext4 root (mke2fs -d) with the kernel, its modules, busybox and an init.")
    p.add_argument("output", metavar="OUT", help="the image file to write")
    p.add_argument("--format", "-f", default="qcow2", choices=FORMATS, help="image format (default qcow2)")
    p.add_argument("--size", default=DEFAULT_SIZE, help=f"disk size, e.g. 96M, 1G (default {DEFAULT_SIZE})")
    p.add_argument("--kernel", help="kernel to install (default: the newest /boot/vmlinuz-*-cloud-amd64); "
                                    "its modules come from /lib/modules/<release>")
    p.add_argument("--cmdline", default=DEFAULT_CMDLINE,
                   help=f"the kernel command line the boot loader passes (default {DEFAULT_CMDLINE!r})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds the boot menu waits (default {DEFAULT_TIMEOUT_S:g})")


def cmd_guest_disk(args: argparse.Namespace) -> int:
    from ..guest.disk_image import make_boot_disk
    layout = make_boot_disk(args.output, args.format, args.size, args.kernel, args.cmdline, args.timeout)
    print(f"pyvmm: bootable disk written to {layout.path} ({layout.fmt}, {layout.size >> 20} MiB; "
          f"kernel {layout.kernel}; command line {layout.cmdline!r})")
    return 0
