"""The stock Debian kernel under the hw engine, loaded directly (host-decompressed ELF)."""

import glob

import pytest

from .guest_session import GuestSession, host_has_hardware_assist
from .rawguest import require_kvm

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture
def kernel():
    require_kvm()
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        pytest.skip("linux-image-cloud-amd64 is not installed")
    return found[-1]


def test_stock_kernel_boots_under_hw(kernel):
    """With VT-x/AMD-V the kernel reaches the initramfs marker; on a host whose
    KVM emulates guest kernel mode (kvm_pvm), it prints its first lines and
    then stops on an instruction the host cannot emulate, which pyvmm reports."""
    with GuestSession("run", "--kernel", kernel, "--no-reboot", "--mem", "512M") as g:
        g.expect(r"Linux version \d+\.\d+", timeout=120)
        if host_has_hardware_assist():
            g.expect("PYVMM-INIT-READY", timeout=120)
            g.send("uname -r; poweroff -f\n")
            g.expect(r"\d+\.\d+\.\d+-\d+-cloud-amd64", timeout=60)
        else:
            code = g.wait(timeout=300)
            assert code == 3, g.errors
            assert "emulation failure" in g.errors
            assert "instruction bytes:" in g.errors and "RIP=" in g.errors
            assert "Traceback" not in g.errors


def test_bzimage_decompressing_itself_prints_too(kernel):
    """--no-host-decompress runs the kernel's own decompressor in the guest."""
    with GuestSession("run", "--kernel", kernel, "--no-reboot", "--no-host-decompress",
                      "--append", "console=ttyS0 earlyprintk=serial") as g:
        g.expect(r"Linux version \d+\.\d+", timeout=400)
