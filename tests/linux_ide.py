"""What a Linux boot needs to check pyvmm's IDE disk with the stock
kernel's own driver (issue 21: a legacy disk for guests without virtio):
an initramfs that also carries ata_piix and sd_mod, and the checks that
ata_piix binds the PIIX function, finds the ATA disk on the primary
channel (IDETIM decode on, IRQ 14) and sets it to a bus-master DMA mode,
and that sd's /dev/sda reads what the host wrote (one sector, and 64 KiB in multi-sector requests) and writes a
sector the host then reads.  They ride on the virtio boots of
tests/devices/test_virtio_linux.py."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from pathlib import Path

from pyvmm.guest.initramfs import MODULES_ROOT, VIRTIO_MODULES, build_default_initramfs, module_closure

ATA_MODULES = ("ata_piix", "sd_mod")
IMAGE_BYTES = 8 << 20
SIGNATURE_MAGIC = b"~Module signature appended~\n"


def unsigned(module: bytes) -> bytes:
    """The module without its appended signature (module_signature: 12 bytes,
    sig_len big-endian last, then the magic): the kernel loads it all the
    same (no MODULE_SIG_FORCE), without hashing hundreds of KB of libata
    through the translator first."""
    if not module.endswith(SIGNATURE_MAGIC):
        return module
    sig_len = struct.unpack_from(">I", module, len(module) - len(SIGNATURE_MAGIC) - 4)[0]
    return module[:len(module) - len(SIGNATURE_MAGIC) - 12 - sig_len]


def initramfs_with_ata(workdir: Path, release: str) -> str:
    """pyvmm's initramfs for kernel `release` carrying and loading its virtio
    modules and ata_piix and sd_mod (with their dependencies), unsigned."""
    root = workdir / "modules"
    names = (*VIRTIO_MODULES, *ATA_MODULES)
    (root / release).mkdir(parents=True)
    (root / release / "modules.dep").write_bytes((Path(MODULES_ROOT) / release / "modules.dep").read_bytes())
    for rel in module_closure(release, names, MODULES_ROOT):
        (root / release / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / release / rel).write_bytes(unsigned((Path(MODULES_ROOT) / release / rel).read_bytes()))
    path = workdir / "ata-initramfs.cpio.gz"
    path.write_bytes(build_default_initramfs(release=release, modules=names, modules_root=str(root)))
    return str(path)


class IdeDisk:
    """A raw image for `--drive …,if=ide` holding a token at sector 8 and
    64 KiB of random bytes at 1 MiB; the guest writes its token at sector 24."""

    def __init__(self, path: Path):
        self.path = path
        self.token, self.back = os.urandom(8).hex(), os.urandom(8).hex()
        self.bulk = os.urandom(65536)
        image = bytearray(IMAGE_BYTES)
        image[8 * 512:8 * 512 + 40] = f"HOST-{self.token}-END".encode().ljust(40, b"\0")
        image[1 << 20:(1 << 20) + len(self.bulk)] = self.bulk
        path.write_bytes(bytes(image))

    def drive_arg(self) -> str:
        return f"file={self.path},format=raw,if=ide"

    def check_in_guest(self, g) -> None:
        """At the shell of a guest booted with initramfs_with_ata's initrd."""
        sent = g.send("dmesg | grep -E 'ata1|sd 0:0:0:0'; echo DMESG-$((4+4))-END\n")
        g.expect(r"\nDMESG-8-END", timeout=600, after=sent)
        log = g.output[sent:]
        assert re.search(r"ata1\.00: ATA-\d+: pyvmm ATA disk", log), log
        assert re.search(rf"sd 0:0:0:0: \[sda\] {IMAGE_BYTES // 512} 512-byte logical blocks", log), log
        # libata set a bus-master DMA mode from IDENTIFY (PIO only without the bus
        # master), so the reads and writes below go through the PRD tables.
        sent = g.send("cat /sys/class/ata_device/dev1.0/xfer_mode\n")
        g.expect(r"\nXFER_(MW_DMA|UDMA)_\d\r?\n", timeout=600, after=sent)
        sent = g.send("dd if=/dev/sda bs=512 skip=8 count=1 2>/dev/null | head -c 26; echo;"
                      " dd if=/dev/sda bs=65536 skip=16 count=1 2>/dev/null | md5sum\n")
        g.expect(f"HOST-{self.token}-END", timeout=600, after=sent)
        g.expect(hashlib.md5(self.bulk).hexdigest(), timeout=600, after=sent)
        sent = g.send(f"echo GUEST-{self.back}-END | dd of=/dev/sda bs=512 seek=24 conv=sync,notrunc 2>/dev/null;"
                      " sync; echo WROTE-$((6*7))\n")
        g.expect("WROTE-42", timeout=600, after=sent)

    def check_after_poweroff(self) -> None:
        got = self.path.read_bytes()[24 * 512:25 * 512]
        assert got == f"GUEST-{self.back}-END\n".encode().ljust(512, b"\0"), got[:64]
