"""The whole PC boot path: SeaBIOS -> SYSLINUX menu -> Linux -> busybox shell
on the disk's own ext4 root, from `pyvmm guest disk`'s image, under bt and
hybrid; a `reboot` in the guest goes round the BIOS again.  QEMU TCG boots
the same image in the same test as the reference that the image is sound.

One boot per engine (each one minutes of host time): marked slow."""

from __future__ import annotations

import os
import shutil

import pytest

from pyvmm.boot.firmware import DEFAULT_BIOS
from pyvmm.engines.bt.bootprep import kernel_args
from tests.guest_session import GuestSession
from tests.hostfacts import require_debian_cloud_kernel, require_from_setup

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
BASE_CMDLINE = "root=/dev/vda2 console=ttyS0"
# What pyvmm adds to a direct boot under bt/hybrid (bootprep.py), written
# into the boot loader's command line instead: a BIOS boot passes the disk's.
CMDLINE = f"{BASE_CMDLINE} {kernel_args(BASE_CMDLINE, 'tsc=unstable')}"
BANNER = r"SeaBIOS \(version"
# menu.c32's countdown line (the MENU AUTOBOOT text of guest/bootloader.py),
# drawn before the kernel loads.  Not "boot:": with the menu up SYSLINUX
# prints no prompt, and the kernel's "smpboot:" lines would match it.
MENU = r"Booting linux in (?:\x1b\[[\d;]*m)*\d"      # the count comes wrapped in colour codes
SHELL_READY = "PYVMM-INIT-READY"


class QemuSession(GuestSession):
    """GuestSession's expect/send on a QEMU process instead of pyvmm."""

    def __init__(self, *args: str):
        super().__init__(argv=["qemu-system-x86_64", *args])


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> str:
    require_from_setup(paths=[DEFAULT_BIOS], package="seabios")
    require_debian_cloud_kernel()
    from pyvmm.guest.disk_image import make_boot_disk
    path = tmp_path_factory.mktemp("pcdisk") / "disk.qcow2"
    make_boot_disk(str(path), "qcow2", cmdline=CMDLINE)
    return str(path)


def _shell_cmdline(session: GuestSession, timeout: float) -> str:
    """Waits for the shell, asks for /proc/cmdline and returns it."""
    session.expect(SHELL_READY, timeout=timeout)
    sent = session.send("cat /proc/cmdline; echo CMDLINE-END\n")
    m = session.expect(r"\n([^\r\n]*root=/dev/vda2[^\r\n]*)\r?\nCMDLINE-END", timeout=600, after=sent)
    return m.group(1).strip()


@pytest.fixture(scope="module")
def reference(disk) -> str:
    """/proc/cmdline as QEMU TCG's guest sees it after booting the image (once per module)."""
    require_from_setup(programs=["qemu-system-x86_64"], package="qemu-system-x86")
    with QemuSession("-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
                     "-drive", f"file={disk},if=virtio,format=qcow2,snapshot=on") as q:
        q.expect(BANNER, timeout=120)
        cmdline = _shell_cmdline(q, timeout=900)
    assert cmdline.startswith("BOOT_IMAGE=/vmlinuz ") and CMDLINE in cmdline, cmdline
    return cmdline


@pytest.mark.parametrize("engine", ["bt", pytest.param("hybrid", marks=pytest.mark.kvm)])
def test_bios_to_shell_and_reboot(engine, disk, reference, tmp_path):
    mine = str(tmp_path / "disk.qcow2")
    shutil.copyfile(disk, mine)          # the guest writes its root: a copy per boot
    # The block store stays on: the other Linux tests' boots of the same
    # kernel have filled it, which saves this boot minutes of translation.
    with GuestSession("run", "--engine", engine, "-m", "512", "--drive", f"file={mine},format=qcow2") as g:
        g.expect(BANNER, timeout=300)
        g.expect("Booting from Hard Disk", timeout=300)
        g.expect(MENU, timeout=600)                      # SYSLINUX's menu on the serial console
        assert _shell_cmdline(g, TIMEOUT) == reference   # the boot loader's command line, as under QEMU
        assert "EXT4-fs (vda2): mounted" in g.output
        sent = g.send("reboot -f\n")
        g.expect(BANNER, timeout=600, after=sent)        # the reset ran the BIOS again
        g.expect(MENU, timeout=600, after=sent)
        assert "Traceback" not in g.errors
