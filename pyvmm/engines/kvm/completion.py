"""Completing instructions KVM could not emulate (KVM_EXIT_INTERNAL_ERROR).

Some hosts emulate guest kernel mode in software (kvm_pvm) and give up on
instructions such as `lock cmpxchg16b`, `xrstor` or a kernel-mode `int3`.
pyvmm then reads the vCPU's state, executes the one instruction itself and
resumes KVM:
- the XSAVE family against KVM's copy of the FPU state (xsave.py);
- everything else on the bt engine's single-instruction path, which shares
  GuestMemory with KVM and delivers any exception the instruction raises
  (int3 becomes #BP through the guest's IDT)."""

from __future__ import annotations

import ctypes
import logging
import struct
import threading

import iced_x86 as iced

from ...cpu import CpuState
from . import abi, state, xsave
from .device import KvmVcpu, ioctl

log = logging.getLogger(__name__)

_XRSTOR = {iced.Mnemonic.XRSTOR, iced.Mnemonic.XRSTOR64, iced.Mnemonic.XRSTORS, iced.Mnemonic.XRSTORS64}
_XSAVE_STD = {iced.Mnemonic.XSAVE, iced.Mnemonic.XSAVE64, iced.Mnemonic.XSAVEOPT, iced.Mnemonic.XSAVEOPT64}
_XSAVE_CMP = {iced.Mnemonic.XSAVEC, iced.Mnemonic.XSAVEC64, iced.Mnemonic.XSAVES, iced.Mnemonic.XSAVES64}

