"""Translation between KVM's in-kernel platform structures and the states
of pyvmm's Python platform models (devices/platform), both ways.

KVM side (include/uapi/asm/kvm.h, Documentation/virt/kvm/api.rst):
struct kvm_pic_state (KVM_GET/SET_IRQCHIP chips 0 and 1),
struct kvm_ioapic_state (chip 2), the 1 KiB kvm_lapic_state register page
(KVM_GET/SET_LAPIC, xAPIC layout of Intel SDM vol. 3 ch. 11),
struct kvm_pit_state2 (KVM_GET/SET_PIT2) and struct kvm_vcpu_events.
Model side: the save() dicts of Pic8259, IoApic, LocalApic and PitCounter.

Time: KVM's timers count in host time, the models' in guest time.  Every
conversion takes `now_ns` (the guest clock at the switch, kvmclock and
GuestClock being made equal) and, for the PIT, `host_ns` (the host's
CLOCK_MONOTONIC, which KVM's count_load_time is in).  A timer is carried
as the time it has left: the APIC timer through TMCCT (KVM_SET_LAPIC
restarts it from there), the PIT's counter 0 through its phase (KVM_SET_PIT2
restarts the period, so at most one period's phase is lost going to hw).

Fields one side has and the other has not are taken from `like`: the
other side's current state (the model's save() or KVM's current structure),
or reset values when it is None.  Nothing here raises but struct.error on
a structure of the wrong size."""

from __future__ import annotations

import struct

from ...devices.platform.clock import APIC_BUS_HZ, NEVER, PIT_HZ, ns_for_ticks, ticks_at
from ...devices.platform.ioapic import PINS, RTE_LEVEL
from ...devices.platform.lapic import (APIC_BASE_BSP, APIC_BASE_ENABLE, DFR, ESR, ICR_HI, ICR_LO, ID, IRR0, ISR0,
                                       LAPIC_BASE, LDR, LVT_TIMER, LVTS, SVR, TIMER_CCR, TIMER_DCR, TIMER_ICR,
                                       TIMER_PERIODIC, TIMER_TSC_DEADLINE, TMR0, TPR, _divider)
from ...devices.platform.pic import ELCR_MASKS

CHIP_DATA_SIZE = 512

# struct kvm_pic_state: 16 bytes.
PIC = struct.Struct("<16B")
(_LAST_IRR, _IRR, _IMR, _ISR, _PRIORITY_ADD, _IRQ_BASE, _READ_REG_SELECT, _POLL, _SPECIAL_MASK,
 _INIT_STATE, _AUTO_EOI, _ROTATE_ON_AUTO_EOI, _SFNM, _INIT4, _ELCR, _ELCR_MASK) = range(16)
# ICW3 as a PC wires the pair: the slave on the master's IR2, with cascade id 2.
PC_ICW3 = (0x04, 0x02)

# struct kvm_ioapic_state: base_address, ioregsel, id, irr, pad, redirtbl[24].
IOAPIC = struct.Struct(f"<QIIII{PINS}Q")
IOAPIC_BASE_ADDRESS = 0xFEC00000

# struct kvm_pit_channel_state (24 bytes) x 3, then flags and reserved[9].
PIT_CHANNEL = struct.Struct("<IHBBBBBBBBBBq")
PIT_STATE2_SIZE = 112
RW_LSB, RW_MSB, RW_WORD0, RW_WORD1 = 1, 2, 3, 4
PIT_MODE_UNSET = 0xFF      # KVM's mode of a counter never programmed

LAPIC_STATE_SIZE = 0x400
# KVM's APIC timer counts 1 ns bus cycles (APIC_BUS_CYCLE_NS), as the model
# does (APIC_BUS_HZ is 1 GHz): TMICT and TMCCT mean the same on both sides.


# --- PIC --------------------------------------------------------------------------

