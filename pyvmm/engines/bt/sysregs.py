"""Which values CR0, CR3, CR4, CR8, EFER and XCR0 accept (Intel SDM Vol. 3,
2.5 and 2.6; the MOV CR, WRMSR and XSETBV pages; AMD APM Vol. 2, 3.1).

A bit that depends on a feature is allowed only when the vCPU's CPUID
table offers that feature, so a feature added to cpuid.py later is
accepted by MOV/WRMSR/XSETBV without a change here.  Every check raises
GuestFault(#GP(0)) before anything changes."""

from __future__ import annotations

from .faults import GP, GuestFault

CR0_PE, CR0_WP, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 16, 1 << 29, 1 << 30, 1 << 31
CR4_PAE, CR4_LA57, CR4_PCIDE, CR4_OSXSAVE, CR4_CET = 1 << 5, 1 << 12, 1 << 17, 1 << 18, 1 << 23
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11
XCR0_X87, XCR0_SSE, XCR0_AVX = 1, 2, 4
XCR0_AVX512 = 0xE0               # opmask, ZMM_Hi256, Hi16_ZMM: all or none
XCR0_BNDREGS, XCR0_BNDCSR = 8, 16

# CR4 bit -> the CPUID feature (leaf, subleaf, register index eax=0.., bit)
# that makes it writable.  Bits not listed here and not in CR4_ALWAYS are
# reserved and raise #GP.
CR4_FEATURE = {
    0: (1, 0, 3, 1),        # VME       CPUID.1:EDX.VME
    1: (1, 0, 3, 1),        # PVI       CPUID.1:EDX.VME
    2: (1, 0, 3, 4),        # TSD       CPUID.1:EDX.TSC
    3: (1, 0, 3, 2),        # DE        CPUID.1:EDX.DE
    4: (1, 0, 3, 3),        # PSE       CPUID.1:EDX.PSE
    5: (1, 0, 3, 6),        # PAE       CPUID.1:EDX.PAE
    6: (1, 0, 3, 7),        # MCE       CPUID.1:EDX.MCE
    7: (1, 0, 3, 13),       # PGE       CPUID.1:EDX.PGE
    9: (1, 0, 3, 24),       # OSFXSR    CPUID.1:EDX.FXSR
    10: (1, 0, 3, 25),      # OSXMMEXCPT CPUID.1:EDX.SSE
    11: (7, 0, 2, 2),       # UMIP      CPUID.7:ECX.UMIP
    12: (7, 0, 2, 16),      # LA57      CPUID.7:ECX.LA57
    13: (1, 0, 2, 5),       # VMXE      CPUID.1:ECX.VMX
    14: (1, 0, 2, 6),       # SMXE      CPUID.1:ECX.SMX
    16: (7, 0, 1, 0),       # FSGSBASE  CPUID.7:EBX.FSGSBASE
    17: (1, 0, 2, 17),      # PCIDE     CPUID.1:ECX.PCID
    18: (1, 0, 2, 26),      # OSXSAVE   CPUID.1:ECX.XSAVE
    19: (7, 0, 2, 23),      # KL        CPUID.7:ECX.KL
    20: (7, 0, 1, 7),       # SMEP      CPUID.7:EBX.SMEP
    21: (7, 0, 1, 20),      # SMAP      CPUID.7:EBX.SMAP
    22: (7, 0, 2, 3),       # PKE       CPUID.7:ECX.PKU
    23: (7, 0, 2, 7),       # CET       CPUID.7:ECX.CET_SS
    24: (7, 0, 2, 31),      # PKS       CPUID.7:ECX.PKS
}
CR4_ALWAYS = 1 << 8         # PCE: every CPU with RDPMC
# EFER bit -> CPUID feature; LMA (bit 10) is read-only: a write keeps it.
EFER_FEATURE = {
    0: (0x80000001, 0, 3, 11),    # SCE  CPUID.80000001:EDX.SYSCALL
    8: (0x80000001, 0, 3, 29),    # LME  CPUID.80000001:EDX.LM
    11: (0x80000001, 0, 3, 20),   # NXE  CPUID.80000001:EDX.NX
}


def _table(c):
    return c.cpuid      # every BtCpu has one (engine.py); the engine gives it its model


def _offered(c, feature: tuple[int, int, int, int]) -> bool:
    leaf, sub, reg, bit = feature
    return bool(_table(c).lookup(leaf, sub)[reg] >> bit & 1)


def _allowed(c, features: dict[int, tuple[int, int, int, int]], always: int = 0) -> int:
    t = _table(c)
    mask = always
    for bit, (leaf, sub, reg, fbit) in features.items():
        if t.lookup(leaf, sub)[reg] >> fbit & 1:
            mask |= 1 << bit
    return mask


