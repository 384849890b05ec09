"""The stock Debian kernel under bt finds pyvmm's PCI bus through the DSDT,
loads virtio_pci, virtio_blk and virtio-rng from the initramfs pyvmm builds
for it, sees /dev/vda of the image's size, reads back what the host wrote,
writes a sector the host then reads, and gets bytes from /dev/hwrng.

A full bt boot takes many minutes of host time; PYVMM_BT_BOOT_TIMEOUT
(seconds, default 5400) bounds the wait, as in tests/test_linux_bt.py."""

from __future__ import annotations

import os

import pytest

from ..guest_session import GuestSession
from ..hostfacts import require_debian_cloud_kernel

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
SECTORS = 16387                      # 8 MiB and 3 sectors: a size nothing else has


def test_linux_uses_a_virtio_disk_and_rng_under_bt(tmp_path):
    require_debian_cloud_kernel()
    disk = tmp_path / "vda.raw"
    marker = os.urandom(8).hex()
    disk.write_bytes(marker.encode() + bytes(SECTORS * 512 - len(marker)))
    with GuestSession("run", "--engine", "bt", "--no-reboot", "--mem", "256M", "--append", CMDLINE,
                      "--drive", f"file={disk},format=raw,id=disk0", "--virtio-rng") as g:
        g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
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
        g.send("poweroff -f\n")
        assert g.wait(timeout=600) == 0
    assert disk.read_bytes()[512:512 + 17] == b"GUEST-WROTE-THIS\n"
