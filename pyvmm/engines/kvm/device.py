"""Thin objects over the three kinds of KVM file descriptor: system, VM, vCPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

from ...errors import EngineError
from . import abi

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """ioctl with a ctypes object (passed by reference), an int, or nothing.

    Raises OSError with the errno on failure."""
    if arg is None:
        ret = _ioctl(fd, request, None)
    elif isinstance(arg, int):
        ret = _ioctl(fd, request, ctypes.c_void_p(arg))
    else:
        ret = _ioctl(fd, request, ctypes.byref(arg))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{os.strerror(e)} (ioctl 0x{request:x})")
    return ret


class Kvm:
    """/dev/kvm itself."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EngineError(f"{path} not found: this host has no KVM (try --engine bt)") from None
        except PermissionError:
            raise EngineError(f"{path}: permission denied (run as root or join the kvm group)") from None
        except OSError as e:
            raise EngineError(f"{path}: {e.strerror}") from None
        version = ioctl(self.fd, abi.GET_API_VERSION)
        if version != 12:
            raise EngineError(f"{path}: KVM API version {version}, expected 12")
        self.vcpu_mmap_size = ioctl(self.fd, abi.GET_VCPU_MMAP_SIZE)

    def check(self, cap: int) -> int:
        return ioctl(self.fd, abi.CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[abi.CpuidEntry2]:
        n = 64
        while True:
            buf = abi.cpuid2_type(n)()
            buf.nent = n
            try:
                ioctl(self.fd, abi.GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise EngineError(f"KVM_GET_SUPPORTED_CPUID: {e.strerror}") from None
            return [abi.CpuidEntry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def create_vm(self) -> "KvmVm":
        try:
            fd = ioctl(self.fd, abi.CREATE_VM, 0)
        except OSError as e:
            raise EngineError(f"KVM_CREATE_VM: {e.strerror}") from None
        return KvmVm(self, fd)

    def close(self) -> None:
        os.close(self.fd)


class KvmVm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._next_slot = 0

    def add_memory(self, gpa: int, size: int, host_addr: int) -> int:
        """Maps host memory as a guest memory slot; returns the slot number."""
        region = abi.UserspaceMemoryRegion(self._next_slot, 0, gpa, size, host_addr)
        ioctl(self.fd, abi.SET_USER_MEMORY_REGION, region)
        self._next_slot += 1
        return region.slot

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, abi.SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, abi.SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, abi.CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        ioctl(self.fd, abi.CREATE_PIT2, abi.PitConfig(abi.PIT_SPEAKER_DUMMY))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, abi.IRQ_LINE, abi.IrqLevel(irq, level))

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: how many local APICs took it (0: none, e.g.
        all software-disabled; KVM drops it then)."""
        return ioctl(self.fd, abi.SIGNAL_MSI, abi.Msi(address & 0xFFFFFFFF, address >> 32, data))

    def ioeventfd(self, addr: int, length: int, fd: int, deassign: bool = False,
                  datamatch: int | None = None) -> None:
        """KVM_IOEVENTFD on MMIO: a guest write of `length` bytes at `addr`
        (any value, or only the value `datamatch`) signals eventfd `fd` in
        the kernel, with no exit to pyvmm. Raises OSError."""
        flags = abi.IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        if datamatch is not None:
            flags |= abi.IOEVENTFD_FLAG_DATAMATCH
        ioctl(self.fd, abi.IOEVENTFD, abi.IoEventFd(datamatch or 0, addr, length, fd, flags))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resample_fd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd `fd` raises GSI `gsi` (through the
        routing table).  With `resample_fd` the line is level: it stays
        raised until the guest's EOI, when KVM lowers it and signals
        `resample_fd`. Raises OSError."""
        flags = abi.IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= abi.IRQFD_FLAG_RESAMPLE
        ioctl(self.fd, abi.IRQFD, abi.IrqFd(fd, gsi, flags, resample_fd if flags & abi.IRQFD_FLAG_RESAMPLE else 0))

    def set_gsi_routing(self, msi_routes: dict[int, tuple[int, int]]) -> None:
        """KVM_SET_GSI_ROUTING: KVM's default PC routes (GSI 0-15 on the
        PICs, 0-23 on the IOAPIC), which the call replaces and so must
        repeat, plus one MSI route per GSI in `msi_routes` (gsi -> (address,
        data)). Raises OSError."""
        entries = []
        for gsi in range(24):
            if gsi < 16:
                chip = abi.IRQCHIP_PIC_MASTER if gsi < 8 else abi.IRQCHIP_PIC_SLAVE
                entries.append((gsi, abi.IRQ_ROUTING_IRQCHIP, (chip, gsi % 8)))
            entries.append((gsi, abi.IRQ_ROUTING_IRQCHIP, (abi.IRQCHIP_IOAPIC, gsi)))
        for gsi, (address, data) in sorted(msi_routes.items()):
            entries.append((gsi, abi.IRQ_ROUTING_MSI, (address & 0xFFFFFFFF, address >> 32, data)))
        table = abi.irq_routing_type(len(entries))()
        table.nr = len(entries)
        for entry, (gsi, kind, words) in zip(table.entries, entries):
            entry.gsi, entry.type = gsi, kind
            for i, w in enumerate(words):
                entry.u[i] = w
        ioctl(self.fd, abi.SET_GSI_ROUTING, table)

    def create_vcpu(self, index: int) -> "KvmVcpu":
        try:
            fd = ioctl(self.fd, abi.CREATE_VCPU, index)
        except OSError as e:
            raise EngineError(f"KVM_CREATE_VCPU {index}: {e.strerror}") from None
        return KvmVcpu(self, index, fd)

    def close(self) -> None:
        os.close(self.fd)


class KvmVcpu:
    def __init__(self, vm: KvmVm, index: int, fd: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_mm = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)

    def __repr__(self) -> str:
        return f"KvmVcpu({self.index})"

    def get_regs(self) -> abi.Regs:
        r = abi.Regs()
        ioctl(self.fd, abi.GET_REGS, r)
        return r

    def set_regs(self, r: abi.Regs) -> None:
        ioctl(self.fd, abi.SET_REGS, r)

    def get_sregs(self) -> abi.Sregs:
        s = abi.Sregs()
        ioctl(self.fd, abi.GET_SREGS, s)
        return s

    def set_sregs(self, s: abi.Sregs) -> None:
        ioctl(self.fd, abi.SET_SREGS, s)

    def get_fpu(self) -> abi.Fpu:
        f = abi.Fpu()
        ioctl(self.fd, abi.GET_FPU, f)
        return f

    def set_fpu(self, f: abi.Fpu) -> None:
        ioctl(self.fd, abi.SET_FPU, f)

    def set_cpuid(self, entries: list[abi.CpuidEntry2]) -> None:
        buf = abi.cpuid2_type(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, abi.SET_CPUID2, buf)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = abi.msrs_type(len(indices))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = ioctl(self.fd, abi.GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """Sets MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        buf = abi.msrs_type(len(values))()
        buf.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        return ioctl(self.fd, abi.SET_MSRS, buf)

    def get_mp_state(self) -> int:
        v = ctypes.c_uint32()
        ioctl(self.fd, abi.GET_MP_STATE, v)
        return v.value

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, abi.SET_MP_STATE, ctypes.c_uint32(state))

    def translate(self, linear: int) -> int | None:
        """Guest-virtual to guest-physical through the guest's page tables, or None."""
        t = abi.Translation(linear_address=linear)
        try:
            ioctl(self.fd, abi.TRANSLATE, t)
        except OSError:
            return None
        return t.physical_address if t.valid else None

    def close(self) -> None:
        self.run_mm.close()
        os.close(self.fd)