def pic_to_kvm(state: dict, chip: int) -> bytes:
    """A Pic8259 save() dict as KVM's 512-byte chip data (chip 0 master, 1 slave)."""
    s = state
    init_state = s["init_step"] - 1 if s["init_step"] else 0
    fields = [0] * 16
    fields[_LAST_IRR], fields[_IRR], fields[_IMR], fields[_ISR] = s["lines"], s["irr"], s["imr"], s["isr"]
    fields[_PRIORITY_ADD] = (s["lowest"] + 1) & 7
    fields[_IRQ_BASE] = s["base"]
    fields[_READ_REG_SELECT], fields[_POLL], fields[_SPECIAL_MASK] = (
        int(s["read_isr"]), int(s["poll"]), int(s["special_mask"]))
    fields[_INIT_STATE] = init_state
    fields[_AUTO_EOI], fields[_ROTATE_ON_AUTO_EOI] = int(s["auto_eoi"]), int(s["rotate_aeoi"])
    fields[_SFNM], fields[_INIT4] = int(s["sfnm"]), int(s["need_icw4"])
    fields[_ELCR], fields[_ELCR_MASK] = s["elcr"] & ELCR_MASKS[chip], ELCR_MASKS[chip]
    return PIC.pack(*fields).ljust(CHIP_DATA_SIZE, b"\0")


def pic_from_kvm(data: bytes, chip: int, like: dict | None = None) -> dict:
    """KVM's chip data as a Pic8259 save() dict (its version included).
    KVM keeps neither ICW3 nor single mode: `like`'s are kept, else a PC's."""
    f = PIC.unpack_from(data)
    initialised = f[_IRQ_BASE] != 0 or f[_INIT_STATE] > 1
    return {"version": 1, "irr": f[_IRR], "isr": f[_ISR], "imr": f[_IMR], "lines": f[_LAST_IRR],
            "elcr": f[_ELCR] & ELCR_MASKS[chip], "base": f[_IRQ_BASE] & 0xF8,
            "lowest": (f[_PRIORITY_ADD] - 1) & 7,
            "init_step": f[_INIT_STATE] + 1 if f[_INIT_STATE] else 0,
            "need_icw4": bool(f[_INIT4]),
            "single": like["single"] if like else False,
            "icw3": like["icw3"] if like else (PC_ICW3[chip] if initialised else 0),
            "auto_eoi": bool(f[_AUTO_EOI]), "rotate_aeoi": bool(f[_ROTATE_ON_AUTO_EOI]),
            "read_isr": bool(f[_READ_REG_SELECT]), "poll": bool(f[_POLL]),
            "special_mask": bool(f[_SPECIAL_MASK]), "sfnm": bool(f[_SFNM])}


# --- IOAPIC ----------------------------------------------------------------------------

def _level_pins(rte: list[int]) -> int:
    return sum(1 << pin for pin, r in enumerate(rte) if r & RTE_LEVEL)


def ioapic_to_kvm(state: dict) -> bytes:
    """An IoApic save() dict as KVM's chip data.  Only level-triggered
    pins go into KVM's IRR: KVM_SET_IRQCHIP injects every IRR bit again,
    which for an edge pin would be a second interrupt."""
    rte = state["rte"]
    return IOAPIC.pack(IOAPIC_BASE_ADDRESS, state["regsel"], state["id"],
                       state["levels"] & _level_pins(rte), 0, *rte).ljust(CHIP_DATA_SIZE, b"\0")


def ioapic_from_kvm(data: bytes) -> dict:
    """KVM's chip data as an IoApic save() dict."""
    _, regsel, ioapic_id, irr, _, *rte = IOAPIC.unpack_from(data)
    return {"version": 1, "id": ioapic_id & 0xF, "regsel": regsel & 0xFF, "rte": list(rte), "levels": irr}


# --- local APIC ---------------------------------------------------------------------------

def _reg(page: bytes, off: int) -> int:
    return int.from_bytes(page[off:off + 4], "little")


