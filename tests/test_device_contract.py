"""The device contract (pyvmm/device.py) for every device class, no guest.

Each case builds a device on a real Bus, drives it through its registers
into a distinctive state A and gives a `probe` (register reads and writes,
side effects and all) of what the guest would see.  The contract:

  save() in A -> drive elsewhere -> reset() -> restore() -> probe == probe in A,

also after a json.dumps/json.loads round trip, while the probe right after
reset() differs (so the state is really carried).  A state of another
version or of the wrong shape raises a one-line DeviceStateError and leaves
the device as it was.  Where a device keeps state no register shows (the
doorbell's ring count, the debug-exit code, the backdoor's command counts),
the probe reads that attribute too.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import time
from dataclasses import dataclass
from typing import Callable

import pytest

import pyvmm.devices
import pyvmm.paravirt
from pyvmm.bus import Bus
from pyvmm.device import Device, DeviceStateError, Registers, Stateful
from pyvmm.devices import acpi_pm as pm
from pyvmm.devices import fw_cfg as fw
from pyvmm.devices import guestrpc as rpc
from pyvmm.devices.legacy import DebugExit, I8042, Port80, Rtc, Serial8250
from pyvmm.devices.legacy import serial8250 as u
from pyvmm.devices.platform import lapic as la
from pyvmm.devices.platform.clock import GuestClock
from pyvmm.devices.platform.intc import PlatformInterrupts
from pyvmm.devices.platform.ioapic import IOAPIC_BASE, IOREGSEL, IOWIN, IoApic
from pyvmm.devices.platform.pic import Pic8259, PicPair
from pyvmm.devices.platform.pit import Pit
from pyvmm.devices.pv_doorbell import PvDoorbell
from pyvmm.devices.vmware_backdoor import CMD_GETVERSION, MAGIC, PORT, VmwareBackdoor
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory
from pyvmm.paravirt import abi
from pyvmm.paravirt.hypervisor import Hypervisor

COM1 = 0x3F8
PINNED = 1_709_240_825  # 2024-02-29 21:07:05 UTC


@dataclass
class Rig:
    dev: Stateful
    bus: Bus
    drive_a: Callable[[], None]
    drive_b: Callable[[], None]
    probe: Callable[[], list]
    mapped: bool = True                 # the device itself sits on the bus
    cleanup: Callable[[], None] = lambda: None


def io_bus() -> Bus:
    return Bus("io", serialize=False)


# --- the cases: one per device class ------------------------------------------------

def serial() -> Rig:
    bus, irq = io_bus(), IrqLine(4)
    dev = Serial8250(irq, lambda data: None)
    bus.insert(COM1, 8, dev, "com1")

    def a():
        bus.write(COM1 + 3, 1, 0x03)
        bus.write(COM1 + 4, 1, u.MCR_OUT2)
        bus.write(COM1 + 1, 1, u.IER_ERBFI)
        bus.write(COM1 + 7, 1, 0x5A)
        dev.receive(b"xy")

    def b():
        bus.write(COM1 + 7, 1, 0x11)
        bus.write(COM1 + 3, 1, 0x83)
        bus.write(COM1, 1, 0x01)
        dev.receive(b"zzz")

    def probe():
        regs = [bus.read(COM1 + o, 1) for o in (1, 2, 3, 4, 5, 6, 7)]
        data = [bus.read(COM1, 1), bus.read(COM1, 1)]
        return regs + data + [bus.read(COM1 + 5, 1), irq.level]
    return Rig(dev, bus, a, b, probe)


def i8042() -> Rig:
    bus, kbd_irq = io_bus(), IrqLine(1)
    dev = I8042(lambda: None, kbd_irq, IrqLine(12))
    for offset, length, part in dev.ranges():
        bus.insert(0x60 + offset, length, part, "i8042")

    def a():
        bus.write(0x64, 1, 0x60)
        bus.write(0x60, 1, 0x47)  # CTR: interrupts, SYS, translate
        bus.write(0x64, 1, 0xAA)  # self-test: 0x55 waits in the buffer

    def b():
        bus.write(0x64, 1, 0xAD)
        bus.write(0x64, 1, 0x60)
        bus.write(0x60, 1, 0x00)

    def probe():
        out = [bus.read(0x64, 1), kbd_irq.level, bus.read(0x60, 1), bus.read(0x64, 1)]
        bus.write(0x64, 1, 0x20)  # read CTR
        return out + [bus.read(0x60, 1)]
    return Rig(dev, bus, a, b, probe)


def rtc() -> Rig:
    bus = io_bus()
    dev = Rtc(mem_size_bytes=64 << 20, clock=lambda: PINNED)
    bus.insert(0x70, 2, dev, "rtc")

    def put(reg, value):
        bus.write(0x70, 1, reg)
        bus.write(0x71, 1, value)

    def a():
        put(0x0B, 0x06)          # binary, 24-hour
        put(0x04, 5)             # hours: moves the guest clock
        put(0x20, 0x99)          # a CMOS byte
        bus.write(0x70, 1, 0x0B)

    def b():
        put(0x20, 0x11)
        put(0x0B, 0x02)

    def probe():
        out = [bus.read(0x71, 1)]
        for reg in (0x00, 0x02, 0x04, 0x0B, 0x20):
            bus.write(0x70, 1, reg)
            out.append(bus.read(0x71, 1))
        return out
    return Rig(dev, bus, a, b, probe)


def port80() -> Rig:
    bus, dev = io_bus(), Port80()
    bus.insert(0x80, 1, dev, "post")
    return Rig(dev, bus, lambda: bus.write(0x80, 1, 0x42), lambda: bus.write(0x80, 1, 0x13),
               lambda: [bus.read(0x80, 1)])


def debug_exit() -> Rig:
    bus, codes = io_bus(), []
    dev = DebugExit(codes.append, 1)
    bus.insert(0x501, 1, dev, "debug-exit")
    return Rig(dev, bus, lambda: bus.write(0x501, 1, 0x21), lambda: bus.write(0x501, 1, 0x07),
               lambda: [bus.read(0x501, 1), dev.last_code])


def _init_pic(bus, port, base, icw3, imr):
    for value in (0x11, base, icw3, 0x01):
        bus.write(port if value == 0x11 else port + 1, 1, value)
    bus.write(port + 1, 1, imr)


def _pic_regs(bus, port):
    bus.write(port, 1, 0x0A)             # OCW3: read IRR
    irr = bus.read(port, 1)
    bus.write(port, 1, 0x0B)             # OCW3: read ISR
    return [bus.read(port + 1, 1), irr, bus.read(port, 1)]


def pic8259() -> Rig:
    bus, dev = io_bus(), Pic8259("master", 0xF8)
    bus.insert(0x20, 2, dev, "pic")

    def a():
        _init_pic(bus, 0x20, 0x30, 0x04, 0xF0)
        dev.set_irq(1, 1)
        dev.set_irq(6, 1)

    def b():
        _init_pic(bus, 0x20, 0x08, 0x04, 0x00)

    return Rig(dev, bus, a, b, lambda: _pic_regs(bus, 0x20) + [dev.pending()])


def pic_pair() -> Rig:
    bus, dev = io_bus(), PicPair()
    for port, length, part, name in dev.ranges():
        bus.insert(port, length, part, name)

    def a():
        _init_pic(bus, 0x20, 0x30, 0x04, 0xF8)
        _init_pic(bus, 0xA0, 0x38, 0x02, 0xF1)
        bus.write(0x4D1, 1, 0x02)          # IRQ 9 level-triggered
        dev.set_irq(9, 1)

    def b():
        _init_pic(bus, 0x20, 0x08, 0x04, 0xFF)
        bus.write(0x4D1, 1, 0x00)

    def probe():
        out = _pic_regs(bus, 0x20) + _pic_regs(bus, 0xA0) + [bus.read(0x4D0, 1), bus.read(0x4D1, 1)]
        return out + [dev.interrupt_pending(), dev.acknowledge(), _pic_regs(bus, 0xA0)]
    return Rig(dev, bus, a, b, probe, mapped=False)


def pit() -> Rig:
    bus, clock = io_bus(), GuestClock("deterministic")
    dev = Pit(clock, IrqLine(0))
    for port, length, part, name in dev.ranges():
        bus.insert(port, length, part, name)

    def a():
        bus.write(0x43, 1, 0x34)           # counter 0, lo/hi, mode 2
        bus.write(0x40, 1, 0x00)
        bus.write(0x40, 1, 0x10)
        bus.write(0x61, 1, 0x01)           # counter 2's gate on
        clock.advance_ns(100_000)
        bus.write(0x43, 1, 0x00)           # latch counter 0
        bus.write(0x43, 1, 0xB6)           # counter 2, lo/hi, mode 3
        bus.write(0x42, 1, 0x34)           # ... half its count written

    def b():                               # no time passes: the PIT reads the clock
        bus.write(0x43, 1, 0x30)
        bus.write(0x40, 1, 0xFF)
        bus.write(0x40, 1, 0xFF)
        bus.write(0x61, 1, 0x00)

    def probe():
        out = [bus.read(0x40, 1), bus.read(0x40, 1), bus.read(0x61, 1) & ~0x10,  # bit 4: refresh toggle
               dev.next_deadline_ns()]
        bus.write(0x42, 1, 0x12)
        bus.write(0x43, 1, 0xE2)           # read-back: status of counter 0
        return out + [bus.read(0x40, 1), bus.read(0x40, 1), bus.read(0x40, 1), bus.read(0x42, 1)]
    return Rig(dev, bus, a, b, probe)


def local_apic() -> Rig:
    bus, clock = Bus("mmio", serialize=False), GuestClock("deterministic")
    dev = la.LocalApic(0, clock, bsp=True)
    bus.insert(la.LAPIC_BASE, la.LAPIC_SIZE, dev, "lapic")
    reg = lambda r: la.LAPIC_BASE + r  # noqa: E731

    def a():
        bus.write(reg(la.SVR), 4, 0x1FF)
        bus.write(reg(la.TPR), 4, 0x20)
        bus.write(reg(la.LDR), 4, 0x0100_0000)
        bus.write(reg(la.TIMER_DCR), 4, 0x3)
        bus.write(reg(la.LVT_TIMER), 4, 0x2_0030)   # periodic, vector 0x30
        bus.write(reg(la.TIMER_ICR), 4, 100_000)
        clock.advance_ns(12_345)
        dev.accept(0x41)

    def b():
        bus.write(reg(la.TPR), 4, 0)
        bus.write(reg(la.TIMER_ICR), 4, 5)
        bus.write(reg(la.SVR), 4, 0xFF)

    def probe():
        out = [bus.read(reg(r), 4) for r in (la.ID, la.TPR, la.PPR, la.LDR, la.SVR, la.LVT_TIMER,
                                             la.TIMER_CCR, la.TIMER_DCR, la.IRR0 + 0x20)]
        return out + [dev.has_interrupt(), dev.next_deadline_ns()]
    return Rig(dev, bus, a, b, probe)


def io_apic() -> Rig:
    bus, dev = Bus("mmio", serialize=False), IoApic(2)
    bus.insert(IOAPIC_BASE, 0x20, dev, "ioapic")

    def put(r, value):
        bus.write(IOAPIC_BASE + IOREGSEL, 4, r)
        bus.write(IOAPIC_BASE + IOWIN, 4, value)

    def a():
        put(0x00, 0x0500_0000)
        put(0x12, 0xA031)                  # pin 1: vector 0x31, level, unmasked
        put(0x13, 0x0100_0000)
        bus.write(IOAPIC_BASE + IOREGSEL, 4, 0x12)

    def b():
        put(0x12, 0x1_0000)
        put(0x00, 0)

    def probe():
        out = [bus.read(IOAPIC_BASE + IOREGSEL, 4)]
        for r in (0x00, 0x01, 0x12, 0x13, 0x14):
            bus.write(IOAPIC_BASE + IOREGSEL, 4, r)
            out.append(bus.read(IOAPIC_BASE + IOWIN, 4))
        return out
    return Rig(dev, bus, a, b, probe)


def platform() -> Rig:
    clock = GuestClock("deterministic")
    dev = PlatformInterrupts(2, clock)
    io, mmio = io_bus(), Bus("mmio", serialize=False)
    dev.attach(io, mmio)
    lapic = lambda r: la.LAPIC_BASE + r  # noqa: E731

    def a():
        _init_pic(io, 0x20, 0x30, 0x04, 0xFE)
        _init_pic(io, 0xA0, 0x38, 0x02, 0xFF)
        io.write(0x43, 1, 0x34)
        io.write(0x40, 1, 0x00)
        io.write(0x40, 1, 0x20)
        mmio.write(lapic(la.SVR), 4, 0x1FF)
        mmio.write(lapic(la.TPR), 4, 0x10)
        mmio.write(IOAPIC_BASE + IOREGSEL, 4, 0x14)
        mmio.write(IOAPIC_BASE + IOWIN, 4, 0x1_0040)
        clock.advance_ns(40_000)
        dev.poll()                         # the PIT's first edge raises IRQ 0

    def b():
        _init_pic(io, 0x20, 0x08, 0x04, 0xFF)
        mmio.write(lapic(la.TPR), 4, 0)

    def probe():
        out = _pic_regs(io, 0x20) + [io.read(0x40, 1), io.read(0x40, 1)]
        out += [mmio.read(lapic(r), 4) for r in (la.TPR, la.SVR, la.LVT_LINT0)]
        mmio.write(IOAPIC_BASE + IOREGSEL, 4, 0x14)
        out.append(mmio.read(IOAPIC_BASE + IOWIN, 4))
        return out + [dev.pending(0), dev.next_deadline_ns(), dev.acknowledge(0)]
    return Rig(dev, io, a, b, probe, mapped=False)


def guest_clock() -> Rig:
    dev = GuestClock("deterministic", ns_per_insn=0.5)

    def a():
        dev.advance_instructions(12_345)
        dev.advance_ns(1_000)

    def b():
        dev.advance_instructions(99)
        dev.advance_to(10**9)
    return Rig(dev, io_bus(), a, b, lambda: [dev.now_ns(), dev.tsc()], mapped=False)


def fwcfg() -> Rig:
    bus = io_bus()
    dev = fw.FwCfg(ram_size=64 << 20, cpus=2, cmdline="console=ttyS0", files=[("etc/x", b"hello")])
    bus.insert(0x510, fw.PORT_RANGE, dev, "fw_cfg")

    def a():
        bus.write(0x510, 2, fw.FW_CFG_CMDLINE_DATA)
        bus.read(0x511, 2)

    def b():
        bus.write(0x510, 2, fw.FW_CFG_SIGNATURE)
        bus.read(0x511, 1)
    return Rig(dev, bus, a, b, lambda: [bus.read(0x511, 4), bus.read(0x511, 1), bus.read(0x510, 2)])


def acpi() -> Rig:
    bus, sci, now = io_bus(), IrqLine(9), [100.0]
    dev = pm.AcpiPm(clock=lambda: now[0], sci=sci)
    bus.insert(pm.PM_BASE, pm.PM_LENGTH, dev, "acpi-pm")

    def a():
        bus.write(pm.PM_BASE + pm.PM1_EN_OFFSET, 2, pm.PWRBTN_STS)
        dev.press_power_button()
        bus.write(pm.PM_BASE + pm.PM1_CNT_OFFSET, 2, pm.BM_RLD | pm.SCI_EN)
        now[0] += 0.25

    def b():
        bus.write(pm.PM_BASE + pm.PM1_STS_OFFSET, 2, pm.PWRBTN_STS)   # write 1 to clear
        bus.write(pm.PM_BASE + pm.PM1_EN_OFFSET, 2, 0)
        now[0] += 3.0                       # the timer goes on from its saved value

    def probe():
        regs = [bus.read(pm.PM_BASE + o, 2) for o in (pm.PM1_STS_OFFSET, pm.PM1_EN_OFFSET,
                                                      pm.PM1_CNT_OFFSET)]
        return regs + [bus.read(pm.PM_BASE + pm.PM_TMR_OFFSET, 4), sci.level]
    return Rig(dev, bus, a, b, probe)


def doorbell() -> Rig:
    bus, dev = io_bus(), PvDoorbell(lambda: None, 3)
    bus.insert(0x5B0, 1, dev, "pv-doorbell")

    def a():
        for _ in range(3):
            bus.write(0x5B0, 1, 0)
    return Rig(dev, bus, a, lambda: bus.write(0x5B0, 1, 0), lambda: [bus.read(0x5B0, 1), dev.rings])


class FakeRegs:
    def __init__(self, **regs):
        self.r = {n: 0 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")}
        self.r.update(regs)

    def get(self, name): return self.r[name]
    def set(self, name, value): self.r[name] = value
    def commit(self): pass


def backdoor() -> Rig:
    bus, regs = io_bus(), [FakeRegs()]
    guest = rpc.GuestRpc({"k": "v"})
    dev = VmwareBackdoor(lambda: regs[0], guest, tsc_hz=2_000_000_000)
    bus.insert(PORT, 2, dev, "vmware-backdoor")

    def getversion():
        regs[0] = FakeRegs(rax=MAGIC, rcx=CMD_GETVERSION, rdx=PORT)
        return [bus.read(PORT, 4), regs[0].r["rbx"]]

    def a():
        getversion()
        getversion()
        guest.command("info-set guestinfo.k after")

    def b():
        getversion()
        guest.command("info-set guestinfo.k other")

    def probe():
        return [dict(dev.counts), guest.command("info-get guestinfo.k")] + getversion()
    return Rig(dev, bus, a, b, probe)


def guest_rpc() -> Rig:
    dev = rpc.GuestRpc({"a": "1"})

    def a():
        dev.command("info-set guestinfo.b 2")
        dev.command("log hello")

    def b():
        dev.command("info-set guestinfo.a 9")

    def probe():
        return [dev.requests, dev.command("info-get guestinfo.a"), dev.command("info-get guestinfo.b")]
    return Rig(dev, io_bus(), a, b, probe, mapped=False)


class Vcpu:
    """What the hypercall handlers used here need of a vCPU."""

    def __init__(self, index: int):
        self.index = index


def hypervisor() -> Rig:
    memory, now = GuestMemory(1 << 20), [5_000]
    hv = Hypervisor(memory, lambda data: None, lambda irq: None, lambda kind, status: None,
                    clock_ns=lambda: now[0])
    v0, v1 = Vcpu(0), Vcpu(1)

    def a():
        hv.write_msr(0, 0x3000 | abi.HYPERCALL_PAGE_ENABLE)
        hv.call(v0, abi.OP_SET_SHARED, 0x4000, 0, 0, 0)
        hv.call(v1, abi.OP_SET_SHARED, 0x4001, 0, 0, 0)   # misaligned: an error counted

    def b():
        hv.write_msr(1, 0x5000 | abi.HYPERCALL_PAGE_ENABLE)
        hv.call(v0, abi.OP_SET_SHARED, 0, 0, 0, 0)

    def probe():
        return [hv.read_msr(0), hv.read_msr(1), hv.call(v0, abi.OP_IRQ_ENABLE, 0, 0, 0, 0),
                hv.call(v1, abi.OP_IRQ_ENABLE, 0, 0, 0, 0), hv.stats()]

    def cleanup():
        hv.close()
        memory.close()
    return Rig(hv, io_bus(), a, b, probe, mapped=False, cleanup=cleanup)


def pci_bridge() -> Rig:
    from pyvmm.devices.pci.host import attach_host_bridge
    bus = io_bus()
    dev = attach_host_bridge(bus, Bus("mmio", serialize=False))

    def drive(address, command):
        bus.write(0xCF8, 4, address)
        bus.write(0xCFC, 2, command)
    return Rig(dev, bus, lambda: drive(0x80000004, 0x6), lambda: drive(0x80000010, 0x1),
               lambda: [bus.read(0xCF8, 4), bus.read(0xCFC, 4), dev.host.command])


def pci_function() -> Rig:
    from pyvmm.devices.pci.function import PciFunction
    from pyvmm.devices.pci.host import attach_host_bridge
    bus, mmio = io_bus(), Bus("mmio", serialize=False)
    bridge = attach_host_bridge(bus, mmio)
    dev = PciFunction(0x1234, 0x5678, 0x020000)
    dev.add_bar(0, 0x1000, "mem32", Port80())
    slot = bridge.add(dev, "nic")

    def cfg(reg, size, value):
        bus.write(0xCF8, 4, 0x80000000 | slot << 11 | reg)
        bus.write(0xCFC, size, value)

    def a():
        cfg(0x10, 4, 0xE8000000)
        cfg(0x3C, 1, 0x0B)

    def b():
        cfg(0x04, 2, 0)
        cfg(0x10, 4, 0xE9000000)
    return Rig(dev, bus, a, b, lambda: [dev.config_read(0x04, 4), dev.config_read(0x10, 4),
                                        dev.config_read(0x3C, 1), bridge.mapping(slot, 0),
                                        mmio.read(0xE8000000, 1)], mapped=False)


def virtio_pci() -> Rig:
    from pyvmm.devices.virtio.rng import VirtioRng
    from .devices.virtio_driver import F_VERSION_1, Driver
    d = Driver(lambda memory: VirtioRng(memory, lambda n: b"\x5a" * n))

    def a():
        d.init(queue_size=16)
        d.submit([(32, True)])

    def b():
        d.init(features=F_VERSION_1, queue_size=8)
        d.common_write(0x16, 2, 0)

    def probe():
        vq = d.fn.queues[0].vq
        return [d.status, d.common_read(0x18, 2), d.common_read(0x1C, 2), d.common_read(0x0C, 4),
                vq and vq.save(), d.device.bytes_given, d.read_isr(), d.irq.level]
    return Rig(d.fn, d.mmio, a, b, probe)


def virtio_mmio() -> Rig:
    from pyvmm.devices.virtio.rng import VirtioRng
    from .devices.test_virtio_mmio import QSIZE, MmioDriver
    d = MmioDriver(lambda memory: VirtioRng(memory, lambda n: b"\x5a" * n))

    def a():
        d.init()
        d.submit([(32, True)])

    def b():
        d.w(0x70, 0)                     # reset
        d.w(0x70, 1 | 2)                 # ACK | DRIVER, queue left unset
        d.w(0x30, 0)
        d.w(0x38, QSIZE // 2)

    def probe():
        q = d.fn.queues[0]
        return [d.r(0x70), d.r(0x38), d.r(0x44), d.r(0x60), q.vq and q.vq.save(), d.fn.device.bytes_given,
                list(d.edges)]
    return Rig(d.fn, d.bus, a, b, probe)


def ide_channel() -> Rig:
    import tempfile
    from pyvmm.devices.ide.piix import place_primary_channel
    from pyvmm.storage.image import open_image
    tmp = tempfile.TemporaryDirectory()
    path = f"{tmp.name}/disk.raw"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 128)                   # 64 sectors
    image = open_image(path, "raw")
    bus, irq = io_bus(), IrqLine(14)
    dev = place_primary_channel(bus, irq, image)

    def a():                                                # READ SECTORS 2 at LBA 3, 50 words in
        for port, value in ((0x1F6, 0xE0), (0x1F2, 2), (0x1F3, 3), (0x1F7, 0x20)):
            bus.write(port, 1, value)
        bus.read_many(0x1F0, 2, 50)

    def b():
        bus.write(0x3F6, 1, 0x02)
        bus.write(0x1F7, 1, 0xEC)

    def cleanup():
        image.close()
        tmp.cleanup()
    return Rig(dev, bus, a, b, lambda: [bus.read(0x3F6, 1), bus.read(0x1F2, 1), bus.read(0x1F3, 1), irq.level,
                                        bus.read_many(0x1F0, 2, 8)], mapped=False, cleanup=cleanup)


def pci_hotplug() -> Rig:
    from pyvmm.devices.pcihotplug import HOTPLUG_BASE, HOTPLUG_LENGTH, PciHotplug
    bus, gpe = io_bus(), []
    dev = PciHotplug(raise_gpe=lambda: gpe.append(1))
    bus.insert(HOTPLUG_BASE, HOTPLUG_LENGTH, dev, "pci-hotplug")

    def a():
        dev.plug(3)
        dev.plug(5)
        bus.read(HOTPLUG_BASE, 4)               # the guest's _E01 saw slots 3 and 5 ...
        dev.plug(7)                             # ... and not 7 yet

    def b():
        dev.plug(9)
    return Rig(dev, bus, a, b, lambda: [bus.read(HOTPLUG_BASE + o, 4) for o in (0xC, 0x4, 0x0)])


def ide_bus_master() -> Rig:
    from pyvmm.devices.ide.busmaster import IdeBusMaster
    bus, dev = io_bus(), IdeBusMaster()
    bus.insert(0xC000, 16, dev, "ide-bus-master")
    return Rig(dev, bus, lambda: (bus.write(0xC004, 4, 0x12345678), bus.write(0xC002, 1, 0x60)),
               lambda: bus.write(0xC004, 4, 0x0BADF00C), lambda: [bus.read(0xC000 + i, 1) for i in range(16)])


CASES = {"IdeChannel": ide_channel, "IdeBusMaster": ide_bus_master, "Serial8250": serial, "I8042": i8042, "Rtc": rtc, "Port80": port80,
         "DebugExit": debug_exit, "Pic8259": pic8259, "PicPair": pic_pair, "Pit": pit,
         "LocalApic": local_apic, "IoApic": io_apic, "PlatformInterrupts": platform,
         "GuestClock": guest_clock, "FwCfg": fwcfg, "AcpiPm": acpi, "PvDoorbell": doorbell,
         "VmwareBackdoor": backdoor, "GuestRpc": guest_rpc, "Hypervisor": hypervisor,
         "PciHostBridge": pci_bridge, "PciFunction": pci_function, "VirtioPci": virtio_pci,
         "VirtioMmio": virtio_mmio, "PciHotplug": pci_hotplug}
# Components whose state only travels inside their owner's (and is checked there).
PARTS = {"PitCounter": "Pit"}



@pytest.fixture(params=sorted(CASES))
def rig(request):
    made = CASES[request.param]()
    yield made
    made.cleanup()


def device_classes() -> dict[str, type]:
    """Every class under pyvmm/devices and pyvmm/paravirt that declares a state version."""
    found = {}
    for info in [*pkgutil.walk_packages(pyvmm.devices.__path__, "pyvmm.devices."),
                 *pkgutil.walk_packages(pyvmm.paravirt.__path__, "pyvmm.paravirt.")]:
        module = importlib.import_module(info.name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and hasattr(cls, "STATE_VERSION"):
                found[cls_name] = cls
    return found


def test_every_device_class_has_a_case():
    assert set(device_classes()) == set(CASES) | set(PARTS)


def test_speaks_the_protocol(rig):
    assert isinstance(rig.dev, Stateful)
    assert isinstance(rig.dev, Device) == rig.mapped
    assert isinstance(rig.dev, Registers) == rig.mapped
    assert isinstance(rig.dev.STATE_VERSION, int)
    state = rig.dev.save()
    assert state["version"] == rig.dev.STATE_VERSION


def test_save_reset_restore_gives_the_same_registers(rig):
    rig.drive_a()
    state = rig.dev.save()
    expected = rig.probe()
    rig.drive_b()
    rig.dev.reset()
    assert rig.probe() != expected, "state A looks like power-on: the case checks nothing"
    rig.drive_b()
    rig.dev.reset()
    rig.dev.restore(state)
    assert rig.probe() == expected


def test_state_survives_json(rig):
    rig.drive_a()
    state = rig.dev.save()
    expected = rig.probe()
    text = json.dumps(state)
    assert json.loads(text) == state        # no tuples, int keys or bytes
    rig.drive_b()
    rig.dev.reset()
    rig.dev.restore(json.loads(text))
    assert rig.probe() == expected


def bad_states(state: dict) -> list:
    version = state["version"]
    out = [None, "garbage", [], 7, {}, {"version": str(version)}, {"version": True},
           {**state, "version": version + 1}, {**state, "version": 0}, {"version": version}]
    for key in state:
        if key != "version":
            out.append({**state, key: "garbage"})
            out.append({k: v for k, v in state.items() if k != key})
    return out


def test_bad_state_is_one_line_and_changes_nothing(rig):
    name = type(rig.dev).__name__
    rig.drive_a()
    good = rig.dev.save()
    rig.drive_b()
    before = rig.dev.save()
    for bad in bad_states(good):
        with pytest.raises(DeviceStateError) as err:
            rig.dev.restore(bad)
        message = str(err.value)
        assert message and "\n" not in message and name in message, (bad, message)
        assert rig.dev.save() == before, f"restore of {bad!r} changed the device"


@pytest.mark.parametrize("name, path", [("PicPair", ("master",)), ("Pit", ("counters", 1)),
                                        ("PlatformInterrupts", ("lapics", 1)),
                                        ("PlatformInterrupts", ("pic", "slave")),
                                        ("VmwareBackdoor", ("rpc",))])
def test_nested_state_version_is_checked(name, path):
    rig = CASES[name]()
    rig.drive_a()
    state = json.loads(json.dumps(rig.dev.save()))
    inner = state
    for step in path:
        inner = inner[step]
    inner["version"] = 99
    rig.drive_b()
    before = rig.dev.save()
    with pytest.raises(DeviceStateError, match="version 99"):
        rig.dev.restore(state)
    assert rig.dev.save() == before


def test_platform_refuses_a_state_of_another_cpu_count():
    one = PlatformInterrupts(1, GuestClock("deterministic"))
    two = PlatformInterrupts(2, GuestClock("deterministic"))
    with pytest.raises(DeviceStateError, match="expected 2 items"):
        two.restore(one.save())


def test_hypervisor_timer_keeps_its_guest_deadline():
    memory, now = GuestMemory(1 << 20), [1_000_000]
    make = lambda: Hypervisor(memory, lambda data: None, lambda irq: None,  # noqa: E731
                              lambda kind, status: None, clock_ns=lambda: now[0])
    hv, other = make(), make()
    try:
        hv.call(Vcpu(1), abi.OP_TIMER_ONESHOT, now[0] + 30 * 10**9, 0, 0, 0)
        state = json.loads(json.dumps(hv.save()))
        assert state["timer_vcpu"] == 1
        assert abs(state["timer_deadline_ns"] - (now[0] + 30 * 10**9)) < 10**9
        now[0] += 10 * 10**9                 # the restoring machine's guest clock is later
        other.restore(state)
        again = other.save()
        # the timer is as far into guest time as saved: 20 s from the new now
        assert abs(again["timer_deadline_ns"] - state["timer_deadline_ns"]) < 10**9
        assert 19 < other._timer.when - time.monotonic() < 21
        other.reset()
        assert other.save()["timer_deadline_ns"] is None
    finally:
        hv.close()
        other.close()
        memory.close()


def test_every_device_of_a_built_machine_is_reached_through_the_contract():
    from pyvmm.builder import build_machine, destroy_machine
    from pyvmm.config import VmConfig

    from .rawguest import raw_boot

    cfg = VmConfig(mem_mib=16, engine="bt", deterministic=True, no_reboot=True,
                   vmware_backdoor=True, debug_exit=(0x501, 2))
    m = build_machine(cfg, lambda data: None, boot=raw_boot(b"\xf4", "real"))
    try:
        assert all(isinstance(dev, Stateful) for dev in m.devices.values()), m.devices
        known = [id(dev) for dev in m.devices.values()]
        for bus in (m.io_bus, m.mmio_bus):
            for base, _length, name in bus.devices():
                mapped = bus.find(base).device
                assert isinstance(mapped, Registers), name
                if isinstance(mapped, Device):   # not a window onto a part of one
                    assert id(mapped) in known, f"{name} is on the bus but not in machine.devices"
        assert {"serial0", "i8042", "rtc", "post", "debug_exit", "clock", "intc", "acpi_pm",
                "fw_cfg", "paravirt", "vmware_backdoor"} <= set(m.devices)
        snapshot = json.loads(json.dumps({name: dev.save() for name, dev in m.devices.items()}))
        for name, dev in m.devices.items():
            dev.reset()
            dev.restore(snapshot[name])
        assert {name: dev.save() for name, dev in m.devices.items()} == snapshot
    finally:
        destroy_machine(m)
