"""KVM's in-kernel interrupt and timer platform under the device contract.

With config.irqchip the hw engine's PIC pair, IOAPIC, PIT and local APICs
live in the kernel; `KvmPlatformState(engine)` saves and restores them with
the same save()/restore()/reset() shape as pyvmm's Python devices
(device.py), through KVM_GET/SET_IRQCHIP (PIC master, PIC slave, IOAPIC),
KVM_GET/SET_PIT2, KVM_GET/SET_LAPIC (one per vCPU) and KVM_GET/SET_CLOCK
(kvmclock's guest time).

The saved structures are KVM's own (include/uapi/asm/kvm.h), kept as hex:
the state moves between hw machines on the same kind of host.  For a move
to and from bt's Python platform, `to_models()` / `from_models()` give and
take the models' states (platform_convert.py translates), with what each
vCPU carries besides its registers: the TSC and the APIC / kvmclock MSRs,
its halted state and its pending events.  The PIT's
count_load_time is a host-kernel time, so a restored PIT counts on from
where it was only on the host that saved it.  The engine must not be
running (its vCPUs stopped) while the state is taken or loaded."""

from __future__ import annotations

import ctypes
import time

from ...device import as_hex, as_int, as_list, restore_state, saved
from ...errors import EngineError
from . import abi, platform_convert as conv
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


# MSRs a vCPU carries across an engine move besides CpuState's: TSC_ADJUST and
# KVM's paravirtual ones (kvmclock, async PF, steal time, PV EOI, poll control).
# IA32_TSC, IA32_APIC_BASE and IA32_TSC_DEADLINE are converted apart.  The
# wall-clock MSRs are left out: writing them makes the host write the time
# of day into the guest again.
MSR_TSC, MSR_APIC_BASE, MSR_TSC_ADJUST, MSR_TSC_DEADLINE = 0x10, 0x1B, 0x3B, 0x6E0
MOVE_MSRS = (MSR_TSC_ADJUST, 0x12, 0x4B564D01, 0x4B564D02, 0x4B564D03, 0x4B564D04, 0x4B564D05)
MP_STATE_RUNNABLE, MP_STATE_UNINITIALIZED, MP_STATE_INIT_RECEIVED, MP_STATE_HALTED = 0, 1, 2, 3
GET_TSC_KHZ = (0xAE << 8) | 0xA3          # _IO(KVMIO, 0xa3)
NS_PER_MS = 1_000_000