def cr4_allowed(c) -> int:
    """The CR4 bits this vCPU accepts."""
    return _allowed(c, CR4_FEATURE, CR4_ALWAYS)


def efer_allowed(c) -> int:
    """The EFER bits a WRMSR may set (LMA is accepted and ignored)."""
    return _allowed(c, EFER_FEATURE, EFER_LMA)


def maxphyaddr(c) -> int:
    """Physical-address width: CPUID.80000008:EAX[7:0], else 36 (SDM 4.1.4)."""
    t = _table(c)
    if t.lookup(0x80000000, 0)[0] >= 0x80000008:
        width = t.lookup(0x80000008, 0)[0] & 0xFF
        if width:
            return width
    return 36


def xcr0_allowed(c) -> int:
    """XCR0 bits XSETBV accepts: CPUID.(EAX=0DH,ECX=0):EDX:EAX when XSAVE is
    offered; x87 and SSE (what fxsave.py saves) when it is not."""
    if not _offered(c, CR4_FEATURE[18]):
        return XCR0_X87 | XCR0_SSE
    a, _b, _c, d = _table(c).lookup(0xD, 0)
    return a | d << 32


def _gp() -> GuestFault:
    return GuestFault(GP, 0)


def check_cr0(c, v: int) -> None:
    """MOV to CR0: #GP(0) for bits 63:32, PG without PE, NW without CD,
    clearing PG in 64-bit mode, PG with EFER.LME but not CR4.PAE, WP
    cleared while CR4.CET is set."""
    if v >> 32:
        raise _gp()
    if v & CR0_PG and not v & CR0_PE:
        raise _gp()
    if v & CR0_NW and not v & CR0_CD:
        raise _gp()
    if not v & CR0_PG and c.efer & EFER_LMA and c.mode[0] == 64:
        raise _gp()
    if v & CR0_PG and not c.cr0 & CR0_PG and c.efer & EFER_LME and not c.cr4 & CR4_PAE:
        raise _gp()
    if not v & CR0_WP and c.cr4 & CR4_CET:
        raise _gp()


def check_cr3(c, v: int) -> None:
    """MOV to CR3 in 64-bit mode: #GP(0) for bits at or above MAXPHYADDR
    (bit 63 is the no-flush hint only with CR4.PCIDE)."""
    if c.mode[0] != 64:
        return
    if c.cr4 & CR4_PCIDE:
        v &= ~(1 << 63)
    if v >> maxphyaddr(c):
        raise _gp()


def check_cr4(c, v: int) -> None:
    """MOV to CR4: #GP(0) for a reserved bit or one whose feature CPUID does
    not offer, for clearing PAE or changing LA57 in long mode, for PCIDE
    set outside long mode or with CR3[11:0] != 0, and for CET without CR0.WP."""
    if v & ~cr4_allowed(c):
        raise _gp()
    if c.efer & EFER_LMA:
        if not v & CR4_PAE or (v ^ c.cr4) & CR4_LA57:
            raise _gp()
    if v & CR4_PCIDE and not c.cr4 & CR4_PCIDE:
        if not c.efer & EFER_LMA or c.cr3 & 0xFFF:
            raise _gp()
    if v & CR4_CET and not c.cr0 & CR0_WP:
        raise _gp()


def check_cr8(v: int) -> None:
    """MOV to CR8: bits 63:4 are reserved."""
    if v >> 4:
        raise _gp()


def check_efer(c, v: int) -> None:
    """WRMSR to EFER: #GP(0) for a reserved or not-offered bit, or for a
    change of LME while paging is on."""
    if v & ~efer_allowed(c):
        raise _gp()
    if (v ^ c.efer) & EFER_LME and c.cr0 & CR0_PG:
        raise _gp()


def check_xcr0(c, v: int) -> None:
    """XSETBV to XCR0: #GP(0) for a bit the CPU does not support, x87 clear,
    AVX without SSE, the AVX-512 bits not all together or without AVX, and
    the MPX bits not together."""
    if v & ~xcr0_allowed(c) or not v & XCR0_X87:
        raise _gp()
    if v & XCR0_AVX and not v & XCR0_SSE:
        raise _gp()
    if v & XCR0_AVX512 and (v & XCR0_AVX512 != XCR0_AVX512 or not v & XCR0_AVX):
        raise _gp()
    if bool(v & XCR0_BNDREGS) != bool(v & XCR0_BNDCSR):
        raise _gp()


def canonical(v: int) -> bool:
    """True for a canonical 48-bit address (4-level paging)."""
    return v < 1 << 47 or v >= 0xFFFF800000000000