# iced register -> kvm_regs field, for effective addresses.
_GPR64 = {getattr(iced.Register, n.upper()): n for n in
          ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")}
_GPR32 = {getattr(iced.Register, f"E{n[1:].upper()}" if n[1:] in ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di")
                  else f"{n.upper()}D"): n for n in _GPR64.values()}
_SEG = {iced.Register.ES: "es", iced.Register.CS: "cs", iced.Register.SS: "ss",
        iced.Register.DS: "ds", iced.Register.FS: "fs", iced.Register.GS: "gs"}
_MNEMONIC_NAMES = {v: k for k, v in vars(iced.Mnemonic).items() if not k.startswith("_") and isinstance(v, int)}


def _overlay_legacy(buf: bytearray, fxsave_image: bytes) -> None:
    """Puts the live x87/SSE registers (state.save's FXSAVE image) into an
    XSAVE buffer's legacy region: KVM's XSAVE header can call SSE "initial"
    (and the buffer zeros) after KVM_SET_FPU wrote the registers."""
    buf[0:24] = fxsave_image[0:24]
    buf[24:28] = fxsave_image[24:28]  # MXCSR (MXCSR_MASK stays KVM's)
    buf[32:416] = fxsave_image[32:416]


class CompletionError(Exception):
    """The instruction could not be completed by pyvmm either."""


class Completer:
    """Completes failed instructions for one KVM engine. vCPUs complete one at
    a time, so a completed `lock cmpxchg16b` is atomic against other
    completions; it is not against a vCPU running inside KVM at that instant
    (with one vCPU, or Linux's use of it on per-CPU data, that never matters)."""

    def __init__(self, engine):
        self.engine = engine
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._comps = xsave.components_from_cpuid(engine.kvm.supported_cpuid())

    def complete(self, vcpu: KvmVcpu, insn: bytes) -> None:
        """Executes the instruction at the vCPU's RIP. Raises CompletionError."""
        with self._lock:
            st = state.save(vcpu)
            bitness = 64 if st.cs.l else (32 if st.cs.db else 16)
            if len(insn) < 15:
                insn = (insn + self.engine.read_guest_virtual(vcpu, st.cs.base + st.rip + len(insn), 15 - len(insn)))
            instr = iced.Decoder(bitness, insn, ip=st.rip).decode()
            if instr.code == iced.Code.INVALID:
                raise CompletionError(f"undecodable bytes {insn.hex(' ')}")
            name = _MNEMONIC_NAMES.get(instr.mnemonic, str(instr.mnemonic)).lower()
            if instr.mnemonic in _XRSTOR or instr.mnemonic in _XSAVE_STD or instr.mnemonic in _XSAVE_CMP:
                self._xsave_family(vcpu, st, instr)
            else:
                self._via_translator(vcpu, st)
            self.counts[name] = self.counts.get(name, 0) + 1

    # -- the translator's single-instruction path ---------------------------
    def _via_translator(self, vcpu: KvmVcpu, st: CpuState) -> None:
        """One instruction on a fresh translator vCPU: GPRs, segments, control
        registers and MSRs through CpuState, x87/SSE through its FXSAVE image
        (the kernel's SIMD code is what KVM fails on most)."""
        from ..bt.engine import BtCpu
        from ..bt.fxstate import from_fxsave, to_fxsave
        m = self.engine.machine
        cpu = BtCpu(m.memory, m.io_bus, m.mmio_bus)
        try:
            cpu.load(st)
            if st.fxsave is not None:
                from_fxsave(cpu, st.fxsave)
            cpu.execute_one()
            new = cpu.save()
            image = to_fxsave(cpu)
            new.fxsave = image if image != st.fxsave else None  # untouched FPU: no FPU ioctls
            state.load(vcpu, new, boot_msrs=False)
        finally:
            cpu.detach()

    # -- XSAVE family ---------------------------------------------------------
    def _xsave_family(self, vcpu: KvmVcpu, st: CpuState, instr: iced.Instruction) -> None:
        xcr0 = self._xcr0(vcpu)
        rfbm = xcr0 & ((st.regs["rdx"] & 0xFFFFFFFF) << 32 | (st.regs["rax"] & 0xFFFFFFFF))
        addr = self._effective_address(st, instr)
        kvm_buf = bytearray(abi.XSAVE_AREA_SIZE)
        raw = (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(kvm_buf)
        ioctl(vcpu.fd, abi.GET_XSAVE, raw)
        if st.fxsave is not None:
            _overlay_legacy(kvm_buf, st.fxsave)
        if instr.mnemonic in _XRSTOR:
            compacted = instr.mnemonic in (iced.Mnemonic.XRSTORS, iced.Mnemonic.XRSTORS64)
            header = self._read(vcpu, addr + xsave.HEADER_OFFSET, 16)
            xcomp_bv = struct.unpack("<QQ", header)[1]
            size = xsave.area_size(self._comps, xcomp_bv & ~xsave.COMPACTED if xcomp_bv & xsave.COMPACTED else rfbm,
                                   bool(xcomp_bv & xsave.COMPACTED) or compacted)
            area = self._read(vcpu, addr, size)
            new = xsave.xrstor(kvm_buf, area, rfbm, self._comps)
            ioctl(vcpu.fd, abi.SET_XSAVE, (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(new))
        else:
            compacted = instr.mnemonic in _XSAVE_CMP
            size = xsave.area_size(self._comps, rfbm, compacted)
            area = self._read(vcpu, addr, size)
            self._write(vcpu, addr, xsave.xsave(kvm_buf, area, rfbm, self._comps, compacted))
        regs = vcpu.get_regs()
        regs.rip += instr.len
        vcpu.set_regs(regs)

    def _xcr0(self, vcpu: KvmVcpu) -> int:
        buf = (ctypes.c_uint8 * 392)()
        ioctl(vcpu.fd, abi.GET_XCRS, buf)
        nr = struct.unpack_from("<I", buf, 0)[0]
        for i in range(nr):
            xcr, _, value = struct.unpack_from("<IIQ", buf, 8 + 16 * i)
            if xcr == 0:
                return value
        return 3

    @staticmethod
    def _effective_address(st: CpuState, instr: iced.Instruction) -> int:
        """Linear address of the memory operand (iced already resolves RIP-relative ones)."""
        ea = instr.memory_displacement
        base, idx = instr.memory_base, instr.memory_index
        if base not in (iced.Register.NONE, iced.Register.RIP, iced.Register.EIP):
            ea += st.regs[_GPR64.get(base) or _GPR32[base]]
        if idx != iced.Register.NONE:
            ea += st.regs[_GPR64.get(idx) or _GPR32[idx]] * instr.memory_index_scale
        seg = _SEG.get(instr.memory_segment, "ds")
        if st.cs.l:  # long mode: only FS and GS have bases
            return (ea + (getattr(st, seg).base if seg in ("fs", "gs") else 0)) & (2**64 - 1)
        return (getattr(st, seg).base + (ea & 0xFFFFFFFF)) & 0xFFFFFFFF

    def _read(self, vcpu: KvmVcpu, addr: int, size: int) -> bytes:
        data = self.engine.read_guest_virtual(vcpu, addr, size)
        if len(data) != size:
            raise CompletionError(f"guest address 0x{addr:x}+{size} is not mapped")
        return data

    def _write(self, vcpu: KvmVcpu, addr: int, data: bytes) -> None:
        mem = self.engine.machine.memory
        done = 0
        while done < len(data):
            phys = vcpu.translate(addr + done)
            if phys is None:
                raise CompletionError(f"guest address 0x{addr + done:x} is not mapped")
            chunk = min(len(data) - done, 0x1000 - ((addr + done) & 0xFFF))
            mem.write(phys, data[done:done + chunk])
            done += chunk
