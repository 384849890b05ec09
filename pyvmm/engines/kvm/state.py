"""Converting between pyvmm's CpuState and KVM's register structures."""

from __future__ import annotations

import ctypes
import struct

from ...cpu import GPR_NAMES, CpuState, DescriptorTable, Segment
from ...errors import EngineError
from . import abi
from .device import KvmVcpu, ioctl

_SEG_ATTRS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")

# MSRs a vCPU's state includes (Linux's syscall setup, TSC, PAT, MTRR default).
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_MISC_ENABLE = 0x1A0
MSR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
MSR_TSC = 0x10
STATE_MSRS = (MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_PAT, MSR_STAR, MSR_LSTAR,
              MSR_CSTAR, MSR_FMASK, MSR_KERNEL_GS_BASE, MSR_MISC_ENABLE, MSR_MTRR_DEF_TYPE)
# What a freshly reset PC has: fast strings on, MTRRs enabled with write-back default.
BOOT_MSRS = {MSR_MISC_ENABLE: 1, MSR_MTRR_DEF_TYPE: (1 << 11) | 6}


def _to_kvm_segment(seg: Segment) -> abi.Segment:
    return abi.Segment(**{a: getattr(seg, a) for a in _SEG_ATTRS})


def _from_kvm_segment(k: abi.Segment) -> Segment:
    return Segment(**{a: getattr(k, a) for a in _SEG_ATTRS})


def load(vcpu: KvmVcpu, st: CpuState, boot_msrs: bool = True) -> None:
    """Writes the whole CpuState into a KVM vCPU (with the reset values of
    MSRs a fresh PC has, unless boot_msrs is False)."""
    sregs = vcpu.get_sregs()  # keeps apic_base and the interrupt bitmap
    for name in CpuState.SEGMENT_NAMES:
        setattr(sregs, name, _to_kvm_segment(getattr(st, name)))
    sregs.gdt.base, sregs.gdt.limit = st.gdt.base, st.gdt.limit
    sregs.idt.base, sregs.idt.limit = st.idt.base, st.idt.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer = (
        st.cr0, st.cr2, st.cr3, st.cr4, st.cr8, st.efer)
    vcpu.set_sregs(sregs)
    regs = abi.Regs()
    for name in GPR_NAMES:
        setattr(regs, name, st.regs.get(name, 0))
    regs.rip, regs.rflags = st.rip, st.rflags
    vcpu.set_regs(regs)
    msrs = dict(BOOT_MSRS) if boot_msrs else {}
    msrs.update(st.msrs)
    if msrs:
        vcpu.set_msrs(msrs)
    if st.xcr0 != XCR0_RESET:
        try:
            set_xcr0(vcpu, st.xcr0)
        except OSError as e:
            raise EngineError(f"KVM refused the guest's XCR0 {st.xcr0:#x}: {e.strerror}") from None
    if st.fxsave is not None:
        set_fxsave(vcpu, st.fxsave, st.ymmh)


