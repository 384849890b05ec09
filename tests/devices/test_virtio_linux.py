"""The stock Debian kernel under bt and hybrid finds pyvmm's PCI bus through
the DSDT, loads virtio_pci, virtio_blk and virtio-rng from the initramfs
pyvmm builds for it, sees /dev/vda of the image's size, reads back what the
host wrote, writes a sector the host then reads, and gets bytes from
/dev/hwrng, with every virtio function interrupting through MSI-X.  A
virtio-console's hvc0 and a named port, both on host Unix sockets, carry
bytes both ways, and the named port shows up by name in sysfs and as
/dev/virtio-ports/NAME.  Its
second disk is a qcow2 overlay over a raw ext4 base made with
mkfs.ext4 -d: the guest mounts it, reads the host's file and writes
its own; the writes land in the overlay only (the base is unchanged) until
`pyvmm img commit` merges them (issue 17 part 5).  The same boot is
paused and resumed twenty times over QMP while a shell loop runs, and
keeps its clock and workload (issue 15; tests/linux_pauses.py), and gets a
virtio-net NIC and a virtio-blk disk hotplugged and unplugged over QMP,
which Linux's acpiphp finds and lets go of by itself through pyvmm's ACPI
PCI hotplug (issue 19; tests/linux_hotplug.py).  A third,
read-only disk carries a static x86-64-v3 program (tests/v3program.py),
which prints in the guest what it printed on the host CPU.  A fourth, raw
ext4 disk made with mkfs.ext4 -d is shared by the module's boots: each
mounts it, finds the host's file and every file an earlier boot wrote
(so the hybrid boot is the bt boot's "boot again"), writes its own, syncs
and powers off; the host then finds the file and `e2fsck -n` is clean.
A legacy IDE disk (`--drive …,if=ide`) is found, read and written by the
stock kernel's ata_piix and sd (tests/linux_ide.py): the module's
initramfs is pyvmm's with those modules added, all unsigned.

PCI configuration goes through ECAM too: Linux takes the MCFG table's
window (reserved as a PNP0C02 motherboard resource) and so reads the host
bridge's extended config space (4096 bytes in sysfs; 256 without ECAM).

QEMU TCG boots the same kernel, initramfs and disks once per module
(tests/devices/qemu_reference.py, seconds): the virtio functions' vendor,
device and class, and every disk's size, are what the pyvmm guest sees.

A full bt boot takes many minutes of host time; PYVMM_BT_BOOT_TIMEOUT
(seconds, default 5400) bounds the wait, as in tests/test_linux_bt.py."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest

from pyvmm.storage.create import create_image

from ..guest_session import GuestSession
from ..hostfacts import require_debian_cloud_kernel, require_from_setup
from ..linux_pauses import check_pauses_keep_clock_and_workload, pause_qmp_args
from ..linux_hotplug import check_acpiphp_slots, check_blk_hotplug, check_net_hotplug
from ..linux_ide import IdeDisk, initramfs_with_ata
from ..linux_snapshot import check_snapshot_round_trip
from ..v3program import build_v3_program, check_v3_program_in_guest
from .qemu_reference import boot_reference, guest_view, qemu_argv

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
SECTORS = 16387                      # 8 MiB and 3 sectors: a size nothing else has
HOTPLUG_SECTORS = 6151               # the hotplugged disk: 3 MiB and 7 sectors
# Linux 6.1 says "... reserved in ACPI motherboard resources", later ones "... reserved as ACPI motherboard resource".
ECAM_RESERVED = r"MMCONFIG at \[mem 0xe0000000-0xe00fffff\] reserved (in|as) ACPI motherboard"


class Shared:
    """What the module's boots share: the v3 program disk, the persistent
    ext4 disk with the files earlier boots wrote, and QEMU's view."""

    def __init__(self, root):
        require_from_setup(programs=["mkfs.ext4", "debugfs", "e2fsck"], package="e2fsprogs")
        self.root = root
        self.v3 = build_v3_program(root)
        tree = root / "persist-tree"
        tree.mkdir()
        (tree / "host.txt").write_text("written on the host\n")
        self.persist = root / "persist.raw"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(self.persist), "24M"], check=True)
        self.written: dict[str, str] = {"host.txt": "written on the host"}   # file -> line, boot by boot
        self._qemu_view: dict | None = None
        # Named explicitly: both VMMs boot exactly these (pyvmm run with a
        # --drive and no --kernel would boot its BIOS from the disk).
        self.kernel = require_debian_cloud_kernel()
        # pyvmm's initramfs with ata_piix and sd_mod added, for the IDE disk.
        self.initrd = initramfs_with_ata(root, os.path.basename(self.kernel).partition("vmlinuz-")[2])

    def qemu_view(self) -> dict:
        """QEMU TCG's guest view with disks of the test's sizes (booted once)."""
        if self._qemu_view is None:
            vda, vdb = self.root / "qemu-vda.raw", self.root / "qemu-vdb.raw"
            vda.write_bytes(bytes(SECTORS * 512))
            with open(vdb, "wb") as f:
                f.truncate(16 << 20)                       # the qcow2 overlay's virtual size
            drives = [(str(vda), "raw"), (str(vdb), "raw"), (str(self.v3.disk), "raw"), (str(self.persist), "raw")]
            self._qemu_view = boot_reference(qemu_argv(self.kernel, self.initrd, CMDLINE, drives,
                                                       rng=True, console=True))
        return self._qemu_view


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return Shared(tmp_path_factory.mktemp("virtio-linux"))