def _put(page: bytearray, off: int, value: int) -> None:
    page[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")


def _bits256(page: bytes, base: int) -> int:
    return sum(_reg(page, base + 16 * i) << (32 * i) for i in range(8))


def _timer_mode(lvtt: int) -> int:
    return (lvtt >> 17) & 3


def lapic_to_kvm(state: dict, now_ns: int, like: bytes | None = None) -> bytes:
    """A LocalApic save() dict as KVM's register page at guest time
    `now_ns`; the timer's time left goes in TMCCT.  Registers the model
    does not keep (version, APR, ...) come from `like`, KVM's current page.
    The APIC base and TSC deadline are MSRs: see apic_msrs()."""
    page = bytearray(like if like is not None else bytes(LAPIC_STATE_SIZE))
    s = state
    _put(page, ID, s["apic_id"] << 24)
    _put(page, TPR, s["tpr"])
    _put(page, LDR, s["ldr"])
    _put(page, DFR, s["dfr"])
    _put(page, SVR, s["svr"])
    for base, bits in ((ISR0, s["isr"]), (TMR0, s["tmr"]), (IRR0, s["irr"])):
        for i in range(8):
            _put(page, base + 16 * i, bits >> (32 * i))
    _put(page, ESR, s["esr"])
    _put(page, ICR_LO, s["icr"] & ~(1 << 12))
    _put(page, ICR_HI, s["icr"] >> 32)
    for reg, value in s["lvt"].items():
        _put(page, int(reg), value)
    _put(page, TIMER_ICR, s["timer_initial"])
    _put(page, TIMER_DCR, s["dcr"])
    _put(page, TIMER_CCR, lapic_time_left(s, now_ns))
    return bytes(page)


def lapic_time_left(state: dict, now_ns: int) -> int:
    """The model's timer current count (TMCCT) at `now_ns`: bus ticks
    left to its next expiry, 0 when disarmed or in TSC-deadline mode."""
    lvtt = state["lvt"][str(LVT_TIMER)]
    expiry = state["timer_expiry"]
    if not state["timer_initial"] or _timer_mode(lvtt) == TIMER_TSC_DEADLINE or expiry >= NEVER:
        return 0
    tick = ns_for_ticks(_divider(state["dcr"]), APIC_BUS_HZ)
    left = -(-max(0, expiry - now_ns) // tick)
    return min(left, state["timer_initial"])


def lapic_from_kvm(page: bytes, now_ns: int, apic_base: int, deadline_ns: int | None = None,
                   tsc_deadline: int = 0, like: dict | None = None) -> dict:
    """KVM's register page (read at guest time `now_ns`) as a LocalApic
    save() dict.  `apic_base` is IA32_APIC_BASE; in TSC-deadline mode the
    timer fires at guest ns `deadline_ns` (None: disarmed) and reads back
    `tsc_deadline` (in the guest's TSC).  The ESR's pending errors come
    from `like`."""
    lvt = {str(reg): _reg(page, reg) for reg in LVTS}
    lvtt = lvt[str(LVT_TIMER)]
    initial, dcr = _reg(page, TIMER_ICR), _reg(page, TIMER_DCR) & 0xB
    current = _reg(page, TIMER_CCR)
    tick = ns_for_ticks(_divider(dcr), APIC_BUS_HZ)
    start, expiry = 0, NEVER
    if _timer_mode(lvtt) == TIMER_TSC_DEADLINE:
        initial = 0
        expiry = NEVER if deadline_ns is None or not tsc_deadline else deadline_ns
    elif initial:
        done = initial - min(current, initial)
        start = now_ns - done * tick
        if current:
            expiry = now_ns + current * tick
        elif _timer_mode(lvtt) == TIMER_PERIODIC:
            expiry = now_ns + initial * tick
    return {"version": 1, "apic_id": _reg(page, ID) >> 24, "apic_base": apic_base,
            "irr": _bits256(page, IRR0), "isr": _bits256(page, ISR0), "tmr": _bits256(page, TMR0),
            "tpr": _reg(page, TPR) & 0xFF, "ldr": _reg(page, LDR) & 0xFF000000,
            "dfr": _reg(page, DFR) | 0x0FFFFFFF, "svr": _reg(page, SVR) & 0x13FF,
            "esr": _reg(page, ESR), "esr_pending": like["esr_pending"] if like else 0,
            "icr": _reg(page, ICR_HI) << 32 | (_reg(page, ICR_LO) & ~(1 << 12)),
            "lvt": lvt, "timer_initial": initial, "timer_start": start, "dcr": dcr,
            "tsc_deadline": tsc_deadline if _timer_mode(lvtt) == TIMER_TSC_DEADLINE else 0,
            "timer_expiry": expiry}


def reset_apic_base(cpu: int) -> int:
    """IA32_APIC_BASE at power-on (the BSP is vCPU 0)."""
    return LAPIC_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if cpu == 0 else 0)


# --- PIT -------------------------------------------------------------------------------------

def _pit_period_ns(reload: int) -> int:
    return ns_for_ticks(reload, PIT_HZ)


def _pristine(s: dict) -> bool:
    return (not s["loaded"] and s["start"] is None and s["mode"] == 0 and s["access"] == 3
            and not s["write_hi"] and not s["read_hi"] and not s["latched"] and s["status_latch"] is None)


def pit_channel_to_kvm(state: dict, now_ns: int, host_ns: int, index: int = 0) -> bytes:
    """A PitCounter save() dict (of counter `index`) as a 24-byte
    kvm_pit_channel_state."""
    s = state
    counting = s["start"] is not None
    # KVM_SET_PIT2 starts counter 0's timer in any mode but its "never
    # programmed" one: a counter 0 without a count must say that, or KVM
    # would send it an interrupt the model never would.
    mode = s["mode"] if s["loaded"] or counting or index else PIT_MODE_UNSET
    access = s["access"]
    word = access == 3
    read_state = RW_WORD1 if word and s["read_hi"] else access
    write_state = RW_WORD1 if word and s["write_hi"] else access
    latched = s["latched"]
    if not latched:
        count_latched, latched_count = 0, 0
    elif len(latched) == 2:
        count_latched, latched_count = RW_WORD0, latched[0] | latched[1] << 8
    elif access == 1:
        count_latched, latched_count = RW_LSB, latched[0]
    else:
        count_latched, latched_count = RW_MSB, latched[0] << 8
    status = s["status_latch"]
    load_time = host_ns - (now_ns - s["start"]) if counting else host_ns
    if _pristine(s):
        # KVM's power-on form; the model cannot tell it from a counter given
        # a mode 0 / lo-hi control word and no count yet (a rare moment).
        access = read_state = write_state = 0
        mode = PIT_MODE_UNSET
    return PIT_CHANNEL.pack(s["reload"], latched_count, count_latched, int(status is not None),
                            status or 0, read_state, write_state, s["low_byte"], access, mode,
                            s["bcd"], int(s["gate"]), load_time)


def pit_channel_from_kvm(data: bytes, now_ns: int, host_ns: int, like: dict | None = None) -> dict:
    """A kvm_pit_channel_state (read at host CLOCK_MONOTONIC `host_ns`,
    guest time `now_ns`) as a PitCounter save() dict.  A periodic counter
    keeps its phase; the IRQ pulses it has sent (a statistic) come from
    `like`."""
    (count, latched_count, count_latched, status_latched, status, read_state, write_state,
     write_latch, rw_mode, mode, bcd, gate, load_time) = PIT_CHANNEL.unpack_from(data)
    # KVM keeps no "count written" flag: a counter programmed but for its
    # count's high byte is taken as never loaded (its first count).
    loaded = mode != PIT_MODE_UNSET and write_state != RW_WORD1
    mode = 0 if mode == PIT_MODE_UNSET else (mode - 4 if mode > 5 else mode)
    reload = count or 0x10000
    access = rw_mode if rw_mode in (1, 2, 3) else 3
    elapsed = max(0, host_ns - load_time)
    start, edges, hold = None, 0, reload & 0xFFFF
    if loaded and gate:                          # a low gate stops (2, 3) or holds (0, 4) it in the model
        if mode in (2, 3):
            elapsed %= _pit_period_ns(reload)
        elif ticks_at(elapsed, PIT_HZ) >= reload:
            edges = 1                            # a one-shot that has already gone off
        start = now_ns - elapsed
    if count_latched == RW_WORD0:
        latched = [latched_count & 0xFF, latched_count >> 8]
    elif count_latched == RW_LSB:
        latched = [latched_count & 0xFF]
    elif count_latched == RW_MSB:
        latched = [latched_count >> 8 & 0xFF]
    else:
        latched = []
    return {"version": 1, "mode": mode, "access": access, "bcd": bcd & 1, "reload": reload,
            "start": start, "gate": bool(gate), "loaded": loaded, "null_count": not loaded,
            "hold_count": hold, "idle_out": 0 if mode == 0 else 1, "paused_ticks": None,
            "edges": edges, "delivered": like["delivered"] if like else 0,
            "write_hi": write_state == RW_WORD1, "read_hi": read_state == RW_WORD1,
            "low_byte": write_latch, "latched": latched,
            "status_latch": status if status_latched else None}


def pit_to_kvm(state: dict, now_ns: int, host_ns: int, flags: int = 0) -> bytes:
    """A Pit save() dict as struct kvm_pit_state2 (port 0x61's speaker bits
    have no place there)."""
    channels = b"".join(pit_channel_to_kvm(c, now_ns, host_ns, i) for i, c in enumerate(state["counters"]))
    return (channels + struct.pack("<I", flags)).ljust(PIT_STATE2_SIZE, b"\0")


def pit_from_kvm(data: bytes, now_ns: int, host_ns: int, like: dict | None = None) -> dict:
    """struct kvm_pit_state2 as a Pit save() dict; port 0x61 from `like`
    but for counter 2's gate (bit 0), which KVM keeps."""
    counters = [pit_channel_from_kvm(data[24 * i:24 * i + 24], now_ns, host_ns,
                                     like["counters"][i] if like else None) for i in range(3)]
    port61 = (like["port61"] if like else 0) & ~1 | int(counters[2]["gate"])
    return {"version": 1, "counters": counters, "port61": port61}


def pit_flags(data: bytes) -> int:
    return struct.unpack_from("<I", data, 72)[0]


# --- pending events ------------------------------------------------------------------------

# struct kvm_vcpu_events (64 bytes): exception, interrupt, nmi, sipi_vector, flags, smi, ...
EVENTS = struct.Struct("<BBBBI BBBB BBBB II")
VCPUEVENT_VALID_NMI_PENDING = 0x1
VCPUEVENT_VALID_SIPI_VECTOR = 0x2
VCPUEVENT_VALID_SHADOW = 0x4
EVENTS_SIZE = 64


def events_from_kvm(data: bytes) -> dict:
    """The parts of kvm_vcpu_events a vCPU move carries."""
    (ex_injected, ex_nr, ex_has_code, ex_pending, ex_code, int_injected, int_nr, int_soft, int_shadow,
     nmi_injected, nmi_pending, nmi_masked, _, _, _) = EVENTS.unpack_from(data)
    return {"exception": ex_nr if ex_injected or ex_pending else None,
            "error_code": ex_code if ex_has_code else None,
            "interrupt": int_nr if int_injected else None, "soft": bool(int_soft),
            "shadow": bool(int_shadow), "nmi": bool(nmi_injected or nmi_pending), "nmi_masked": bool(nmi_masked)}


def events_to_kvm(nmi_pending: bool, shadow: bool, like: bytes) -> bytes:
    """kvm_vcpu_events for a vCPU arriving from bt at an instruction
    boundary (nothing injected): a pending NMI and the interrupt shadow."""
    buf = bytearray(like)
    buf[0:12] = bytes(12)
    buf[11] = 1 if shadow else 0      # interrupt.shadow (KVM_X86_SHADOW_INT_MOV_SS / STI: either blocks)
    buf[12] = 0                      # nmi.injected
    buf[13] = int(nmi_pending)
    struct.pack_into("<I", buf, 20, VCPUEVENT_VALID_NMI_PENDING | VCPUEVENT_VALID_SHADOW)
    return bytes(buf)
