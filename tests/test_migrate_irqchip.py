"""Moving a machine with KVM's in-kernel irqchip between engines with its
interrupt state (pyvmm/migrate.py, engines/kvm/platform_convert.py).

Unit round trips: each Python model, driven through its registers, is
converted to KVM's structure and back, and behaves as before (registers
read the same, timers fire when they would have).  KVM round trip: a
guest programs the in-kernel PIC, IOAPIC, local APIC and PIT; the state
goes KVM -> models -> KVM and KVM's structures come back the same.  The
issue's test: a guest counting PIT ticks (through the 8259, and through
the IOAPIC and local APIC) is moved hw -> bt -> hw ... at random moments
and finishes with its count, each engine having counted on."""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest

from pyvmm.builder import build_machine, destroy_machine
from pyvmm.config import VmConfig
from pyvmm.devices.platform.clock import NEVER, GuestClock
from pyvmm.devices.platform.ioapic import IoApic
from pyvmm.devices.platform.lapic import (DFR, ICR_HI, LDR, LVT_LINT1, LVT_TIMER, SVR, TIMER_CCR,
                                          TIMER_DCR, TIMER_ICR, TPR, LocalApic)
from pyvmm.devices.platform.pic import PicPair
from pyvmm.devices.platform.pit import Pit
from pyvmm.engines.kvm import platform_convert as conv
from pyvmm.machine import StopReason
from pyvmm.migrate import switch_engine

from .hostfacts import require_kvm
from .modeguests import IDT_STUBS, PIC_INIT, PIT_10MS, boot_for, idt_setup
from .rawguest import build_guest, raw_boot, run_until_stop


class Pulse:
    def __init__(self):
        self.count = 0

    def pulse(self) -> None:
        self.count += 1


# --- unit round trips: model -> KVM structure -> model -------------------------------

def _programmed_pic() -> PicPair:
    pair = PicPair()
    for port, value in ((0, 0x11), (1, 0x20), (1, 4), (1, 1), (1, 0xB8)):
        pair.master.write(port, 1, value)
    for port, value in ((0, 0x11), (1, 0x28), (1, 2), (1, 3), (1, 0x3F)):   # slave in auto-EOI
        pair.slave.write(port, 1, value)
    pair.elcr.write(1, 1, 0x0E)                      # IRQ 9-11 level-triggered
    pair.set_irq(1, 1)
    pair.set_irq(0, 1)
    pair.set_irq(6, 1)
    pair.set_irq(9, 1)
    assert pair.acknowledge() == 0x20                # IRQ 0 in service
    pair.master.write(0, 1, 0xC4)                    # OCW2: set priority, IR4 lowest
    pair.master.write(0, 1, 0x0B)                    # OCW3: read ISR
    return pair


def test_pic_state_survives_kvm_pic_state():
    pair = _programmed_pic()
    for i, chip in enumerate(pair.chips):
        state = chip.save()
        data = conv.pic_to_kvm(state, i)
        assert len(data) == conv.CHIP_DATA_SIZE
        assert conv.pic_from_kvm(data, i) == state
    assert data[conv._ELCR] == 0x0E and data[conv._IRQ_BASE] == 0x28 and data[conv._AUTO_EOI] == 1
    master = conv.PIC.unpack_from(conv.pic_to_kvm(pair.master.save(), 0))
    assert master[conv._ISR] == 1 and master[conv._IMR] == 0xB8 and master[conv._PRIORITY_ADD] == 5
    again = PicPair()
    again.restore({"version": 1, "master": conv.pic_from_kvm(conv.pic_to_kvm(pair.master.save(), 0), 0),
                   "slave": conv.pic_from_kvm(conv.pic_to_kvm(pair.slave.save(), 1), 1)})
    assert again.master.read(0, 1) == 1              # ISR, as OCW3 asked
    assert again.interrupt_pending() == pair.interrupt_pending()
    assert again.acknowledge() == pair.acknowledge()


