"""Architectural state of one x86 vCPU, engine-neutral.

Boot loaders produce it, engines load it into their vCPUs and read it back,
and later a vCPU moves between engines through it."""

from __future__ import annotations

from dataclasses import dataclass, field

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# CR0 / CR4 / EFER bits used by loaders and engines.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_RESERVED1 = 1 << 1
RFLAGS_IF = 1 << 9


@dataclass
class Segment:
    """A segment register with its hidden descriptor cache (as KVM's kvm_segment)."""
    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3          # read/write data, accessed
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1             # code/data (not system)
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def real_mode(cls, selector: int, code: bool = False) -> "Segment":
        return cls(selector=selector, base=selector << 4, limit=0xFFFF, type=0xB if code else 3)

    @classmethod
    def flat(cls, selector: int, code: bool, long_mode: bool = False) -> "Segment":
        """4 GiB flat code or data segment; a long-mode code segment has L=1, D=0."""
        return cls(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB if code else 3,
                   present=1, dpl=0, db=0 if (code and long_mode) else 1, s=1,
                   l=1 if (code and long_mode) else 0, g=1)

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor that loads this segment (limit in the
        units its G bit implies)."""
        limit = self.limit >> 12 if self.g else self.limit
        access = (self.type & 0xF) | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.avl) | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return ((limit & 0xFFFF) | ((self.base & 0xFFFFFF) << 16) | (access << 40)
                | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((self.base >> 24) & 0xFF) << 56))


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


def _seg(**kw) -> Segment:
    return Segment(**kw)


@dataclass
class CpuState:
    """Registers, segments, control registers and MSRs of one vCPU."""
    regs: dict[str, int] = field(default_factory=lambda: {n: 0 for n in GPR_NAMES})
    rip: int = 0xFFF0
    rflags: int = RFLAGS_RESERVED1
    cs: Segment = field(default_factory=lambda: Segment(selector=0xF000, base=0xFFFF0000, type=0xB))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: _seg(type=0xB, s=0))
    ldt: Segment = field(default_factory=lambda: _seg(type=2, s=0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = CR0_ET | CR0_NE
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    # Other MSRs by index (e.g. 0xC0000100 FS base); engines apply what they know.
    msrs: dict[int, int] = field(default_factory=dict)
    # x87/SSE state as the 512-byte FXSAVE image (SDM vol. 1, 10.5.1); None:
    # not captured (a boot state), the engine keeps its reset values.
    fxsave: bytes | None = None
    # XCR0 (reset 1: x87 only) and bits 255:128 of YMM0-15 (None: not
    # captured, as fxsave; else 16 integers), the AVX state beyond fxsave.
    xcr0: int = 1
    ymmh: list[int] | None = None

    SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)
