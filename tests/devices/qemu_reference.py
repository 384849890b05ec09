"""QEMU TCG as the reference for what a Linux guest sees of its virtio
devices: the same kernel, initramfs and disks boot under
qemu-system-x86_64 -accel tcg (seconds), and the guest's view of the PCI
bus and its disks is compared with the view a pyvmm guest reports.

The view is what `lspci -n` would show of the virtio functions (vendor,
device and class from sysfs; slots are left out, since each VMM orders
its devices its own way), each disk's size in sectors, and a listing of
files on a mounted disk when one is asked for."""

from __future__ import annotations

import re
import shutil
import subprocess

from ..guest_session import GuestSession
from ..hostfacts import missing_from_setup

VIRTIO_VENDOR = "0x1af4"
BOOT_TIMEOUT = 600

# One shell line: prints the view between markers; ash arithmetic keeps the
# echoed command itself from matching the end marker.
VIEW_COMMAND = ("echo VIEW-$((1+1))-BEGIN; for d in /sys/bus/pci/devices/*; do "
                "echo \"PCI $(cat $d/vendor) $(cat $d/device) $(cat $d/class)\"; done; "
                "for b in /sys/block/vd*; do echo \"BLOCK ${b##*/} $(cat $b/size)\"; done; "
                "echo VIEW-$((1+1))-END\n")


class QemuSession(GuestSession):
    """GuestSession's expect/send over a qemu-system-x86_64 process."""

    def __init__(self, argv: list[str]):
        super().__init__(argv=argv)


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        missing_from_setup("qemu-system-x86_64 (qemu-system-x86)")
    return qemu


def qemu_argv(kernel: str, initrd: str, cmdline: str, drives: list[tuple[str, str]], *,
              rng: bool = False, console: bool = False) -> list[str]:
    """QEMU TCG on a pc machine with nothing but COM1 on stdio and the given
    modern-only (virtio 1.x, like pyvmm's) virtio functions; `drives` are
    (path, format) pairs, read-only snapshots so that the reference boot
    never changes the test's images."""
    argv = [qemu_binary(), "-accel", "tcg", "-m", "256M", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    for i, (path, fmt) in enumerate(drives):
        argv += ["-drive", f"file={path},format={fmt},if=none,id=d{i},snapshot=on",
                 "-device", f"virtio-blk-pci,drive=d{i},disable-legacy=on"]
    if rng:
        argv += ["-device", "virtio-rng-pci,disable-legacy=on"]
    if console:
        argv += ["-device", "virtio-serial-pci,disable-legacy=on"]
    return argv


def guest_view(session: GuestSession, timeout: float = 600) -> dict:
    """The view of a booted guest at its shell prompt:
    {"pci": sorted [(vendor, device, class)] of virtio functions, "blocks": {name: sectors}}."""
    sent = session.send(VIEW_COMMAND)
    m = session.expect(r"(?s)VIEW-2-BEGIN\r?\n(.*?)VIEW-2-END", timeout=timeout, after=sent)
    pci, blocks = [], {}
    for line in m.group(1).splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0] == "PCI" and fields[1] == VIRTIO_VENDOR:
            pci.append(tuple(fields[1:]))
        elif len(fields) == 3 and fields[0] == "BLOCK":
            blocks[fields[1]] = int(fields[2])
    return {"pci": sorted(pci), "blocks": blocks}


def boot_reference(argv: list[str], ready: str = "PYVMM-INIT-READY", extra: str | None = None) -> dict:
    """Boots QEMU, returns guest_view() plus, with `extra` (a shell command),
    its output as view["extra"]; powers the guest off.  Fails the test
    when QEMU's guest does not boot."""
    with QemuSession(argv) as q:
        q.expect(ready, timeout=BOOT_TIMEOUT)
        view = guest_view(q)
        if extra is not None:
            sent = q.send(f"echo EXTRA-$((2+2))-BEGIN; {extra}; echo EXTRA-$((2+2))-END\n")
            m = q.expect(r"(?s)EXTRA-4-BEGIN\r?\n(.*?)EXTRA-4-END", timeout=BOOT_TIMEOUT, after=sent)
            view["extra"] = re.sub(r"\r", "", m.group(1))
        q.send("poweroff -f\n")
        try:
            q.wait(timeout=60)
        except subprocess.TimeoutExpired:
            q.kill()
    return view


__all__ = ["QemuSession", "qemu_argv", "guest_view", "boot_reference"]