def test_pic_fields_kvm_lacks_come_from_like():
    pair = _programmed_pic()
    state = pair.master.save()
    state["icw3"] = 0x55
    assert conv.pic_from_kvm(conv.pic_to_kvm(state, 0), 0)["icw3"] == 4       # a PC's wiring
    assert conv.pic_from_kvm(conv.pic_to_kvm(state, 0), 0, like=state) == state


def test_ioapic_state_survives_kvm_ioapic_state():
    io = IoApic(1)
    io.write(0, 4, 0x00)
    io.write(0x10, 4, 0x0F000000)                    # ID 15
    for pin, lo, hi in ((2, 0x31, 0x01000000), (9, 0xA041 | 1 << 15, 0), (16, 0x10000 | 0x55, 0xFF000000)):
        io.write_reg(0x10 + 2 * pin, lo)
        io.write_reg(0x11 + 2 * pin, hi)
    io.set_irq(9, 1)                                 # level: delivered, remote IRR set
    io.set_irq(2, 1)                                 # edge: delivered
    io.write(0, 4, 0x13)
    state = io.save()
    data = conv.ioapic_to_kvm(state)
    back = conv.ioapic_from_kvm(data)
    assert back["rte"] == state["rte"] and back["id"] == 15 and back["regsel"] == 0x13
    assert back["rte"][9] & 1 << 14                  # remote IRR travels
    assert back["levels"] == 1 << 9                  # the edge pin's level stays behind (KVM would re-inject it)
    assert state["levels"] == 1 << 9 | 1 << 2


def _programmed_lapic(clock: GuestClock, periodic: bool = True) -> LocalApic:
    apic = LocalApic(0, clock, bsp=True)
    apic.write_reg(SVR, 0x1FF)
    apic.write_reg(TPR, 0x20)
    apic.write_reg(LDR, 0x01000000)
    apic.write_reg(DFR, 0x0FFFFFFF)
    apic.write_reg(LVT_LINT1, 0x400)
    apic.write_reg(ICR_HI, 0x02000000)
    apic.accept(0x41)
    apic.accept(0x62, level=True)
    assert apic.acknowledge() == 0x62
    apic.accept(0x51)
    apic.write_reg(TIMER_DCR, 0x3)                   # divide by 16
    apic.write_reg(LVT_TIMER, 0xEF | (1 << 17 if periodic else 0))
    apic.write_reg(TIMER_ICR, 100_000)               # 1.6 ms
    return apic


@pytest.mark.parametrize("periodic", [True, False])
def test_lapic_state_survives_kvm_register_page(periodic):
    clock = GuestClock("deterministic")
    apic = _programmed_lapic(clock, periodic)
    clock.advance_ns(700_000)
    now = clock.now_ns()
    state = apic.save()
    page = conv.lapic_to_kvm(state, now)
    assert len(page) == conv.LAPIC_STATE_SIZE
    assert conv._reg(page, TIMER_CCR) == (1_600_000 - 700_000) // 16
    back = conv.lapic_from_kvm(page, now, state["apic_base"])
    same = {k: v for k, v in state.items() if k not in ("timer_start",)}
    assert {k: v for k, v in back.items() if k in same} == same
    twin = LocalApic(0, clock, bsp=True)
    twin.restore(back)
    for reg in list(range(0x20, 0x400, 0x10)):
        assert twin.read_reg(reg) == apic.read_reg(reg), hex(reg)
    for step in (899_999, 1, 1_600_000):
        clock.advance_ns(step)
        assert twin.poll(clock.now_ns()) == apic.poll(clock.now_ns())
        assert twin.read_reg(TIMER_CCR) == apic.read_reg(TIMER_CCR)
        assert twin.irr == apic.irr


