"""The pyvmm hypercall ABI, version 1.1, as data (docs/paravirt.md says it
in prose).

Discovery: CPUID leaf CPUID_BASE answers EAX = the highest pyvmm leaf and
EBX:ECX:EDX = SIGNATURE.  pyvmm puts its leaves at 0x40000100 on every engine
(0x40000000 belongs to KVM's leaves: KVM's own under `hw`, kvmpv's under `bt`); guests search the bases
0x40000000 + k*0x100 (k = 0..255), as Xen guests do.  CPUID_BASE + 1 gives
EAX = version (major << 16 | minor), EBX = feature bits, ECX = the MSR that
installs the hypercall page, EDX = the ISA IRQ the one-shot timer raises.

Calling convention (32- and 64-bit guests alike): `call` into the hypercall
page with RAX = operation, RBX, RCX, RSI, RDI = arguments 0..3; the result
comes back in RAX: >= 0 on success, -errno (two's complement, 64-bit, low 32
bits in 32-bit mode) on failure.  Every other register is preserved.
Hypercalls from CPL > 0 fail with -EPERM."""

from __future__ import annotations

import ctypes

VERSION_MAJOR = 1
VERSION_MINOR = 1           # 1.1: update_va (FEAT_UPDATE_VA)
VERSION = (VERSION_MAJOR << 16) | VERSION_MINOR

CPUID_BASE = 0x40000100
CPUID_SEARCH_STEP = 0x100
SIGNATURE = b"PyVMMPyVMMPy"
assert len(SIGNATURE) == 12

# Hypercall page: wrmsr(MSR_HYPERCALL_PAGE, gpa | ENABLE); the page at gpa
# (4 KiB aligned, guest RAM) is filled with the engine's entry code.
MSR_HYPERCALL_PAGE = 0x40000200
HYPERCALL_PAGE_ENABLE = 1
PAGE_SIZE = 4096

# The hw engine's doorbell: the hypercall page writes AL here.
DOORBELL_PORT = 0x5650
DOORBELL_LENGTH = 1

# ISA IRQ the one-shot timer raises (an edge), unless the guest masked it
# virtually, in which case the shared page's pending flag is set instead.
TIMER_IRQ = 10

# Feature bits (CPUID_BASE + 1, EBX).
FEAT_CONSOLE = 1 << 0
FEAT_VIRQ = 1 << 1        # virtual interrupt flag in the shared page
FEAT_MMU = 1 << 2         # batched page-table updates, CR3 switch, TLB flush
FEAT_TIMER = 1 << 3       # one-shot timer and time in the shared page
FEAT_HALT = 1 << 4
FEAT_SHUTDOWN = 1 << 5
FEAT_UPDATE_VA = 1 << 6   # ABI 1.1: update_va (one PTE and its linear address's TLB entry)
FEATURES = FEAT_CONSOLE | FEAT_VIRQ | FEAT_MMU | FEAT_TIMER | FEAT_HALT | FEAT_SHUTDOWN | FEAT_UPDATE_VA

# Operations (RAX).
OP_VERSION = 0          # () -> VERSION
OP_CONSOLE_WRITE = 1    # (gpa, len) -> bytes written
OP_SET_SHARED = 2       # (gpa | 0) -> 0: registers (0: drops) the shared page
OP_IRQ_ENABLE = 3       # () -> events delivered: vif = 1, deliver what is pending
OP_MMU_UPDATE = 4       # (list gpa, count, pte size 4|8) -> entries written
OP_SET_CR3 = 5          # (cr3) -> 0
OP_FLUSH_TLB = 6        # (linear address, or FLUSH_ALL) -> 0
OP_TIMER_ONESHOT = 7    # (deadline ns, 0 cancels) -> 0
OP_READ_TIME = 8        # () -> ns since the machine started
OP_HALT = 9             # () -> 0 after the vCPU woke (sleeps until an interrupt)
OP_YIELD = 10           # () -> 0
OP_SHUTDOWN = 11        # (SHUTDOWN_POWEROFF | SHUTDOWN_RESET, exit status) -> does not return
OP_UPDATE_VA = 12       # (pte gpa, value, linear address, UVA_* flags) -> 0   [ABI 1.1]
OP_COUNT = 13

