"""KVM's ioctl numbers and structures (include/uapi/linux/kvm.h, x86), as ctypes data."""

from __future__ import annotations

import ctypes
import struct

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (KVMIO << 8) | nr


class Regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                   "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SEGMENT_FIELDS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class Sregs(ctypes.Structure):
    _fields_ = ([(n, Segment) for n in SEGMENT_FIELDS]
                + [("gdt", DTable), ("idt", DTable)]
                + [(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * 4)])


class CpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


def cpuid2_type(n: int) -> type:
    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", CpuidEntry2 * n)]
    return Cpuid2


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def msrs_type(n: int) -> type:
    class Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", MsrEntry * n)]
    return Msrs


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


MEM_LOG_DIRTY_PAGES = 1   # kvm_userspace_memory_region.flags


class IrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class Msi(ctypes.Structure):
    """struct kvm_msi: an MSI write to inject (KVM_SIGNAL_MSI)."""
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


class IoEventFd(ctypes.Structure):
    """struct kvm_ioeventfd: a guest write of `len` bytes at `addr` signals `fd`."""
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


IOEVENTFD_FLAG_DATAMATCH = 1 << 0      # signal only when the value written equals datamatch
IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class IrqFd(ctypes.Structure):
    """struct kvm_irqfd: a write to `fd` raises GSI `gsi`; with
    IRQFD_FLAG_RESAMPLE the GSI is level-triggered: KVM lowers it at the
    guest's EOI and then signals `resamplefd`."""
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


IRQFD_FLAG_DEASSIGN = 1 << 0
IRQFD_FLAG_RESAMPLE = 1 << 1


class IrqRoutingEntry(ctypes.Structure):
    """struct kvm_irq_routing_entry: type 1 (irqchip: chip, pin) or 2 (MSI:
    address_lo, address_hi, data) in u."""
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", u32 * 8)]


IRQ_ROUTING_IRQCHIP, IRQ_ROUTING_MSI = 1, 2
IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2


def irq_routing_type(n: int) -> type:
    """struct kvm_irq_routing with n entries."""
    class IrqRouting(ctypes.Structure):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", IrqRoutingEntry * n)]
    return IrqRouting


class PitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class Translation(ctypes.Structure):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class Fpu(ctypes.Structure):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", u8 * 256),
                ("mxcsr", u32), ("pad2", u32)]


class VcpuEvents(ctypes.Structure):
    _fields_ = [("raw", u8 * 64)]


# System ioctls
GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# VM ioctls
CREATE_VCPU = _io(0x41)
SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(DirtyLog))
SET_TSS_ADDR = _io(0x47)
SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
CREATE_IRQCHIP = _io(0x60)
IRQ_LINE = _iow(0x61, ctypes.sizeof(IrqLevel))
SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(Msi))
IOEVENTFD = _iow(0x79, ctypes.sizeof(IoEventFd))
IRQFD = _iow(0x76, ctypes.sizeof(IrqFd))
SET_GSI_ROUTING = _iow(0x6A, 8)               # struct kvm_irq_routing header; entries follow
CREATE_PIT2 = _iow(0x77, ctypes.sizeof(PitConfig))
ENABLE_CAP = _iow(0xA3, ctypes.sizeof(EnableCap))
# vCPU ioctls
RUN = _io(0x80)
GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
TRANSLATE = _iowr(0x85, ctypes.sizeof(Translation))
GET_MSRS = _iowr(0x88, 8)
SET_MSRS = _iow(0x89, 8)
GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
SET_CPUID2 = _iow(0x90, 8)
GET_MP_STATE = _ior(0x98, 4)
SET_MP_STATE = _iow(0x99, 4)
GET_XSAVE = _ior(0xA4, 4096)
SET_XSAVE = _iow(0xA5, 4096)
GET_XCRS = _ior(0xA6, 392)
SET_XCRS = _iow(0xA7, 392)
XSAVE_AREA_SIZE = 4096  # what KVM_GET_XSAVE transfers (KVM_CAP_XSAVE2 reports more where AMX is on)


class DebugRegs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


GET_DEBUGREGS = _ior(0xA1, ctypes.sizeof(DebugRegs))
SET_DEBUGREGS = _iow(0xA2, ctypes.sizeof(DebugRegs))
GET_VCPU_EVENTS = _ior(0x9F, 64)
SET_VCPU_EVENTS = _iow(0xA0, 64)

# Capabilities
CAP_IRQCHIP = 0
CAP_HLT = 1
CAP_IRQ_ROUTING, CAP_IRQFD, CAP_IOEVENTFD = 25, 32, 36
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_EXT_CPUID = 7
CAP_NR_VCPUS = 9
CAP_PIT2 = 33
CAP_SET_IDENTITY_MAP_ADDR = 37
CAP_MAX_VCPUS = 66
CAP_SYNC_REGS = 74
CAP_IMMEDIATE_EXIT = 136
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_XSAVE2 = 208

# Exit reasons
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
EXIT_NAMES = {0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt", 6: "mmio",
              7: "irq-window", 8: "shutdown", 9: "fail-entry", 10: "intr", 17: "internal-error",
              24: "system-event"}
INTERNAL_ERROR_EMULATION = 1
INTERNAL_ERROR_SUBERRORS = {1: "emulation failure", 2: "simultaneous exception",
                            3: "delivery event", 4: "unexpected exit reason"}
SYSTEM_EVENT_SHUTDOWN, SYSTEM_EVENT_RESET, SYSTEM_EVENT_CRASH = 1, 2, 3

IO_IN, IO_OUT = 0, 1
MP_STATE_RUNNABLE, MP_STATE_UNINITIALIZED = 0, 1
PIT_SPEAKER_DUMMY = 1
SYNC_X86_REGS, SYNC_X86_SREGS, SYNC_X86_EVENTS = 1, 2, 4

# struct kvm_run: fixed header, then the exit union at RUN_UNION.
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IF_FLAG = 13
RUN_UNION = 32
RUN_VALID_REGS = 288
RUN_DIRTY_REGS = 296
RUN_SYNC_REGS = 304
IO_EXIT = struct.Struct("<BBHIQ")          # direction, size, port, count, data_offset
# exit_reason (at 8) and the I/O fields (at RUN_UNION) in one unpack from offset 0
IO_EXIT_WITH_REASON = struct.Struct("<8xI20xBBHIQ")
MMIO_EXIT = struct.Struct("<Q8sIB")        # phys_addr, data, len, is_write
INTERNAL_EXIT = struct.Struct("<II")       # suberror, ndata
EMULATION_FAILURE = struct.Struct("<IIQB15s")  # suberror, ndata, flags, insn_size, insn_bytes
SYSTEM_EVENT = struct.Struct("<II")        # type, ndata
FAIL_ENTRY = struct.Struct("<QI")          # hardware reason, cpu