def test_lapic_tsc_deadline_moves_as_guest_time():
    clock = GuestClock("deterministic")
    apic = LocalApic(0, clock, bsp=True)
    apic.write_reg(SVR, 0x1FF)
    apic.write_reg(LVT_TIMER, 0xEE | 2 << 17)
    apic.write_tsc_deadline(clock.tsc() + 4_000)    # 2 us on bt's 2 GHz TSC
    state = apic.save()
    page = conv.lapic_to_kvm(state, clock.now_ns())
    back = conv.lapic_from_kvm(page, clock.now_ns(), state["apic_base"], state["timer_expiry"],
                               state["tsc_deadline"])
    assert back == state
    assert conv.lapic_from_kvm(page, 0, state["apic_base"])["timer_expiry"] == NEVER   # disarmed


def _programmed_pit(clock: GuestClock) -> tuple[Pit, Pulse]:
    irq = Pulse()
    pit = Pit(clock, irq)
    pit.write(3, 1, 0x34)                            # counter 0: lo/hi, mode 2
    pit.write(0, 1, 0x9C)
    pit.write(0, 1, 0x2E)                            # 11932: 100 Hz
    pit.write(3, 1, 0x72)                            # counter 1: lo/hi, mode 1 (waits for its gate)
    pit.write(1, 1, 0x34)                            # only the low byte so far
    pit.write(3, 1, 0xB6)                            # counter 2: lo/hi, mode 3
    pit.write(2, 1, 0x00)
    pit.write(2, 1, 0x10)
    pit.port61.write(0, 1, 1)                        # gate 2 on
    clock.advance_ns(23_456_789)
    pit.poll(clock.now_ns())
    pit.write(3, 1, 0x80)                            # latch counter 2
    assert pit.read(2, 1) >= 0                       # ... and read its low byte
    return pit, irq


def test_pit_state_survives_kvm_pit_state2():
    clock = GuestClock("deterministic")
    pit, irq = _programmed_pit(clock)
    now, host = clock.now_ns(), 10 ** 12
    state = pit.save()
    data = conv.pit_to_kvm(state, now, host)
    assert len(data) == conv.PIT_STATE2_SIZE
    ch0 = conv.PIT_CHANNEL.unpack_from(data, 0)
    assert ch0[0] == 11932 and ch0[9] == 2 and ch0[12] == host - (now - state["counters"][0]["start"])
    assert conv.PIT_CHANNEL.unpack_from(data, 24)[6] == conv.RW_WORD1          # counter 1 mid-write
    back = conv.pit_from_kvm(data, now, host, like=state)
    sent_before = irq.count
    twin_irq = Pulse()
    twin = Pit(clock, twin_irq)
    twin.restore(back)
    assert twin.next_deadline_ns() == pit.next_deadline_ns()
    assert twin.counters[1].write_hi and twin.counters[1].low_byte == 0x34
    assert twin.read(2, 1) == pit.read(2, 1)                                  # the latch's high byte
    for step in (1_000_000, 5_000_000, 7_000_000, 40_000_000):
        clock.advance_ns(step)
        now = clock.now_ns()
        for a, b in zip(twin.counters, pit.counters):
            assert a.count_and_out(now) == b.count_and_out(now)
        twin.poll(now), pit.poll(now)
        assert twin_irq.count == irq.count - sent_before
    assert twin_irq.count == 2                      # edges at 30 ms and (coalesced) 40-70 ms


def test_events_from_bt_carry_nmi_and_shadow():
    events = conv.events_to_kvm(True, True, bytes([1, 14, 1, 0, 5, 0, 0, 0, 1, 0x30, 0, 0]) + bytes(52))
    got = conv.events_from_kvm(events)
    assert got["nmi"] and got["shadow"]
    assert got["exception"] is None and got["interrupt"] is None


# --- KVM -> models -> KVM on a live in-kernel irqchip ----------------------------------------

CHECKPOINT = 0xE0

