"""KVM's in-kernel interrupt and timer platform under the device contract.

With config.irqchip the hw engine's PIC pair, IOAPIC, PIT and local APICs
live in the kernel; `KvmPlatformState(engine)` saves and restores them with
the same save()/restore()/reset() shape as pyvmm's Python devices
(device.py), through KVM_GET/SET_IRQCHIP (PIC master, PIC slave, IOAPIC),
KVM_GET/SET_PIT2, KVM_GET/SET_LAPIC (one per vCPU) and KVM_GET/SET_CLOCK
(kvmclock's guest time).

The saved structures are KVM's own (include/uapi/asm/kvm.h), kept as hex:
the state moves between hw machines on the same kind of host, not to the
Python platform of bt (migrate.py still refuses that move).  The PIT's
count_load_time is a host-kernel time, so a restored PIT counts on from
where it was only on the host that saved it.  The engine must not be
running (its vCPUs stopped) while the state is taken or loaded."""

from __future__ import annotations

import ctypes

from ...device import as_hex, as_int, as_list, restore_state, saved
from ...errors import EngineError
from .abi import _ior, _iow, _iowr
from .device import ioctl

CHIP_PIC_MASTER, CHIP_PIC_SLAVE, CHIP_IOAPIC = 0, 1, 2
CHIPS = {"pic_master": CHIP_PIC_MASTER, "pic_slave": CHIP_PIC_SLAVE, "ioapic": CHIP_IOAPIC}
CHIP_DATA_SIZE = 512     # the union in struct kvm_irqchip
PIT_STATE2_SIZE = 112    # struct kvm_pit_state2: 3 channels of 24 bytes, flags, reserved[9]
LAPIC_STATE_SIZE = 0x400  # struct kvm_lapic_state: the APIC register page


class _Irqchip(ctypes.Structure):
    _fields_ = [("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("data", ctypes.c_uint8 * CHIP_DATA_SIZE)]


class _ClockData(ctypes.Structure):
    _fields_ = [("clock", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("pad0", ctypes.c_uint32),
                ("realtime", ctypes.c_uint64), ("host_tsc", ctypes.c_uint64),
                ("pad", ctypes.c_uint32 * 4)]


_Pit2 = ctypes.c_uint8 * PIT_STATE2_SIZE
_Lapic = ctypes.c_uint8 * LAPIC_STATE_SIZE

GET_IRQCHIP = _iowr(0x62, ctypes.sizeof(_Irqchip))
SET_IRQCHIP = _ior(0x63, ctypes.sizeof(_Irqchip))
SET_CLOCK = _iow(0x7B, ctypes.sizeof(_ClockData))
GET_CLOCK = _ior(0x7C, ctypes.sizeof(_ClockData))
GET_LAPIC = _ior(0x8E, LAPIC_STATE_SIZE)
SET_LAPIC = _iow(0x8F, LAPIC_STATE_SIZE)
GET_PIT2 = _ior(0x9F, PIT_STATE2_SIZE)
SET_PIT2 = _iow(0xA0, PIT_STATE2_SIZE)


def _exact(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise ValueError(f"{what} has {len(data)} bytes, not {size}")
    return data


class KvmPlatformState:
    """The in-kernel platform of a prepared hw engine with the irqchip.

    reset() loads the state found at construction (call it right after
    prepare(): the power-on state). Raises EngineError if the engine has no
    in-kernel irqchip or KVM will not give its state."""

    STATE_VERSION = 1

    def __init__(self, engine):
        if getattr(engine, "name", "") != "hw" or not engine.irqchip or engine.vm is None:
            raise EngineError("only a prepared hw engine with the in-kernel irqchip has this state")
        self.vm = engine.vm
        self.vcpus = engine.vcpus
        try:
            self._power_on = self.save()
        except OSError as e:
            raise EngineError(f"KVM cannot read its in-kernel irqchip state: {e.strerror}") from None

    def __repr__(self) -> str:
        return f"KvmPlatformState(cpus={len(self.vcpus)})"

    # -- one structure each ------------------------------------------------------
    def _get_chip(self, chip: int) -> bytes:
        c = _Irqchip(chip_id=chip)
        ioctl(self.vm.fd, GET_IRQCHIP, c)
        return bytes(c.data)

    def _set_chip(self, chip: int, data: bytes) -> None:
        c = _Irqchip(chip_id=chip)
        ctypes.memmove(c.data, data, CHIP_DATA_SIZE)
        ioctl(self.vm.fd, SET_IRQCHIP, c)

    def _get_pit(self) -> bytes:
        buf = _Pit2()
        ioctl(self.vm.fd, GET_PIT2, buf)
        return bytes(buf)

    def _get_lapic(self, vcpu) -> bytes:
        buf = _Lapic()
        ioctl(vcpu.fd, GET_LAPIC, buf)
        return bytes(buf)

    def clock_ns(self) -> int:
        """kvmclock's guest time now."""
        c = _ClockData()
        ioctl(self.vm.fd, GET_CLOCK, c)
        return c.clock

    # -- the device contract -------------------------------------------------------
    def reset(self) -> None:
        self.restore(self._power_on)

    def save(self) -> dict:
        return saved(self, {**{name: self._get_chip(chip).hex() for name, chip in CHIPS.items()},
                            "pit": self._get_pit().hex(),
                            "lapics": [self._get_lapic(v).hex() for v in self.vcpus],
                            "clock_ns": self.clock_ns()})

    def restore(self, state: dict) -> None:
        """Raises DeviceStateError for a state of another shape (or another
        vCPU count); an ioctl KVM refuses raises OSError."""
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        chips = {name: _exact(as_hex(state[name]), CHIP_DATA_SIZE, name) for name in CHIPS}
        pit = _exact(as_hex(state["pit"]), PIT_STATE2_SIZE, "pit")
        lapics = [_exact(as_hex(s), LAPIC_STATE_SIZE, "lapic")
                  for s in as_list(state["lapics"], len(self.vcpus))]
        clock = _ClockData(clock=as_int(state["clock_ns"]))
        for name, chip in CHIPS.items():
            self._set_chip(chip, chips[name])
        ioctl(self.vm.fd, SET_PIT2, _Pit2.from_buffer_copy(pit))
        for vcpu, regs in zip(self.vcpus, lapics):
            ioctl(vcpu.fd, SET_LAPIC, _Lapic.from_buffer_copy(regs))
        ioctl(self.vm.fd, SET_CLOCK, clock)