_Pit2 = ctypes.c_uint8 * PIT_STATE2_SIZE
_Lapic = ctypes.c_uint8 * LAPIC_STATE_SIZE
_Events = ctypes.c_uint8 * conv.EVENTS_SIZE

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

    # -- moving to and from the Python models (migrate.py) ------------------------
    def _msr(self, vcpu, index: int) -> int | None:
        try:
            got = vcpu.get_msrs([index])
        except OSError:
            return None
        return got.get(index)

    def _tsc_khz(self, vcpu) -> int:
        return ioctl(vcpu.fd, GET_TSC_KHZ) or 1_000_000

    def _events(self, vcpu) -> bytes:
        buf = _Events()
        ioctl(vcpu.fd, abi.GET_VCPU_EVENTS, buf)
        return bytes(buf)

    def to_models(self, like: dict | None = None) -> dict:
        """The platform in the Python models' terms: {"now_ns": guest time,
        "intc": a PlatformInterrupts save() dict, "cpus": [per vCPU: "tsc",
        "msrs", "halted", "waiting_sipi", "events"]}.  `like` is the
        models' current PlatformInterrupts state, for what KVM does not
        keep. Raises OSError where KVM will not give a structure."""
        now = self.clock_ns()
        host = time.monotonic_ns()          # KVM's count_load_time is CLOCK_MONOTONIC
        like_pic = like["pic"] if like else {"master": None, "slave": None}
        cpus, lapics = [], []
        for i, vcpu in enumerate(self.vcpus):
            tsc = self._msr(vcpu, MSR_TSC) or 0
            deadline = self._msr(vcpu, MSR_TSC_DEADLINE) or 0
            deadline_ns = None
            if deadline:
                deadline_ns = now + max(0, deadline - tsc) * NS_PER_MS // self._tsc_khz(vcpu)
            apic_base = self._msr(vcpu, MSR_APIC_BASE)
            lapics.append(conv.lapic_from_kvm(
                self._get_lapic(vcpu), now, conv.reset_apic_base(i) if apic_base is None else apic_base,
                deadline_ns, deadline, like["lapics"][i] if like else None))
            msrs = {}
            for index in MOVE_MSRS:
                value = self._msr(vcpu, index)
                if value is not None:
                    msrs[index] = value
            events = conv.events_from_kvm(self._events(vcpu))
            mp_state = vcpu.get_mp_state()
            cpus.append({"tsc": tsc, "msrs": msrs, "events": events, "halted": mp_state == MP_STATE_HALTED,
                         "waiting_sipi": mp_state in (MP_STATE_UNINITIALIZED, MP_STATE_INIT_RECEIVED)})
        intc = {"version": 1,
                "pic": {"version": 1,
                        "master": conv.pic_from_kvm(self._get_chip(CHIP_PIC_MASTER), 0, like_pic["master"]),
                        "slave": conv.pic_from_kvm(self._get_chip(CHIP_PIC_SLAVE), 1, like_pic["slave"])},
                "pit": conv.pit_from_kvm(self._get_pit(), now, host, like["pit"] if like else None),
                "ioapic": conv.ioapic_from_kvm(self._get_chip(CHIP_IOAPIC)),
                "nmi": [c["events"]["nmi"] for c in cpus],
                "lapics": lapics}
        return {"now_ns": now, "intc": intc, "cpus": cpus}

    def from_models(self, moved: dict) -> None:
        """Loads what to_models() (or bt's side of migrate.py) gave: guest
        time first, then the chips, the PIT, each vCPU's APIC base, TSC,
        local APIC, TSC deadline, MSRs, pending NMI and run state (running,
        halted, or an AP waiting for its SIPI).
        Raises OSError where KVM refuses a structure."""
        now = moved["now_ns"]
        intc = moved["intc"]
        ioctl(self.vm.fd, SET_CLOCK, _ClockData(clock=now))
        host = time.monotonic_ns()
        self._set_chip(CHIP_PIC_MASTER, conv.pic_to_kvm(intc["pic"]["master"], 0))
        self._set_chip(CHIP_PIC_SLAVE, conv.pic_to_kvm(intc["pic"]["slave"], 1))
        self._set_chip(CHIP_IOAPIC, conv.ioapic_to_kvm(intc["ioapic"]))
        pit = conv.pit_to_kvm(intc["pit"], now, host, conv.pit_flags(self._get_pit()))
        ioctl(self.vm.fd, SET_PIT2, _Pit2.from_buffer_copy(pit))
        for i, (vcpu, cpu, lapic) in enumerate(zip(self.vcpus, moved["cpus"], intc["lapics"])):
            vcpu.set_msrs({MSR_APIC_BASE: lapic["apic_base"]})
            vcpu.set_msrs({MSR_TSC: cpu["tsc"]})
            page = conv.lapic_to_kvm(lapic, now, self._get_lapic(vcpu))
            ioctl(vcpu.fd, SET_LAPIC, _Lapic.from_buffer_copy(page))
            deadline_ns = lapic["timer_expiry"] if lapic["tsc_deadline"] else None
            if deadline_ns is not None and deadline_ns < conv.NEVER:
                left = max(0, deadline_ns - now) * self._tsc_khz(vcpu) // NS_PER_MS
                vcpu.set_msrs({MSR_TSC_DEADLINE: (self._msr(vcpu, MSR_TSC) or 0) + max(left, 1)})
            for index, value in cpu["msrs"].items():
                if index in MOVE_MSRS:
                    try:
                        vcpu.set_msrs({index: value})
                    except OSError:
                        pass                       # an MSR this KVM does not offer
            events = conv.events_to_kvm(intc["nmi"][i], cpu["events"]["shadow"], self._events(vcpu))
            ioctl(vcpu.fd, abi.SET_VCPU_EVENTS, _Events.from_buffer_copy(events))
            if cpu["waiting_sipi"]:
                vcpu.set_mp_state(MP_STATE_INIT_RECEIVED)
            else:
                vcpu.set_mp_state(MP_STATE_HALTED if cpu["halted"] else MP_STATE_RUNNABLE)