PROGRAMS_EVERYTHING = f"""
    cli
    mov $0x11, %al; out %al, $0x20; mov $0x30, %al; out %al, $0x21
    mov $0x04, %al; out %al, $0x21; mov $0x01, %al; out %al, $0x21
    mov $0xB5, %al; out %al, $0x21
    mov $0x11, %al; out %al, $0xA0; mov $0x38, %al; out %al, $0xA1
    mov $0x02, %al; out %al, $0xA1; mov $0x03, %al; out %al, $0xA1
    mov $0x08, %al; mov $0x4D1, %dx; out %al, %dx
    mov $0x34, %al; out %al, $0x43; xor %al, %al; out %al, $0x40; mov $0x80, %al; out %al, $0x40
    mov $0xB0, %al; out %al, $0x43; mov $0x22, %al; out %al, $0x42
    movl $0x1ff, 0xfee000f0
    movl $0x30, 0xfee00080
    movl $0x3, 0xfee003e0
    movl $0x20045, 0xfee00320
    movl $5000000, 0xfee00380
    movl $0x14, 0xfec00000
    movl $0x10031, 0xfec00010
    movl $0x15, 0xfec00000
    movl $0x02000000, 0xfec00010
    movl $0x22, 0xfec00000
    movl $0x8041, 0xfec00010
    out %al, ${CHECKPOINT}
    hlt
"""


class Checkpoint:
    """Port device: records the values written and stops the machine at each."""

    def __init__(self, machine, name: str = "checkpoint"):
        self.machine, self.name = machine, name
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)
        self.machine.request_stop(StopReason.USER, f"{self.name} {value:#x}")


def _without(data: bytes, *spans: tuple[int, int]) -> bytes:
    out = bytearray(data)
    for start, length in spans:
        out[start:start + length] = bytes(length)
    return bytes(out)


@pytest.mark.kvm
def test_live_kvm_irqchip_survives_models_and_back():
    require_kvm()
    cfg = VmConfig(mem_mib=16, engine="hw", irqchip=True, no_reboot=True)
    m = build_machine(cfg, lambda data: None, boot=raw_boot(build_guest(PROGRAMS_EVERYTHING, "prot"), "prot"))
    try:
        m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
        m.engine.run()
        assert m.stop_status.detail.startswith("checkpoint"), m.stop_status
        platform = m.devices["kvm_platform"]
        chips = {c: platform._get_chip(c) for c in (0, 1, 2)}
        pit, lapic = platform._get_pit(), platform._get_lapic(platform.vcpus[0])
        moved = platform.to_models()
        intc = moved["intc"]
        assert intc["pic"]["master"]["base"] == 0x30 and intc["pic"]["master"]["imr"] == 0xB5
        assert intc["pic"]["slave"]["elcr"] == 0x08 and intc["pic"]["slave"]["need_icw4"]
        assert intc["ioapic"]["rte"][2] == 0x02000000 << 32 | 0x10031
        assert intc["ioapic"]["rte"][9] == 0x8041
        ap = intc["lapics"][0]
        assert ap["svr"] == 0x1FF and ap["tpr"] == 0x30 and ap["dcr"] == 3
        assert ap["timer_initial"] == 5_000_000 and ap["timer_expiry"] < NEVER
        assert intc["pit"]["counters"][0]["reload"] == 0x8000 and intc["pit"]["counters"][0]["mode"] == 2
        ch2 = intc["pit"]["counters"][2]
        assert ch2["low_byte"] == 0x22 and ch2["write_hi"] and ch2["access"] == 3 and not ch2["loaded"]
        platform.reset()                              # power-on, so the restore has to bring it all back
        assert platform._get_chip(0) != chips[0]
        platform.from_models(moved)
        for c in (0, 1, 2):
            assert platform._get_chip(c) == chips[c], c
        skip_time = [(24 * i + 16, 8) for i in range(3)]       # count_load_time: restarted by KVM
        assert _without(platform._get_pit(), *skip_time) == _without(pit, *skip_time)
        timer = (TIMER_CCR, 4)
        assert _without(platform._get_lapic(platform.vcpus[0]), timer) == _without(lapic, timer)
        left = conv._reg(platform._get_lapic(platform.vcpus[0]), TIMER_CCR)
        assert 0 < left <= conv._reg(lapic, TIMER_CCR)
    finally:
        destroy_machine(m)


