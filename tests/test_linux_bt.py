"""The stock Debian kernel under the bt engine (pure-Python binary
translation): boots to the initramfs marker, then answers `uname -a` and
`cat /proc/cpuinfo` in the shell; on 1 and on 2 vCPUs.  Linux finds KVM's
paravirtual interface (engines/bt/kvmpv.py) and runs on kvm-clock.

These boots take many minutes of host time (every guest instruction runs
through the translator); PYVMM_BT_BOOT_TIMEOUT (seconds, default 5400)
bounds each wait.  CI runs these checks on the bt boot of
tests/devices/test_virtio_net_linux.py (check_stock_kernel_shell and
check_acpi_poweroff); the boots of this module, deterministic and on the
host clock, on 2 vCPUs and with the nested MMU, are opt-in with
PYVMM_SLOW_BT=1 (each is another such boot, more than CI's budget)."""

import os

import pytest

from pyvmm.engines.bt import cpumodel

from .guest_session import GuestSession
from .hostfacts import require_debian_cloud_kernel

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
opt_in = pytest.mark.opt_in(env="PYVMM_SLOW_BT")     # another full bt boot each: deselected unless =1


@pytest.fixture
def kernel():
    return require_debian_cloud_kernel()


def check_stock_kernel_shell(g: GuestSession, kernel: str, cpus: int) -> tuple[str, str]:
    """On a booted stock kernel under bt (or hybrid: the same CPUID): its
    ACPI and kvm-clock lines, `uname -a` and /proc/cpuinfo at the shell;
    returns (uname -a release and build, /proc/cpuinfo)."""
    offered = cpumodel.advertised("v3")       # what the guest's CPUID says
    g.expect(r"Linux version \d+\.\d+", timeout=600)
    g.expect(r"ACPI: PM-Timer IO Port: 0x608", timeout=TIMEOUT)  # found through pyvmm's FADT
    g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
    assert "kvm-clock: Using msrs 4b564d01 and 4b564d00" in g.output
    assert "clocksource: Switched to clocksource kvm-clock" in g.output
    sent = g.send("uname -a\n")
    m = g.expect(r"Linux \S+ (\d+\.\d+\.\d+-\d+-cloud-amd64) (#\d+ SMP .*) x86_64[^\r\n]*", timeout=600,
                 after=sent)
    assert m.group(1) in kernel  # the default kernel: the newest in /boot
    sent = g.send("cat /proc/cpuinfo; echo CPUINFO-END\n")
    g.expect(r"\nCPUINFO-END\r?\n", timeout=600, after=sent)   # the output, not the echoed command
    out = g.output
    end = out.rindex("\nCPUINFO-END")
    info = out[out.rindex("echo CPUINFO-END", 0, end) + len("echo CPUINFO-END"):end]
    assert "GenuineIntel" in info
    assert "pyvmm bt virtual CPU" in info
    for flag in ("fpu", "tsc", "pae", "cx8", "apic", "cmov", "pat", "sse2", "syscall", "nx", "lm",
                 "constant_tsc", "nonstop_tsc", "tsc_deadline_timer", "hypervisor"):
        assert f" {flag}" in info, flag
    # x86-64-v3 (--cpu-model's default): XSAVE always, AVX state and the
    # AVX groups as far as the translator implements them (cpumodel.py).
    assert " xsave " in info and " xsaveopt" in info and " xsavec" in info
    for flag in ("avx", "avx2", "fma", "f16c", "bmi2", "movbe", "sse4_2"):
        assert (f" {flag} " in info or info.rstrip().endswith(f" {flag}")) == (flag in offered), flag
    assert " x2apic" not in info
    xstate = 0x7 if "avx" in offered else 0x3
    assert f"x86/fpu: Enabled xstate features {xstate:#x}" in g.output
    assert info.count("processor\t:") == cpus
    # release and build info; not the rest of the line, where a kernel
    # message may break in (when depends on when the host typed the command)
    return f"{m.group(1)} {m.group(2)}", info


def check_acpi_poweroff(g: GuestSession) -> None:
    """`poweroff -f` goes through the PM1a control register of pyvmm's ACPI
    tables, not the i8042 (the run needs --verbose for pyvmm to say so)."""
    g.send("poweroff -f\n")
    assert g.wait(timeout=600) == 0
    assert "guest stopped: poweroff ACPI poweroff" in g.errors, g.errors[-2000:]


def _boot_and_check(kernel: str, cpus: int, mmu: str, deterministic: bool = False) -> tuple[str, str]:
    """Boots, checks the shell's answers; returns check_stock_kernel_shell's."""
    args = ["run", "--engine", "bt", "--mmu", mmu, "--cpus", str(cpus), "--no-reboot",
            "--mem", "512M", "--verbose", "--append", CMDLINE]
    if deterministic:
        args.append("--deterministic")
    with GuestSession(*args) as g:
        seen = check_stock_kernel_shell(g, kernel, cpus)
        check_acpi_poweroff(g)
        return seen


@opt_in
def test_stock_kernel_boots_under_bt(kernel):
    # Deterministic guest time: no host-speed-dependent timer load (about a
    # quarter fewer guest instructions than on the host clock), same run twice.
    _boot_and_check(kernel, 1, "shadow", deterministic=True)


@opt_in
def test_stock_kernel_boots_under_bt_on_the_host_clock(kernel):
    _boot_and_check(kernel, 1, "shadow")


@opt_in
def test_stock_kernel_boots_under_bt_with_two_vcpus(kernel):
    _boot_and_check(kernel, 2, "shadow", deterministic=True)


@opt_in
def test_shadow_and_nested_mmu_give_the_same_answers(kernel):
    # Deterministic guest time: the same instructions in the same order, so
    # even bogomips and the uname line (build info only) must match exactly.
    shadow = _boot_and_check(kernel, 1, "shadow", deterministic=True)
    nested = _boot_and_check(kernel, 1, "nested", deterministic=True)
    assert shadow == nested