def set_fxsave(vcpu: KvmVcpu, image: bytes, ymmh: list[int] | None = None) -> None:
    """Loads an FXSAVE image (and the upper YMM halves, when given) through
    KVM_SET_XSAVE (x87, SSE and AVX marked in use) and KVM_SET_FPU: on this
    host KVM_SET_FPU alone leaves the XSAVE header calling SSE initial, so
    the guest would see zeros."""
    buf = bytearray(abi.XSAVE_AREA_SIZE)
    try:
        ioctl(vcpu.fd, abi.GET_XSAVE, (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(buf))
        buf[0:24] = image[0:24]
        buf[24:28] = image[24:28]
        buf[32:416] = image[32:416]
        xstate_bv = struct.unpack_from("<Q", buf, 512)[0] | 3
        struct.pack_into("<Q", buf, 512, xstate_bv)
        if ymmh is not None:
            put_ymmh(buf, ymmh)
        ioctl(vcpu.fd, abi.SET_XSAVE, (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(buf))
    except OSError:
        pass
    vcpu.set_fpu(fpu_from_fxsave(image))


# -- the AVX state: XCR0 (KVM_GET/SET_XCRS) and YMM_Hi128 in the XSAVE area --
XCR0_RESET = 1
XCR0_AVX = 4
YMMH_OFFSET = 576                # standard-form offset of XSAVE component 2
_XCRS = struct.Struct("<II")     # struct kvm_xcrs: nr_xcrs, flags; then {xcr, reserved, value} x 16


def get_xcr0(vcpu: KvmVcpu) -> int:
    """The vCPU's XCR0 (KVM_GET_XCRS); the reset value where KVM has none."""
    buf = (ctypes.c_uint8 * 392)()
    try:
        ioctl(vcpu.fd, abi.GET_XCRS, buf)
    except OSError:
        return XCR0_RESET
    for i in range(_XCRS.unpack_from(buf, 0)[0]):
        xcr, _, value = struct.unpack_from("<IIQ", buf, 8 + 16 * i)
        if xcr == 0:
            return value
    return XCR0_RESET


def set_xcr0(vcpu: KvmVcpu, value: int) -> None:
    """KVM_SET_XCRS with XCR0 = value. Raises OSError where KVM refuses it
    (a component its CPUID for the vCPU does not offer)."""
    buf = (ctypes.c_uint8 * 392)()
    _XCRS.pack_into(buf, 0, 1, 0)
    struct.pack_into("<IIQ", buf, 8, 0, 0, value)
    ioctl(vcpu.fd, abi.SET_XCRS, buf)


def ymmh_from_xsave(buf: bytes | bytearray) -> list[int]:
    """YMM0-15 bits 255:128 from a standard-form XSAVE area (zeros when its
    XSTATE_BV calls the AVX state initial)."""
    if not struct.unpack_from("<Q", buf, 512)[0] & XCR0_AVX:
        return [0] * 16
    return [int.from_bytes(buf[YMMH_OFFSET + 16 * i:YMMH_OFFSET + 16 * i + 16], "little") for i in range(16)]


def put_ymmh(buf: bytearray, ymmh: list[int]) -> None:
    """Writes YMM0-15 bits 255:128 into a standard-form XSAVE area, marked in use."""
    for i in range(16):
        buf[YMMH_OFFSET + 16 * i:YMMH_OFFSET + 16 * i + 16] = (ymmh[i] & ((1 << 128) - 1)).to_bytes(16, "little")
    struct.pack_into("<Q", buf, 512, struct.unpack_from("<Q", buf, 512)[0] | XCR0_AVX)


# The FXSAVE image's legacy header: FCW, FSW, abridged FTW, FOP, FIP, FDP, MXCSR, MXCSR_MASK.
FXSAVE_HEADER = struct.Struct("<HHBxHQQII")
MXCSR_MASK = 0xFFFF
# FCW 0x37F (all x87 exceptions masked), MXCSR 0x1F80 (all SSE exceptions masked).
RESET_FXSAVE = FXSAVE_HEADER.pack(0x37F, 0, 0, 0, 0, 0, 0x1F80, MXCSR_MASK).ljust(512, b"\0")


def fxsave_from_fpu(f: abi.Fpu) -> bytes:
    """KVM_GET_FPU's registers as a 512-byte FXSAVE image."""
    buf = bytearray(512)
    FXSAVE_HEADER.pack_into(buf, 0, f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp,
                            f.mxcsr, MXCSR_MASK)
    buf[32:160] = bytes(f.fpr)
    buf[160:416] = bytes(f.xmm)
    return bytes(buf)


def fpu_from_fxsave(image: bytes) -> abi.Fpu:
    """A KVM_SET_FPU structure from a 512-byte FXSAVE image."""
    f = abi.Fpu()
    (f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp, f.mxcsr, _) = FXSAVE_HEADER.unpack_from(image, 0)
    ctypes.memmove(f.fpr, bytes(image[32:160]), 128)
    ctypes.memmove(f.xmm, bytes(image[160:416]), 256)
    return f


def save(vcpu: KvmVcpu) -> CpuState:
    """Reads a KVM vCPU's registers back into a CpuState."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    st = CpuState()
    st.regs = {name: getattr(regs, name) for name in GPR_NAMES}
    st.rip, st.rflags = regs.rip, regs.rflags
    for name in CpuState.SEGMENT_NAMES:
        setattr(st, name, _from_kvm_segment(getattr(sregs, name)))
    st.gdt = DescriptorTable(sregs.gdt.base, sregs.gdt.limit)
    st.idt = DescriptorTable(sregs.idt.base, sregs.idt.limit)
    st.cr0, st.cr2, st.cr3, st.cr4, st.cr8, st.efer = (
        sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer)
    st.msrs = vcpu.get_msrs(list(STATE_MSRS))
    st.fxsave = _fxsave(vcpu)
    st.xcr0 = get_xcr0(vcpu)
    buf = bytearray(abi.XSAVE_AREA_SIZE)
    try:
        ioctl(vcpu.fd, abi.GET_XSAVE, (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(buf))
        st.ymmh = ymmh_from_xsave(buf)
    except OSError:
        pass
    return st


def _fxsave(vcpu: KvmVcpu) -> bytes:
    """The vCPU's FXSAVE image. On this host (kvm_pvm) KVM_GET_FPU reads MXCSR
    as 0 always; then MXCSR comes from KVM_GET_XSAVE's legacy region."""
    image = bytearray(fxsave_from_fpu(vcpu.get_fpu()))
    if image[24:28] == bytes(4):
        buf = bytearray(abi.XSAVE_AREA_SIZE)
        try:
            ioctl(vcpu.fd, abi.GET_XSAVE, (ctypes.c_uint8 * abi.XSAVE_AREA_SIZE).from_buffer(buf))
            image[24:28] = buf[24:28]
        except OSError:
            pass
    return bytes(image)


def describe(st: CpuState) -> str:
    """A register dump for crash reports."""
    r = st.regs
    lines = [
        f"RIP={st.rip:016x} RFLAGS={st.rflags:08x} CS={st.cs.selector:04x} SS={st.ss.selector:04x}"
        f" CPL={st.cs.dpl} {'long' if st.long_mode else 'legacy'}",
        " ".join(f"{n.upper()}={r[n]:016x}" for n in GPR_NAMES[:4]),
        " ".join(f"{n.upper()}={r[n]:016x}" for n in GPR_NAMES[4:8]),
        " ".join(f"{n.upper():>3}={r[n]:016x}" for n in GPR_NAMES[8:12]),
        " ".join(f"{n.upper():>3}={r[n]:016x}" for n in GPR_NAMES[12:]),
        f"CR0={st.cr0:08x} CR2={st.cr2:016x} CR3={st.cr3:016x} CR4={st.cr4:08x} EFER={st.efer:x}",
    ]
    return "\n".join(lines)