# --- the test: a ticking guest moved hw -> bt -> hw ... mid-run -------------------------

DONE_PORT = 0xE0
DONE = 0xD0
IN_HANDLER_PORT = 0xE1
TICKS = 64
IDT = 0x180000
SPIN = 5000                 # handler iterations of a busy guest (a few ms)
PIC_VECTOR, APIC_VECTOR = 0x20, 0x31

# IOAPIC pins 0 and 2 both to APIC_VECTOR: the MADT puts the PIT on pin 2
# (bt's platform), KVM's default GSI routing on pin 0 (hw); one of them ticks.
APIC_ROUTE = f"""
    mov esi, 0xfee00000
    mov edi, 0xfec00000
    mov dword ptr [rsi + 0xf0], 0x1ff
    mov dword ptr [rdi], 0x10
    mov dword ptr [rdi + 0x10], {APIC_VECTOR}
    mov dword ptr [rdi], 0x11
    mov dword ptr [rdi + 0x10], 0
    mov dword ptr [rdi], 0x14
    mov dword ptr [rdi + 0x10], {APIC_VECTOR}
    mov dword ptr [rdi], 0x15
    mov dword ptr [rdi + 0x10], 0
"""


def ticking_guest(via_apic: bool, busy: bool) -> bytes:
    """Counts TICKS timer interrupts in EBX, then writes DONE to DONE_PORT;
    an unexpected vector is written there instead.  Between ticks it halts;
    a `busy` guest's handler spins before its EOI, so that a move often
    finds the tick in service and the next one requested.  (A busy main
    loop is no use: bt polls its timers between slices, and a tight loop
    makes a slice long.)  On
    every 16th tick the handler writes IN_HANDLER_PORT before its EOI: a
    place to move it with the interrupt in service."""
    vector = APIC_VECTOR if via_apic else PIC_VECTOR
    eoi = ("mov eax, 0xfee000b0\n    mov dword ptr [rax], 0" if via_apic
           else "mov al, 0x20\n    out 0x20, al")
    src = (".intel_syntax noprefix\n    cli\n" + idt_setup(IDT) + PIC_INIT
           + f"    mov al, {0xFF if via_apic else 0xFE}; out 0x21, al; mov al, 0xff; out 0xa1, al\n"
           + (APIC_ROUTE if via_apic else "") + PIT_10MS + f"""
    xor ebx, ebx
    sti
1:  hlt
    cmp ebx, {TICKS}
    jb 1b
    cli
    mov al, {DONE}; out {DONE_PORT}, al
2:  hlt
    jmp 2b
common:
    push rax
    push rdx
    mov rax, [rsp + 16]
    cmp eax, {vector}
    jne 3f
    inc ebx
    cmp ebx, {TICKS}
    jb 7f
    and dword ptr [rsp + 48], ~0x200   # the last tick: return with IF clear, so it stays the last
7:  test ebx, 15
    jnz 6f
    out {IN_HANDLER_PORT}, al      # every 16th tick: a move with the tick in service
6:  push rcx
    mov ecx, {SPIN if busy else 1}
5:  dec ecx
    jnz 5b
    pop rcx
    {eoi}
    pop rdx
    pop rax
    add rsp, 16
    iretq
3:  out {DONE_PORT}, al
    cli
4:  hlt
    jmp 4b
""" + IDT_STUBS)
    return build_guest(src, "long")


def _guest_ns(m) -> int:
    engine = m.engine
    return engine.kvm_clock() if engine.name == "hw" else engine.clock.now_ns()


def _guest_tsc(m) -> int:
    if m.engine.name == "hw":
        return m.engine.vcpus[0].get_msrs([0x10])[0x10]
    from pyvmm.engines.bt.system import tsc
    return tsc(m.engine.cpus[0])


