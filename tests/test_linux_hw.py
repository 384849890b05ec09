"""The stock Debian kernel under the hw engine, loaded directly (host-decompressed ELF).

On hosts with VT-x/AMD-V the kernel runs natively and boots in seconds. On
hosts whose KVM emulates guest kernel mode (kvm_pvm) every kernel
instruction is emulated by the host (~5 M/s) and pyvmm completes what the
host cannot: the same boot then takes minutes, hence the long timeouts."""

import pytest

from .fitted_kernel import fitted_kernel
from .guest_session import GuestSession
from .hostfacts import hardware_assist, require_debian_cloud_kernel, require_kernel_mode_emulated

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture
def kernel():
    return require_debian_cloud_kernel()


def test_stock_kernel_boots_to_init_and_powers_off_through_acpi(kernel):
    """First console lines, ACPI (tables, PM timer), then the initramfs
    marker, a shell command and `poweroff -f`, which Linux carries out through
    the PM1a control register of pyvmm's FADT: pyvmm ends with code 0.

    On a host that emulates guest kernel mode (kvm_pvm) every kernel
    instruction is emulated (~5 M/s) and pyvmm completes what the host cannot;
    the kernel gets to /init in 10-15 minutes, where the host's handling
    of SYSCALL from a guest that is not PVM-aware faults the first system
    call (measured; see the README). There the test follows the boot through
    the parts pyvmm is responsible for: completed instructions (cmpxchg16b is
    hidden; int3, SSE, fwait), ACPI tables, the PM timer and the switch to
    kvm-clock, and checks that pyvmm is still running without a traceback."""
    append = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
    # No --kernel: the default kernel boots with pyvmm's default initramfs.
    with GuestSession("run", "--engine", "hw", "--no-reboot", "--mem", "512M", "--verbose", "--append", append) as g:
        g.expect(r"Linux version \d+\.\d+", timeout=120)
        g.expect(r"ACPI: PM-Timer IO Port: 0x608", timeout=600)
        g.expect(r"smpboot: Allowing 1 CPUs", timeout=600)
        g.expect(r"clocksource: Switched to clocksource kvm-clock", timeout=900)
        if not hardware_assist():
            # Host fact: kvm_pvm emulates every kernel instruction and faults the
            # first user-mode syscall, so no shell can follow. The rest of the
            # boot to /init (measured: 10-15 minutes here) adds no pyvmm code
            # path this run has not taken, and CI cannot afford it.
            assert "Traceback" not in g.errors, g.errors[-3000:]
            assert g.proc.poll() is None, g.errors[-3000:]      # still running, not crashed
            return
        g.expect(r"clocksource: acpi_pm", timeout=120)
        g.expect("PYVMM-INIT-READY", timeout=120)
        sent = g.send("uname -r; echo sum=$((6*7)); poweroff -f\n")
        g.expect(r"\d+\.\d+\.\d+-\d+-cloud-amd64", timeout=60, after=sent)
        g.expect("sum=42", timeout=60, after=sent)
        code = g.wait(timeout=120)
        assert code == 0, g.errors
        assert "guest stopped: poweroff ACPI poweroff" in g.errors
        assert "Traceback" not in g.errors


def test_bzimage_decompressing_itself_prints_too():
    """--no-host-decompress runs the kernel's own decompressor in the guest.
    The fitted bzImage (LZ4, ~2.4 MiB): pyvmm's part is the same for any
    bzImage, and the stock one (13.5 MiB) spent ~100 s of CI in emulated
    decompression on kvm_pvm."""
    with GuestSession("run", "--engine", "hw", "--kernel", fitted_kernel(), "--no-reboot", "--no-host-decompress",
                      "--append", "console=ttyS0 earlyprintk=serial") as g:
        g.expect(r"Linux version \d+\.\d+", timeout=400)


def test_unsupported_instruction_is_reported_not_hung(kernel):
    """With completion switched off (the guest fitting too), a kvm_pvm host
    stops the stock kernel on an instruction it cannot emulate: pyvmm reports
    it with the instruction bytes and registers and exits with code 3."""
    require_kernel_mode_emulated("the stock kernel has no instruction this KVM cannot run: nothing to report")
    with GuestSession("run", "--engine", "hw", "--kernel", kernel, "--no-reboot", "--no-guest-fit", "--no-completion",
                      "--append", "console=ttyS0 earlyprintk=serial") as g:
        g.expect(r"Linux version \d+\.\d+", timeout=120)
        code = g.wait(timeout=600)
        assert code == 3, g.errors
        assert "emulation failure" in g.errors
        assert "instruction bytes:" in g.errors and "RIP=" in g.errors
        assert "Traceback" not in g.errors
