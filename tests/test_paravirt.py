"""pyvmm's hypercall ABI (paravirt/, docs/paravirt.md).

The dispatcher is tested in Python against a GuestMemory and a fake vCPU
(every operation, every error path); the conformance guest
tests/guests/pvos/pvabi.S runs every hypercall from real guest code under
both engines, and with --no-paravirt sees no signature."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.paravirt import abi, hypercall_page
from pyvmm.paravirt.hypervisor import Hypervisor
from tests.asm import assemble
from tests.hostfacts import require_kvm

REPO = Path(__file__).parent.parent
GUESTS = Path(__file__).parent / "guests"
MIB = 1 << 20
M64 = (1 << 64) - 1


class FakeVcpu:
    """A VcpuPort that records what the dispatcher asked of the engine."""

    def __init__(self, index: int = 0, cpl: int = 0):
        self.index = index
        self.regs = {"rax": 0, "rbx": 0, "rcx": 0, "rsi": 0, "rdi": 0}
        self._cpl = cpl
        self.cr3 = None
        self.flushed: list = []
        self.tables: list = []
        self.halted = False

    def reg(self, name): return self.regs[name]
    def set_result(self, value): self.regs["rax"] = value
    def cpl(self): return self._cpl
    def set_cr3(self, value): self.cr3 = value
    def flush_tlb(self, la): self.flushed.append(la)
    def tables_written(self, gpas): self.tables.extend(gpas)
    def halt(self): self.halted = True


@pytest.fixture
def env():
    mem = GuestMemory(16 * MIB)
    out, irqs, stops = [], [], []
    hv = Hypervisor(mem, out.append, irqs.append, lambda k, s: stops.append((k, s)),
                    clock_ns=lambda: 5_000, engine="bt")
    yield hv, mem, out, irqs, stops
    hv.close()
    mem.close()


def call(hv, op, *args, cpu=None):
    v = cpu or FakeVcpu()
    v.regs["rax"] = op
    for name, a in zip(("rbx", "rcx", "rsi", "rdi"), args):
        v.regs[name] = a & M64
    r = hv.dispatch(v)
    assert v.regs["rax"] == r
    return r - (1 << 64) if r >= 1 << 63 else r


def test_cpuid_leaves_carry_signature_version_and_msr():
    leaves = abi.cpuid_leaves()
    eax, ebx, ecx, edx = leaves[abi.CPUID_BASE]
    assert eax == abi.CPUID_BASE + 1
    assert b"".join(x.to_bytes(4, "little") for x in (ebx, ecx, edx)) == b"PyVMMPyVMMPy"
    assert leaves[abi.CPUID_BASE + 1] == (0x10001, abi.FEATURES, abi.MSR_HYPERCALL_PAGE, abi.TIMER_IRQ)
    assert abi.CPUID_BASE != 0x40000000   # KVM's own leaf stays where Linux looks


def test_hypercall_pages_per_engine():
    assert hypercall_page.page_bytes("bt")[:4] == b"\x0f\x01\xc1\xc3"          # vmcall; ret
    hw = hypercall_page.page_bytes("hw")
    assert hw[:8] == b"\x52\x66\xba\x50\x56\xee\x5a\xc3"   # push rdx; mov dx,0x5650; out dx,al; pop rdx; ret
    assert len(hw) == 4096 and hw[-1] == 0xCC


def test_msr_installs_page_and_rejects_bad_values(env):
    hv, mem, *_ = env
    assert hv.write_msr(0, 0x3000 | 1)
    assert mem.read(0x3000, 4) == hypercall_page.BT_ENTRY
    assert hv.read_msr(0) == 0x3001
    assert not hv.write_msr(0, 0x3010 | 1)          # not page aligned
    assert not hv.write_msr(0, 0xF000_0000 | 1)     # outside RAM
    assert hv.write_msr(0, 0) and hv.read_msr(0) == 0


def test_version_unknown_op_and_cpl3(env):
    hv, *_ = env
    assert call(hv, abi.OP_VERSION) == abi.VERSION
    assert call(hv, 99) == -abi.ENOSYS
    assert call(hv, abi.OP_VERSION, cpu=FakeVcpu(cpl=3)) == -abi.EPERM


def test_console_write(env):
    hv, mem, out, *_ = env
    mem.write(0x5000, b"hi there")
    assert call(hv, abi.OP_CONSOLE_WRITE, 0x5000, 8) == 8
    assert out == [b"hi there"]
    assert call(hv, abi.OP_CONSOLE_WRITE, 16 * MIB - 4, 8) == -abi.EFAULT
    assert call(hv, abi.OP_CONSOLE_WRITE, 1 << 63, 8) == -abi.EFAULT
    assert call(hv, abi.OP_CONSOLE_WRITE, 0x5000, abi.CONSOLE_MAX + 1) == -abi.EINVAL
    assert call(hv, abi.OP_CONSOLE_WRITE, 0x5000, 0) == 0 and out == [b"hi there"]


def test_shared_page_and_virtual_interrupt_flag(env):
    hv, mem, out, irqs, _ = env
    assert call(hv, abi.OP_IRQ_ENABLE) == -abi.EINVAL       # no shared page yet
    assert call(hv, abi.OP_SET_SHARED, 0x6004) == -abi.EINVAL
    assert call(hv, abi.OP_SET_SHARED, 0xF000_0000) == -abi.EFAULT
    assert call(hv, abi.OP_SET_SHARED, 0x6000) == 0
    page = mem.read_obj(0x6000, abi.SharedPage)
    assert page.vif == 1 and page.system_time_ns == 5_000 and page.version % 2 == 0
    hv.raise_event(0, abi.EVENT_TIMER)                      # vif 1: an IRQ edge
    assert irqs == [abi.TIMER_IRQ]
    mem.write_u8(0x6000, 0)                                 # guest: virtual cli
    hv.raise_event(0, abi.EVENT_TIMER)
    assert irqs == [abi.TIMER_IRQ]
    assert mem.read_u8(0x6000 + abi.SHARED_OFF_PENDING) == 1
    assert call(hv, abi.OP_IRQ_ENABLE) == 1                 # delivered now
    assert irqs == [abi.TIMER_IRQ] * 2
    assert mem.read_u8(0x6000) == 1 and mem.read_u8(0x6001) == 0
    assert call(hv, abi.OP_IRQ_ENABLE) == 0


def test_mmu_update_batch(env):
    hv, mem, *_ = env
    entries = (abi.MmuEntry * 2)(abi.MmuEntry(0x8000, 0x1234_5003), abi.MmuEntry(0x8008, 0xFFFF_0000_0000_0007))
    mem.write_obj(0x7000, entries)
    v = FakeVcpu()
    assert call(hv, abi.OP_MMU_UPDATE, 0x7000, 2, 8, cpu=v) == 2
    assert mem.read_u64(0x8000) == 0x1234_5003 and mem.read_u64(0x8008) == 0xFFFF_0000_0000_0007
    assert v.tables == [0x8000, 0x8008]
    assert call(hv, abi.OP_MMU_UPDATE, 0x7000, 1, 4) == 1
    assert mem.read_u32(0x8000) == 0x1234_5003


def test_mmu_update_errors_write_nothing(env):
    hv, mem, *_ = env
    mem.write_obj(0x7000, (abi.MmuEntry * 2)(abi.MmuEntry(0x8000, 1), abi.MmuEntry(0xF000_0000, 1)))
    assert call(hv, abi.OP_MMU_UPDATE, 0x7000, 2, 8) == -abi.EFAULT
    assert mem.read_u64(0x8000) == 0                        # all or nothing
    mem.write_obj(0x7000, abi.MmuEntry(0x8004, 1))
    assert call(hv, abi.OP_MMU_UPDATE, 0x7000, 1, 8) == -abi.EFAULT   # misaligned pte
    assert call(hv, abi.OP_MMU_UPDATE, 0x7000, 1, 3) == -abi.EINVAL
    assert call(hv, abi.OP_MMU_UPDATE, 0x7000, abi.MMU_BATCH_MAX + 1, 8) == -abi.EINVAL
    assert call(hv, abi.OP_MMU_UPDATE, 16 * MIB - 8, 1, 8) == -abi.EFAULT   # list outside RAM


def test_update_va_generic(env):
    """update_va through the engine-neutral dispatcher (hw's path): the
    entry written, the engine told, the page flushed only with UVA_INVLPG."""
    hv, mem, *_ = env
    v = FakeVcpu()
    assert call(hv, abi.OP_UPDATE_VA, 0x8008, 0x5003, 0x40_1000, abi.UVA_INVLPG, cpu=v) == 0
    assert mem.read_u64(0x8008) == 0x5003 and v.tables == [0x8008] and v.flushed == [0x40_1000]
    assert call(hv, abi.OP_UPDATE_VA, 0x8010, 0x6003, 0x40_2000, 0, cpu=v) == 0
    assert mem.read_u64(0x8010) == 0x6003 and v.flushed == [0x40_1000]
    assert call(hv, abi.OP_UPDATE_VA, 0x8004, 0x7003, 0, abi.UVA_PTE32, cpu=v) == 0
    assert mem.read_u32(0x8004) == 0x7003 and mem.read_u32(0x8000) == 0
    assert hv.stats()["calls"] == {"update_va": 3}


def test_update_va_errors_write_nothing(env):
    hv, mem, *_ = env
    v = FakeVcpu()
    assert call(hv, abi.OP_UPDATE_VA, 0x8000, 1, 0, 0x4, cpu=v) == -abi.EINVAL       # unknown flag
    assert call(hv, abi.OP_UPDATE_VA, 0x8004, 1, 0, 0, cpu=v) == -abi.EFAULT         # misaligned
    assert call(hv, abi.OP_UPDATE_VA, 0x8002, 1, 0, abi.UVA_PTE32, cpu=v) == -abi.EFAULT
    assert call(hv, abi.OP_UPDATE_VA, 16 * MIB, 1, 0, 0, cpu=v) == -abi.EFAULT       # outside RAM
    assert call(hv, abi.OP_UPDATE_VA, M64 - 7, 1, 0, abi.UVA_INVLPG, cpu=v) == -abi.EFAULT
    assert call(hv, abi.OP_UPDATE_VA, 0x8000, 1, 0, 0, cpu=FakeVcpu(cpl=3)) == -abi.EPERM
    assert mem.read(0x8000, 16) == bytes(16) and not v.tables and not v.flushed
    assert hv.errors == 6


def test_cr3_flush_time_yield_halt(env):
    hv, *_ = env
    v = FakeVcpu()
    assert call(hv, abi.OP_SET_CR3, 0x9000, cpu=v) == 0 and v.cr3 == 0x9000
    assert call(hv, abi.OP_SET_CR3, 0xF000_0000) == -abi.EFAULT
    assert call(hv, abi.OP_FLUSH_TLB, 0x400000, cpu=v) == 0
    assert call(hv, abi.OP_FLUSH_TLB, abi.FLUSH_ALL, cpu=v) == 0
    assert v.flushed == [0x400000, None]
    assert call(hv, abi.OP_READ_TIME) == 5_000
    assert call(hv, abi.OP_YIELD) == 0
    assert call(hv, abi.OP_HALT, cpu=v) == 0 and v.halted


def test_timer_fires_once(env):
    hv, mem, out, irqs, _ = env
    assert call(hv, abi.OP_TIMER_ONESHOT, 5_000 + 1_000) == 0
    for _ in range(200):
        if irqs:
            break
        import time
        time.sleep(0.01)
    assert irqs == [abi.TIMER_IRQ]
    assert call(hv, abi.OP_TIMER_ONESHOT, 10**12) == 0
    assert call(hv, abi.OP_TIMER_ONESHOT, 0) == 0           # cancelled: never fires
    assert hv._timer is None


def test_shutdown(env):
    hv, mem, out, irqs, stops = env
    assert call(hv, abi.OP_SHUTDOWN, 5, 0) == -abi.EINVAL
    assert call(hv, abi.OP_SHUTDOWN, abi.SHUTDOWN_POWEROFF, 7) == 0
    assert stops == [(abi.SHUTDOWN_POWEROFF, 7)]
    assert hv.stats()["calls"]["shutdown"] == 2


# ------------------------------------------------------------ whole guests
@pytest.fixture(scope="module")
def pvabi(tmp_path_factory) -> Path:
    return assemble(GUESTS / "pvos" / "pvabi.S", ld_script=GUESTS / "guest.ld",
                    outdir=tmp_path_factory.mktemp("pvabi"))


def run_guest(kernel: Path, engine: str, *extra: str) -> subprocess.CompletedProcess:
    if engine == "hw":
        require_kvm()
    cmd = [sys.executable, "-m", "pyvmm", "run", "--engine", engine, "--kernel", str(kernel),
           "--mem", "64M", "--debug-exit", "iobase=0xf4,iosize=4", "--no-reboot", "-v", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


CHECKS_ANY_HOST = ("cpuid_version", "msr", "version", "console", "console_efault", "console_einval",
                   "enosys", "shared", "shared_einval", "read_time", "yield", "timer_pending",
                   "irq_enable", "halt")
CHECKS_PAGING = ("paging", "mmu_update", "mmu_update_errors", "set_cr3", "flush_all", "update_va",
                 "update_va_errors")


def kvm_runs_32bit_paging() -> bool:
    """kvm_pvm (guest kernel mode emulated) cannot run a 32-bit paged guest:
    enabling CR0.PG triple-faults there with or without pyvmm's interface."""
    from pyvmm.engines.kvm import hostfit
    return not hostfit.kernel_mode_emulated()


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_conformance_guest(pvabi, engine):
    proc = run_guest(pvabi, engine)
    out = proc.stdout.decode("latin-1")
    why = out + proc.stderr.decode("latin-1")
    assert "sig=pyvmm" in out, why
    assert "hello through the hypercall\n" in out
    for name in CHECKS_ANY_HOST:
        assert f"{name}=ok\n" in out, f"{name}: {why}"
    assert "=bad" not in out, why
    if engine == "hw" and not kvm_runs_32bit_paging():
        assert "triple fault" in proc.stderr.decode("latin-1"), why
        return
    for name in CHECKS_PAGING:
        assert f"{name}=ok\n" in out, f"{name}: {why}"
    assert "done\n" in out and "still alive" not in out
    assert proc.returncode == (7 << 1) | 1, why


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_no_paravirt_hides_signature(pvabi, engine):
    proc = run_guest(pvabi, engine, "--no-paravirt")
    out = proc.stdout.decode("latin-1")
    assert out.startswith("sig=none"), out + proc.stderr.decode("latin-1")
    assert proc.returncode == (3 << 1) | 1