def _in_service(m, via_apic: bool) -> bool:
    """Whether the engine's interrupt platform has the tick in service.
    (On a kvm_pvm host KVM's local APIC shows no ISR bit for an interrupt
    it injected, so under hw only the 8259 says so; a bit loaded into it
    with KVM_SET_LAPIC is shown, and cleared by the guest's EOI.)"""
    if m.engine.name == "hw":
        intc = m.devices["kvm_platform"].to_models()["intc"]
        pic_isr, lapic_isr = intc["pic"]["master"]["isr"], intc["lapics"][0]["isr"]
    else:
        pic_isr, lapic_isr = m.engine.intc.pic.master.isr, m.engine.intc.lapics[0].isr
    return bool(lapic_isr >> APIC_VECTOR & 1) if via_apic else bool(pic_isr & 1)


@pytest.mark.kvm
@pytest.mark.parametrize("busy", [False, True], ids=["halting", "busy"])
@pytest.mark.parametrize("via_apic", [False, True], ids=["pic", "ioapic-lapic"])
def test_ticking_guest_moves_hw_bt_hw_and_keeps_its_tick(via_apic, busy):
    require_kvm()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    cfg = VmConfig(mem_mib=64, engine="hw", irqchip=True, no_reboot=True)
    m = build_machine(cfg, lambda data: None, boot=boot_for(ticking_guest(via_apic, busy)))
    done = Checkpoint(m, "done")
    m.io_bus.insert(DONE_PORT, 1, done, "done")
    in_handler = Checkpoint(m, "in-handler")
    m.io_bus.insert(IN_HANDLER_PORT, 1, in_handler, "in-handler")
    stints: list[tuple[str, str, float, int, int]] = []   # engine, why it ended, seconds, ticks before, after
    deadline = time.monotonic() + 20
    try:
        while True:
            m.clear_stop()
            timer = threading.Timer(rng.uniform(0.06, 0.15), m.request_stop,
                                    args=(StopReason.USER, "switch"))
            before = m.engine.save_state(0).regs["rbx"] & 0xFFFFFFFF
            t0 = time.monotonic()
            timer.start()
            try:
                m.engine.run()
            finally:
                timer.cancel()
                timer.join()
            after = m.engine.save_state(0).regs["rbx"] & 0xFFFFFFFF
            why = m.stop_status.detail
            stints.append((m.engine.name, why, time.monotonic() - t0, before, after))
            handling = why.startswith("in-handler")
            if not (handling or why == "switch") or time.monotonic() > deadline:
                break
            served = _in_service(m, via_apic)
            if handling and m.engine.name == "bt":
                assert served, "bt: the tick the handler runs for is not in service"
            tsc = _guest_tsc(m)
            switch_engine(m, "bt" if m.engine.name == "hw" else "hw")
            # the TSC goes on from where it was (the bound allows for a loaded host)
            assert 0 <= _guest_tsc(m) - tsc < 5 * 10 ** 9, f"the TSC jumped from {tsc} to {_guest_tsc(m)}"
            assert _in_service(m, via_apic) == served, (
                f"seed {seed}: in service {served} before the move to {m.engine.name}, not after")
        assert done.values == [DONE], (f"seed {seed}: guest reported {done.values} "
                                       f"after {stints} ({m.stop_status})")
        assert after == TICKS
        guest_ms = _guest_ns(m) / 1e6
        assert guest_ms >= (TICKS - 1) * 10 * 0.9, f"seed {seed}: ticks came too fast ({guest_ms:.0f} ms)"
        if not busy:                         # a busy handler may rightly have ticks coalesce
            assert guest_ms <= TICKS * 10 * 4, f"seed {seed}: ticks were lost ({guest_ms:.0f} ms)"
        assert {name for name, *_ in stints} == {"hw", "bt"}, stints
        assert sum(why == "switch" for _, why, *_ in stints) >= 3, stints
        assert len(in_handler.values) == TICKS // 16, stints       # moved in service, each time
        for name, why, seconds, before, after in stints[:-1]:
            assert after >= before
            if why == "switch" and seconds >= 0.06:
                assert after > before, f"seed {seed}: no tick under {name} in {seconds:.3f} s: {stints}"
    finally:
        destroy_machine(m)