def _ext4_base_and_overlay(tmp_path, marker: str) -> tuple:
    """A 16 MiB raw ext4 image holding hello.txt, and a qcow2 overlay on it."""
    require_from_setup(programs=["mkfs.ext4", "debugfs"], package="e2fsprogs")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text(f"host says {marker}\n")
    base, overlay = tmp_path / "base.raw", tmp_path / "overlay.qcow2"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(base), "16M"], check=True)
    made = _pyvmm("img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    assert made.returncode == 0, made.stderr
    return base, overlay


def _connect(path: str, g: GuestSession) -> socket.socket:
    """A client of the socket pyvmm listens on once the machine is built."""
    deadline = time.monotonic() + 300
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.settimeout(600)
            return s
        except OSError:
            s.close()
            assert time.monotonic() < deadline and g.proc.poll() is None, f"no socket at {path}: {g.errors}"
            time.sleep(0.2)


def _recv_until(s: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = s.recv(4096)
        assert chunk, f"socket closed before {marker!r} (got {got!r})"
        got += chunk
    return got


def _pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def _debugfs_cat(image, name: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True,
                          text=True, check=True).stdout


def check_persistent_disk(g, shared: Shared, engine: str) -> None:
    """Mounts /dev/vdd, finds every file written so far, adds one."""
    sent = g.send("mkdir -p /p && mount -t ext4 /dev/vdd /p && for f in /p/*.txt; do echo \"$f: $(cat $f)\"; done"
                  " && echo LISTED-$((1+2))\n")
    listing = g.expect(r"(?s)\n(/p/.*?)LISTED-3", timeout=600, after=sent).group(1)
    for name, line in shared.written.items():
        assert f"/p/{name}: {line}" in listing, f"{name} is not on the disk after a power-off: {listing!r}"
    line = f"{engine} boot {os.urandom(4).hex()}"
    sent = g.send(f"echo '{line}' > /p/{engine}.txt && umount /p && sync && echo PERSIST-OK\n")
    g.expect(r"\nPERSIST-OK\r?\n", timeout=600, after=sent)
    shared.written[f"{engine}.txt"] = line


@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_linux_uses_virtio_disks_and_rng(tmp_path, engine, shared):
    require_debian_cloud_kernel()
    qemu = shared.qemu_view()                           # the reference boots first: seconds
    disk = tmp_path / "vda.raw"
    marker = os.urandom(8).hex()
    disk.write_bytes(marker.encode() + bytes(SECTORS * 512 - len(marker)))
    base, overlay = _ext4_base_and_overlay(tmp_path, marker)
    base_before = hashlib.sha256(base.read_bytes()).hexdigest()
    hvc_path, port_path = str(tmp_path / "hvc0.sock"), str(tmp_path / "port.sock")
    v3 = shared.v3
    ide = IdeDisk(tmp_path / "ide.raw")
    with GuestSession("run", "--engine", engine, "--no-reboot", "--mem", "256M", "--append", CMDLINE,
                      "--kernel", shared.kernel, "--initrd", shared.initrd,
                      "--drive", f"file={disk},format=raw,id=disk0", "--virtio-rng",
                      "--drive", f"file={overlay},format=qcow2,id=disk1",
                      "--drive", f"file={v3.disk},format=raw,id=v3prog,readonly=on",
                      "--drive", f"file={shared.persist},format=raw,id=persist",
                      "--drive", ide.drive_arg(),
                      *pause_qmp_args(str(tmp_path / "qmp.sock")),
                      "--virtio-console", f"socket={hvc_path}",
                      "--virtio-console", f"socket={port_path},name=org.pyvmm.port0") as g:
        hvc, port = _connect(hvc_path, g), _connect(port_path, g)
        hvc.sendall(b"HOST-TO-HVC\n")             # held until the guest reads hvc0
        port.sendall(b"HOST-TO-PORT\n")           # held until the guest opens the port
        g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
        # The run state's Linux check rides on this boot (tests/linux_pauses.py).
        check_pauses_keep_clock_and_workload(g, str(tmp_path / "qmp.sock"))
        assert "init: cannot load" not in g.output
        sent = g.send("cat /sys/block/vda/size\n")
        g.expect(rf"\n{SECTORS}\r?\n", timeout=600, after=sent)
        sent = g.send("head -c 16 /dev/vda; echo\n")
        g.expect(rf"\n{marker}\r?\n", timeout=600, after=sent)
        sent = g.send("cat /sys/block/vda/serial; echo\n")
        g.expect(r"\ndisk0\r?\n", timeout=600, after=sent)
        sent = g.send("echo GUEST-WROTE-THIS > /tmp/s; dd if=/tmp/s of=/dev/vda bs=512 seek=1 conv=fsync"
                      " 2>/dev/null && echo WRITE-OK\n")
        g.expect(r"\nWRITE-OK\r?\n", timeout=600, after=sent)
        sent = g.send("head -c 64 /dev/hwrng | wc -c\n")
        g.expect(r"\n\s*64\r?\n", timeout=600, after=sent)
        # All six functions (four disks, rng, console) interrupt through MSI-X:
        # each has a config vector, which Linux only requests with MSI-X on.
        sent = g.send("grep -E 'MSI.*virtio[0-9]+-config' /proc/interrupts | wc -l\n")
        g.expect(r"\n\s*6\r?\n", timeout=600, after=sent)
        # ECAM: Linux took the MCFG window, and reads the host bridge's extended space through it.
        sent = g.send(f"dmesg | grep -cE '{ECAM_RESERVED}'\n")
        g.expect(r"\n\s*[1-9]\r?\n", timeout=600, after=sent)
        sent = g.send("wc -c < /sys/bus/pci/devices/0000:00:00.0/config\n")
        g.expect(r"\n\s*4096\r?\n", timeout=600, after=sent)
        # What QEMU TCG's guest saw of the same devices and disks.
        ours = guest_view(g)
        assert ours == qemu, f"pyvmm guest {ours} != QEMU TCG guest {qemu}"
        check_persistent_disk(g, shared, engine)
        ide.check_in_guest(g)        # the stock kernel's ata_piix and sd (issue 21; tests/linux_ide.py)
        # An x86-64-v3 program (AVX2, FMA) prints what it printed on the host CPU
        # (issue 14): under bt every ymm instruction is translated; under hybrid
        # it runs on the CPU with the kernel's XSAVE state handling under bt.
        check_v3_program_in_guest(g, v3, "/dev/vdc")
        # virtio-console: hvc0 and the named port, both directions
        sent = g.send("read -r line < /dev/hvc0; echo \"hvc:$line\"; echo GUEST-ON-$((40+2)) > /dev/hvc0\n")
        g.expect(r"\nhvc:HOST-TO-HVC\r?\n", timeout=600, after=sent)
        assert b"GUEST-ON-42" in _recv_until(hvc, b"GUEST-ON-42")
        sent = g.send("cat /sys/class/virtio-ports/vport*p1/name; readlink /dev/virtio-ports/org.pyvmm.port0\n")
        g.expect(r"\norg\.pyvmm\.port0\r?\n\.\./vport\d+p1\r?\n", timeout=600, after=sent)
        # (no glob in the redirection: ash would create a file named "vport*p1")
        sent = g.send("head -n 1 /dev/virtio-ports/org.pyvmm.port0; "
                      "echo GUEST-ON-PORT > /dev/virtio-ports/org.pyvmm.port0\n")
        g.expect(r"\nHOST-TO-PORT\r?\n", timeout=600, after=sent)
        assert _recv_until(port, b"GUEST-ON-PORT\n").endswith(b"GUEST-ON-PORT\n")
        sent = g.send("mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt && cat /mnt/hello.txt\n")
        g.expect(rf"\nhost says {marker}\r?\n", timeout=600, after=sent)
        # Saved with the qcow2 disk mounted, changed, loaded back (issue 19; tests/linux_snapshot.py).
        check_snapshot_round_trip(g, str(tmp_path / "qmp.sock"), "disk1", "/mnt")
        # ACPI PCI hotplug (tests/linux_hotplug.py): acpiphp's slots, then a
        # virtio-net NIC and a virtio-blk disk plugged and unplugged over QMP.
        check_acpiphp_slots(g)
        check_net_hotplug(g, str(tmp_path / "qmp.sock"), str(tmp_path))
        hotdisk = tmp_path / "hotplug.qcow2"
        create_image(str(hotdisk), "qcow2", HOTPLUG_SECTORS * 512)
        check_blk_hotplug(g, str(tmp_path / "qmp.sock"), str(hotdisk), HOTPLUG_SECTORS)
        sent = g.send(f"echo guest says {marker} > /mnt/guest.txt && umount /mnt && sync && echo UMOUNT-OK\n")
        g.expect(r"\nUMOUNT-OK\r?\n", timeout=600, after=sent)
        g.send("poweroff -f\n")
        assert g.wait(timeout=600) == 0
    assert disk.read_bytes()[512:512 + 17] == b"GUEST-WROTE-THIS\n"
    ide.check_after_poweroff()
    # The guest's writes went to the overlay only, and pass qemu-img's check.
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_before
    assert subprocess.run(["qemu-img", "check", "-q", str(overlay)]).returncode == 0
    committed = _pyvmm("img", "commit", str(overlay))
    assert committed.returncode == 0, committed.stderr
    assert _debugfs_cat(base, "guest.txt") == f"guest says {marker}\n"
    assert subprocess.run(["e2fsck", "-fn", str(base)], capture_output=True).returncode == 0
    # The persistent disk after power-off: this boot's file is there, the file system clean.
    assert _debugfs_cat(shared.persist, f"{engine}.txt") == shared.written[f"{engine}.txt"] + "\n"
    fsck = subprocess.run(["e2fsck", "-fn", str(shared.persist)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