OP_NAMES = {OP_VERSION: "version", OP_CONSOLE_WRITE: "console_write", OP_SET_SHARED: "set_shared",
            OP_IRQ_ENABLE: "irq_enable", OP_MMU_UPDATE: "mmu_update", OP_SET_CR3: "set_cr3",
            OP_FLUSH_TLB: "flush_tlb", OP_TIMER_ONESHOT: "timer_oneshot", OP_READ_TIME: "read_time",
            OP_HALT: "halt", OP_YIELD: "yield", OP_SHUTDOWN: "shutdown",
            OP_UPDATE_VA: "update_va"}

FLUSH_ALL = 0xFFFFFFFF          # as a 32-bit value; any value >= it flushes everything
SHUTDOWN_POWEROFF = 0
SHUTDOWN_RESET = 1
CONSOLE_MAX = 4096              # one console write at most
MMU_BATCH_MAX = 512             # entries in one mmu_update

# update_va flags (RDI): the model is Xen's update_va_mapping with UVMF_INVLPG.
UVA_INVLPG = 1 << 0             # also drop the linear address's translation on this vCPU
UVA_PTE32 = 1 << 1              # a 4-byte entry (32-bit paging); else 8 bytes
UVA_FLAGS = UVA_INVLPG | UVA_PTE32

# errno values (Linux's numbers).
EPERM = 1
E2BIG = 7
EFAULT = 14
EINVAL = 22
ENOSYS = 38

MASK64 = (1 << 64) - 1


def err(errno: int) -> int:
    """The RAX value of a failure: -errno as an unsigned 64-bit number."""
    return -errno & MASK64


class MmuEntry(ctypes.LittleEndianStructure):
    """One mmu_update entry: write `value` to the page-table entry at guest
    physical `ptr` (aligned to the pte size)."""
    _pack_ = 1
    _fields_ = [("ptr", ctypes.c_uint64), ("value", ctypes.c_uint64)]


class SharedPage(ctypes.LittleEndianStructure):
    """The per-vCPU page shared with pyvmm (registered with OP_SET_SHARED).

    vif: 1 while the guest accepts interrupts (its virtual IF; the guest
    writes it, no trap).  pending: pyvmm sets it to 1 when an event arrived
    while vif was 0; the guest calls OP_IRQ_ENABLE when it sees it after
    setting vif.  events: bit 0 = timer.  The time fields follow KVM's
    pvclock_vcpu_time_info layout: version is odd while pyvmm updates them,
    system_time_ns was the time at tsc_timestamp, and
    time = system_time_ns + ((tsc - tsc_timestamp) << shift) * mul >> 32
    (shift negative: >> -shift); mul = 0 means "no TSC scaling offered, use
    OP_READ_TIME"."""
    _pack_ = 1
    _fields_ = [("vif", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("pad0", ctypes.c_uint16),
                ("events", ctypes.c_uint32),
                ("version", ctypes.c_uint32), ("pad1", ctypes.c_uint32),
                ("tsc_timestamp", ctypes.c_uint64), ("system_time_ns", ctypes.c_uint64),
                ("tsc_to_system_mul", ctypes.c_uint32), ("tsc_shift", ctypes.c_int8),
                ("flags", ctypes.c_uint8), ("pad2", ctypes.c_uint16)]


EVENT_TIMER = 1 << 0
SHARED_OFF_VIF = SharedPage.vif.offset
SHARED_OFF_PENDING = SharedPage.pending.offset
SHARED_OFF_EVENTS = SharedPage.events.offset
SHARED_OFF_VERSION = SharedPage.version.offset
assert ctypes.sizeof(SharedPage) == 40
assert ctypes.sizeof(MmuEntry) == 16


def signature_words() -> tuple[int, int, int]:
    """EBX, ECX, EDX of the signature leaf."""
    return tuple(int.from_bytes(SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def cpuid_leaves(base: int = CPUID_BASE, features: int = FEATURES) -> dict[int, tuple[int, int, int, int]]:
    """leaf -> (eax, ebx, ecx, edx) of pyvmm's CPUID leaves (`features`: the
    feature bits offered, FEATURES unless the engine cannot keep one)."""
    b, c, d = signature_words()
    return {base: (base + 1, b, c, d),
            base + 1: (VERSION, features, MSR_HYPERCALL_PAGE, TIMER_IRQ)}