KVMCLOCK_MSR, PV_EOI_MSR, APIC_BASE_MSR = 0x4B564D01, 0x4B564D04, 0x1B
PVTI_GPA, PV_EOI_GPA = 0x300000, 0x301000


def _run_for(m, seconds: float) -> None:
    m.clear_stop()
    run_until_stop(m, seconds, "switch")
    assert m.stop_status.detail == "switch", m.stop_status


@pytest.mark.kvm
def test_kvmclock_msrs_and_guest_time_move_both_ways():
    require_kvm()
    from pyvmm.engines.bt.system import rdmsr
    cfg = VmConfig(mem_mib=64, engine="hw", irqchip=True, no_reboot=True)
    m = build_machine(cfg, lambda data: None, boot=boot_for(ticking_guest(False, False)))
    try:
        vcpu = m.engine.vcpus[0]
        assert vcpu.set_msrs({KVMCLOCK_MSR: PVTI_GPA | 1, PV_EOI_MSR: PV_EOI_GPA | 1}) == 2
        apic_base = vcpu.get_msrs([APIC_BASE_MSR])[APIC_BASE_MSR]
        _run_for(m, 0.1)
        hw_ns = m.engine.kvm_clock()
        m.memory.write(PVTI_GPA, bytes(32))               # bt must write the pvclock record again
        switch_engine(m, "bt")
        c = m.engine.cpus[0]
        assert 0 <= m.engine.clock.now_ns() - hw_ns < 10 ** 8   # guest time went on from where it was
        assert rdmsr(c, KVMCLOCK_MSR) == PVTI_GPA | 1 and rdmsr(c, PV_EOI_MSR) == PV_EOI_GPA | 1
        assert rdmsr(c, APIC_BASE_MSR) == apic_base
        version, _, tsc_stamp, system_ns, mul = struct.unpack_from("<IIQQI", m.memory.read(PVTI_GPA, 32))
        assert version and version % 2 == 0 and mul and abs(system_ns - hw_ns) < 10 ** 8
        _run_for(m, 0.1)
        bt_ns = m.engine.clock.now_ns()
        switch_engine(m, "hw")
        vcpu = m.engine.vcpus[0]
        assert vcpu.get_msrs([KVMCLOCK_MSR, PV_EOI_MSR]) == {KVMCLOCK_MSR: PVTI_GPA | 1, PV_EOI_MSR: PV_EOI_GPA | 1}
        assert 0 <= m.engine.kvm_clock() - bt_ns < 10 ** 8
        _run_for(m, 0.05)
        assert m.engine.save_state(0).regs["rbx"] > 0        # still ticking
    finally:
        destroy_machine(m)


@pytest.mark.kvm
def test_an_ap_waiting_for_its_sipi_keeps_waiting():
    require_kvm()
    from pyvmm.engines.kvm.platform_state import MP_STATE_INIT_RECEIVED, MP_STATE_UNINITIALIZED
    cfg = VmConfig(mem_mib=64, engine="hw", irqchip=True, no_reboot=True, cpus=2)
    m = build_machine(cfg, lambda data: None, boot=boot_for(ticking_guest(False, False)))
    try:
        _run_for(m, 0.08)
        assert m.engine.vcpus[1].get_mp_state() == MP_STATE_UNINITIALIZED
        switch_engine(m, "bt")
        assert m.engine.sched.waiting_sipi == [False, True]
        ticks = m.engine.save_state(0).regs["rbx"]
        _run_for(m, 0.08)
        assert m.engine.cpus[1].icount == 0                  # the AP ran nothing
        switch_engine(m, "hw")
        assert m.engine.vcpus[1].get_mp_state() == MP_STATE_INIT_RECEIVED
        _run_for(m, 0.08)
        assert m.engine.save_state(0).regs["rbx"] > ticks
    finally:
        destroy_machine(m)
