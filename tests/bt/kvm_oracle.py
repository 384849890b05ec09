"""KvmOracle: the real CPU as a differential-test oracle.

The snippet runs at CPL3 in a tiny 64-bit KVM guest. On this host (kvm_pvm)
guest user-mode code executes natively on the host CPU, so what comes back is
what the silicon does; the few CPL0 instructions of the exception handlers
are emulated by the host kernel.

Guest physical layout (one memory slot, identity-mapped):

    0x1000 GDT   0x2000 IDT   0x3000 TSS   0x4000 handler stubs
    0x5000 the vector slot the stubs write
    0x8000 PML4  0x9000 PDPT  0xA000 PD (0-2M: a supervisor 2 MiB page)
    0xB000 PT    (2-4M: user 4 KiB pages, so set_page can unmap or protect one)
    0x20000..    one more PML4/PDPT/PD/PT chain per set of page flags (_cr3)
    0x1F000 top of the CPL0 stack (TSS.RSP0)
    harness.CODE_ADDR code, harness.DATA_ADDR data, harness.STACK_TOP stack (user)

The snippet is followed by `int3` (`ud2` in compatibility mode); every vector's handler stores its vector
number in the slot and executes `hlt`, which (no in-kernel irqchip) returns
KVM_EXIT_HLT. The GPRs other than RSP are untouched by the handler; RIP,
RFLAGS and the user RSP come from the interrupt frame on the CPL0 stack.
One VM and vCPU serve every run: a run rewrites memory and registers."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import sys

from pyvmm.cpu import GPR_NAMES
from pyvmm.engines.kvm import abi
from pyvmm.engines.kvm.device import Kvm, _ioctl
from pyvmm.errors import EngineError

import harness

# Reach the repo's `tests` package also when tests/bt/test_diff_kvm.py runs as a script.
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests import hostfacts  # noqa: E402

MEM_SIZE = 4 << 20
GDT, IDT, TSS, STUBS, SLOT = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
PML4, PDPT, PD, PT = 0x8000, 0x9000, 0xA000, 0xB000
CHAINS = 0x20000      # further page-table chains, 16 KiB each (set_page)
USER_BASE = 0x200000
KSTACK_TOP = 0x1F000
NVEC = 32
STUB_SIZE = 16
NO_VECTOR = 0xFFFFFFFF
# Selectors: kernel code/data, then user data/code (the SYSRET order), TSS.
KCODE, KDATA, UDATA, UCODE, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
# User code segments for compatibility mode (after the 16-byte TSS descriptor).
UCODE32, UCODE16 = 0x3B, 0x43
BP = 3
WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_P, _W, _U, _PS = 1, 2, 4, 0x80
USER_PAGE = _P | _W | _U
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
_KVM_REG_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
# Index into harness regs (GPR_NAMES order) for each KVM register slot.
_FROM_HARNESS = [GPR_NAMES.index(n) for n in _KVM_REG_ORDER[:16]]


def kvm_usable() -> str | None:
    """None when KVM can run the oracle here, else the host fact that stops it
    (tests/hostfacts.py: the one check every KVM test shares)."""
    return hostfacts.kvm_missing()


def _segment(selector: int, code: bool, dpl: int, bits: int = 64) -> abi.Segment:
    return abi.Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=0xB if code else 0x3,
                       present=1, dpl=dpl, db=0 if code and bits != 32 else 1, s=1,
                       l=1 if code and bits == 64 else 0, g=1)


def _descriptor(seg: abi.Segment) -> int:
    access = seg.type | (seg.s << 4) | (seg.dpl << 5) | (seg.present << 7)
    flags = (seg.l << 1) | (seg.db << 2) | (seg.g << 3)
    return 0xFFFF | (access << 40) | (0xF << 48) | (flags << 52)


def _tss_descriptor(base: int, limit: int) -> tuple[int, int]:
    lo = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40)
          | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
    return lo, base >> 32


def _gate(handler: int, dpl: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE) to KCODE:handler."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, KCODE, 0, 0x80 | (dpl << 5) | 0xE,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


def _stub(vector: int) -> bytes:
    """mov dword [SLOT], vector ; hlt ; jmp $ (padded)."""
    code = b"\xC7\x04\x25" + struct.pack("<Ii", SLOT, vector) + b"\xF4" + b"\xEB\xFE"
    return code.ljust(STUB_SIZE, b"\xCC")


class KvmOracle:
    """Runs snippets at CPL3 on the host CPU through KVM (harness interface).

    Raises EngineError from the constructor when KVM cannot be opened or set up."""

    def __init__(self, path: str = "/dev/kvm", avx_state: bool = False):
        self.kvm = Kvm(path)
        self.vm = self.kvm.create_vm()
        self.mem = mmap.mmap(-1, MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        host = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.vm.add_memory(0, MEM_SIZE, host)
        self.vcpu = self.vm.create_vcpu(0)
        self._fd = self.vcpu.fd
        if avx_state:
            self._enable_avx_state()
        self._run_mm = self.vcpu.run_mm
        self._write_tables()
        self.sregs = self._sregs()
        self.regs = abi.Regs()
        self.end_marker = b"\xCC"
        self.runs = 0

    # -- setup ------------------------------------------------------------------
    def _write_tables(self) -> None:
        m = self.mem
        kcode, kdata = _segment(KCODE, True, 0), _segment(KDATA, False, 0)
        udata, ucode = _segment(UDATA, False, 3), _segment(UCODE, True, 3)
        tss_lo, tss_hi = _tss_descriptor(TSS, 0x67)
        gdt = [0, _descriptor(kcode), _descriptor(kdata), _descriptor(udata), _descriptor(ucode), tss_lo, tss_hi,
               _descriptor(_segment(UCODE32, True, 3, 32)), _descriptor(_segment(UCODE16, True, 3, 16))]
        m[GDT:GDT + 8 * len(gdt)] = struct.pack(f"<{len(gdt)}Q", *gdt)
        for v in range(NVEC):
            h = STUBS + v * STUB_SIZE
            m[IDT + 16 * v:IDT + 16 * v + 16] = _gate(h, 3 if v == BP else 0)
            m[h:h + STUB_SIZE] = _stub(v)
        # 64-bit TSS: RSP0 at offset 4, I/O map base beyond the limit (no bitmap).
        m[TSS:TSS + 0x68] = struct.pack("<IQ", 0, KSTACK_TOP).ljust(0x66, b"\0") + struct.pack("<H", 0x68)
        self._pages: dict[int, int] = {}
        self._chains = {frozenset(): PML4}
        self._write_chain(PML4, {})

    def set_page(self, linear: int, flags: int) -> None:
        """Sets the PTE flags (P, RW, US; 0 unmaps) of the user 4 KiB page
        holding `linear` for the next runs."""
        index = (linear - USER_BASE) >> 12
        if not 0 <= index < 512:
            raise ValueError(f"{linear:#x} is not in the user 2 MiB at {USER_BASE:#x}")
        if flags == USER_PAGE:
            self._pages.pop(index, None)
        else:
            self._pages[index] = flags

    def reset_pages(self) -> None:
        """Maps every user page present, writable and user-accessible again."""
        self._pages = {}

    def _cr3(self) -> int:
        """The CR3 of a page-table chain for the current page flags. KVM's
        shadow paging (kvm_pvm) does not see host writes to guest page tables,
        so a chain, once used, never changes: each set of flags gets its own
        PML4/PDPT/PD/PT, and a new CR3 makes KVM load it."""
        key = frozenset(self._pages.items())
        cr3 = self._chains.get(key)
        if cr3 is None:
            cr3 = CHAINS + 0x4000 * len(self._chains)
            if cr3 + 0x4000 > USER_BASE:
                raise EngineError("oracle: too many page-flag sets")
            self._write_chain(cr3, self._pages)
            self._chains[key] = cr3
        return cr3

    def _write_chain(self, pml4: int, pages: dict[int, int]) -> None:
        m = self.mem
        pdpt, pd, pt = pml4 + 0x1000, pml4 + 0x2000, pml4 + 0x3000
        m[pml4:pml4 + 0x1000] = struct.pack("<Q", pdpt | _P | _W | _U).ljust(0x1000, b"\0")
        m[pdpt:pdpt + 0x1000] = struct.pack("<Q", pd | _P | _W | _U).ljust(0x1000, b"\0")
        m[pd:pd + 0x1000] = struct.pack("<QQ", 0 | _P | _W | _PS, pt | _P | _W | _U).ljust(0x1000, b"\0")
        m[pt:pt + 0x1000] = struct.pack("<512Q", *[(USER_BASE + (i << 12)) | pages.get(i, USER_PAGE)
                                                  for i in range(512)])

    def set_code_bits(self, bits: int) -> None:
        """Runs later snippets in a 64-bit code segment, or in a 32- or
        16-bit one (compatibility mode) at CPL3. 16-bit code runs with CS
        based at the code and DS/ES/SS at the data (harness.CODE16_BASES),
        so 16-bit offsets reach them."""
        self.sregs.cs = _segment({64: UCODE, 32: UCODE32, 16: UCODE16}[bits], True, 3, bits)
        cs_base, data_base = harness.CODE16_BASES if bits == 16 else (0, 0)
        self.sregs.cs.base = cs_base
        for name in ("ds", "es", "ss"):
            getattr(self.sregs, name).base = data_base
        # kvm_pvm reports int3 in compatibility mode as #UD, and 16-bit #UD
        # and #BP (KVM's emulator there fetches without the CS base) as #PF:
        # the end is int3, ud2 or, for 16-bit code, hlt (#GP at CPL3).
        self.end_marker = {64: b"\xCC", 32: b"\x0F\x0B", 16: b"\xF4"}[bits]

    def _sregs(self) -> abi.Sregs:
        s = self.vcpu.get_sregs()
        ucode, udata = _segment(UCODE, True, 3), _segment(UDATA, False, 3)
        s.cs = ucode
        for name in ("ds", "es", "ss", "fs", "gs"):
            setattr(s, name, _segment(UDATA, False, 3))
        s.ss = udata
        s.tr = abi.Segment(base=TSS, limit=0x67, selector=TSS_SEL, type=0xB, present=1, s=0)
        s.ldt = abi.Segment(selector=0, type=0x2, present=1, s=0, limit=0xFFFF, unusable=1)
        s.gdt.base, s.gdt.limit = GDT, 9 * 8 - 1
        s.idt.base, s.idt.limit = IDT, NVEC * 16 - 1
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        s.cr3 = PML4
        s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        s.efer = EFER_LME | EFER_LMA
        return s

    def close(self) -> None:
        """Releases the vCPU, the VM and guest memory."""
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.mem.close()

    # -- one run ----------------------------------------------------------------
    def run(self, code: bytes, regs: list[int], rflags: int, data: bytes) -> harness.Outcome:
        """Runs `code` (then int3) from the given state; returns the state at
        the end or at the first exception the snippet raised.

        Raises EngineError when KVM fails or the guest exits unexpectedly."""
        m = self.mem
        start = harness.CODE_ADDR
        end = start + len(code)
        m[start:end + len(self.end_marker)] = code + self.end_marker
        m[harness.DATA_ADDR:harness.DATA_ADDR + len(data)] = data
        m[SLOT:SLOT + 4] = struct.pack("<I", NO_VECTOR)
        r = self.regs
        for name, i in zip(_KVM_REG_ORDER, _FROM_HARNESS):
            setattr(r, name, regs[i])
        base = self.sregs.cs.base
        r.rip, r.rflags = start - base, rflags
        self.sregs.cr3 = self._cr3()
        self.vcpu.set_sregs(self.sregs)
        self.vcpu.set_regs(r)
        reason = self._enter()
        self.runs += 1
        out = self.vcpu.get_regs()
        if reason == abi.EXIT_SHUTDOWN:
            values = [getattr(out, n) for n in GPR_NAMES]
            return harness.Outcome(values, out.rflags, bytes(m[harness.DATA_ADDR:harness.DATA_ADDR + len(data)]),
                                   -1, out.rip)
        if reason != abi.EXIT_HLT:
            raise EngineError(f"oracle: unexpected KVM exit {abi.EXIT_NAMES.get(reason, reason)} at rip={out.rip:#x}")
        vector = struct.unpack_from("<I", m, SLOT)[0]
        if vector == NO_VECTOR:
            raise EngineError(f"oracle: hlt without a vector at rip={out.rip:#x}")
        frame = out.rsp + (8 if vector in WITH_ERROR_CODE else 0)
        rip, _cs, rf, rsp, _ss = struct.unpack_from("<5Q", m, frame)
        values = [getattr(out, n) for n in GPR_NAMES]
        values[4] = rsp
        after = bytes(m[harness.DATA_ADDR:harness.DATA_ADDR + len(data)])
        end -= base
        if (vector, rip) in ((BP, end + 1), ({b"\x0F\x0B": 6, b"\xF4": 13}.get(self.end_marker), end)):
            return harness.Outcome(values, rf, after, None, end)
        outcome = harness.Outcome(values, rf, after, vector, rip)
        if vector in WITH_ERROR_CODE:
            outcome.error_code = struct.unpack_from("<Q", m, out.rsp)[0]
        if vector == 14:   # the handler stub leaves CR2 alone
            outcome.cr2 = self.vcpu.get_sregs().cr2
        return outcome

    def _enable_avx_state(self) -> None:
        """Gives the vCPU the host's CPUID and XCR0 = x87|SSE|AVX, so that
        KVM_GET_XSAVE carries the YMM upper halves (vector_state).  Must run
        before the first KVM_RUN (KVM refuses CPUID changes after it)."""
        self.vcpu.set_cpuid(self.kvm.supported_cpuid())
        buf = bytearray(392)
        struct.pack_into("<IIIIQ", buf, 0, 1, 0, 0, 0, 7)    # nr_xcrs, flags, {xcr 0, value 7}
        if _ioctl(self._fd, abi.SET_XCRS, ctypes.addressof((ctypes.c_uint8 * len(buf)).from_buffer(buf))) < 0:
            raise EngineError(f"oracle: KVM_SET_XCRS: {errno.errorcode.get(ctypes.get_errno())}")

    def vector_state(self) -> tuple[list[int], int]:
        """The 16 YMM registers (256-bit ints) and MXCSR as the last run left
        them, from KVM_GET_XSAVE's standard layout: XMM at 160, MXCSR at 24,
        bits 255:128 of YMM at 576 (its AVX component)."""
        buf = bytearray(abi.XSAVE_AREA_SIZE)
        if _ioctl(self._fd, abi.GET_XSAVE, ctypes.addressof((ctypes.c_uint8 * len(buf)).from_buffer(buf))) < 0:
            raise EngineError(f"oracle: KVM_GET_XSAVE: {errno.errorcode.get(ctypes.get_errno())}")
        ymm = [int.from_bytes(buf[160 + 16 * i:176 + 16 * i], "little")
               | int.from_bytes(buf[576 + 16 * i:592 + 16 * i], "little") << 128 for i in range(16)]
        return ymm, struct.unpack_from("<I", buf, 24)[0]

    def _enter(self) -> int:
        while True:
            if _ioctl(self._fd, abi.RUN, None) < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    continue
                raise EngineError(f"oracle: KVM_RUN: {errno.errorcode.get(err, err)}")
            reason = struct.unpack_from("<I", self._run_mm, abi.RUN_EXIT_REASON)[0]
            if reason != abi.EXIT_INTR:
                return reason
