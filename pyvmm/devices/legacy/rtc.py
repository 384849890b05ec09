"""MC146818 real-time clock and CMOS memory (ports 0x70/0x71 on a PC).

Offset 0 is the index register (bit 7, the NMI mask, is ignored); offset 1
reads or writes the selected CMOS byte.  The time registers follow the host
clock in UTC, in BCD or binary per register B's DM bit and in 12- or 24-hour
form per its 24/12 bit; a guest that writes a time register moves its clock
by an offset from the host's.  The clock never reports an update in progress.
No periodic, alarm or update interrupts are generated; register C reports the
update-ended flag (UF) once per elapsed second, cleared when read.

CMOS bytes 0x0E..0x7F are plain storage, preset with the classic memory-size
fields that BIOSes and some boot loaders read."""

from __future__ import annotations

import calendar
import logging
import time
from typing import Callable

from ...device import as_float, as_hex, as_int, as_opt_int, restore_state, saved

log = logging.getLogger(__name__)

INDEX = 0
DATA = 1
CMOS_SIZE = 128

# Register numbers.
REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH,
             REG_YEAR, REG_CENTURY)

# Register A: divider 010 (32.768 kHz time base), rate 0110 (1024 Hz).
REG_A_DEFAULT = 0x26
REG_A_UIP = 0x80
# Register B bits.
B_SET = 0x80
B_DM_BINARY = 0x04
B_24H = 0x02
REG_B_DEFAULT = B_24H
# Register C bits.
C_IRQF = 0x80
C_UF = 0x10
# Register D: valid RAM and time.
D_VRT = 0x80

# Memory-size bytes.
CMOS_BASE_MEM_LO = 0x15
CMOS_EXT_MEM_LO = 0x17
CMOS_EXT_MEM2_LO = 0x30
CMOS_MEM_ABOVE_16M_LO = 0x34
CMOS_MEM_ABOVE_4G = 0x5B  # three bytes, 64 KiB units
# The BIOS boot order as QEMU's "cad" (hard disk, floppy, CD-ROM): devices
# 1 and 2 in 0x3D's nibbles, device 3 in 0x38's high one (1 floppy, 2 disk, 3 CD).
CMOS_BOOT_ORDER = {0x3D: 0x32, 0x38: 0x10}
KIB = 1024
MIB = 1 << 20
GIB = 1 << 30


def to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


def memory_size_bytes(mem_size_bytes: int, below_4g_bytes: int | None = None) -> dict[int, int]:
    """The classic CMOS memory-size fields for a guest with this much RAM, as
    {cmos index: byte}. `below_4g_bytes` is the RAM below 4 GiB (the rest sits
    above 4 GiB); by default min(mem_size_bytes, 4 GiB)."""
    if below_4g_bytes is None:
        below_4g_bytes = min(mem_size_bytes, 4 * GIB)
    above_4g = max(0, mem_size_bytes - below_4g_bytes)
    out: dict[int, int] = {}

    def put16(index: int, value: int) -> None:
        out[index] = value & 0xFF
        out[index + 1] = (value >> 8) & 0xFF

    put16(CMOS_BASE_MEM_LO, 640)
    ext_kib = min(max(0, below_4g_bytes - MIB) // KIB, 0xFFFF)
    put16(CMOS_EXT_MEM_LO, ext_kib)
    put16(CMOS_EXT_MEM2_LO, ext_kib)
    put16(CMOS_MEM_ABOVE_16M_LO, min(max(0, below_4g_bytes - 16 * MIB) // (64 * KIB), 0xFFFF))
    blocks = min(above_4g // (64 * KIB), 0xFFFFFF)
    for i in range(3):
        out[CMOS_MEM_ABOVE_4G + i] = (blocks >> (8 * i)) & 0xFF
    return out


class Rtc:
    """CMOS RTC. `clock` returns seconds since the epoch (default time.time)."""

    STATE_VERSION = 1

    def __init__(self, mem_size_bytes: int = 0, clock: Callable[[], float] = time.time,
                 below_4g_bytes: int | None = None):
        self.clock = clock
        self.mem_size_bytes = mem_size_bytes
        self.below_4g_bytes = below_4g_bytes
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.cmos = bytearray(CMOS_SIZE)
        for reg, value in CMOS_BOOT_ORDER.items():
            self.cmos[reg] = value
        for reg, value in memory_size_bytes(self.mem_size_bytes, self.below_4g_bytes).items():
            self.cmos[reg] = value
        self.cmos[REG_A] = REG_A_DEFAULT
        self.cmos[REG_B] = REG_B_DEFAULT
        self.offset = 0.0  # guest clock minus host clock, seconds
        self.frozen: int | None = None  # the time held while B.SET is on
        self.last_c_read = int(self.clock())

    def __repr__(self) -> str:
        return f"Rtc(index=0x{self.index:02x}, b=0x{self.cmos[REG_B]:02x}, offset={self.offset:+.0f}s)"

    # --- time ---------------------------------------------------------------

    def _now(self) -> int:
        if self.frozen is not None:
            return self.frozen
        return int(self.clock() + self.offset)

    def _encode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_DM_BINARY else to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.cmos[REG_B] & B_DM_BINARY else from_bcd(value)

    def _time_register(self, reg: int) -> int:
        t = time.gmtime(self._now())
        if reg == REG_SECONDS:
            return self._encode(t.tm_sec)
        if reg == REG_MINUTES:
            return self._encode(t.tm_min)
        if reg == REG_HOURS:
            if self.cmos[REG_B] & B_24H:
                return self._encode(t.tm_hour)
            hour12 = t.tm_hour % 12 or 12
            return self._encode(hour12) | (0x80 if t.tm_hour >= 12 else 0)
        if reg == REG_WEEKDAY:
            return self._encode((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        if reg == REG_DAY:
            return self._encode(t.tm_mday)
        if reg == REG_MONTH:
            return self._encode(t.tm_mon)
        if reg == REG_YEAR:
            return self._encode(t.tm_year % 100)
        return self._encode(t.tm_year // 100)  # century

    def _set_time_register(self, reg: int, raw: int) -> None:
        """Moves the guest clock so that `reg` reads `raw`; values that make
        no date are ignored."""
        t = time.gmtime(self._now())
        fields = {"sec": t.tm_sec, "min": t.tm_min, "hour": t.tm_hour,
                  "day": t.tm_mday, "mon": t.tm_mon, "year": t.tm_year}
        if reg == REG_HOURS and not self.cmos[REG_B] & B_24H:
            pm = bool(raw & 0x80)
            value = self._decode(raw & 0x7F) % 12 + (12 if pm else 0)
        else:
            value = self._decode(raw)
        if reg == REG_SECONDS:
            fields["sec"] = value
        elif reg == REG_MINUTES:
            fields["min"] = value
        elif reg == REG_HOURS:
            fields["hour"] = value
        elif reg == REG_DAY:
            fields["day"] = value
        elif reg == REG_MONTH:
            fields["mon"] = value
        elif reg == REG_YEAR:
            fields["year"] = fields["year"] // 100 * 100 + value % 100
        elif reg == REG_CENTURY:
            fields["year"] = value * 100 + fields["year"] % 100
        else:
            return  # the weekday follows from the date
        try:
            new = calendar.timegm((fields["year"], fields["mon"], fields["day"],
                                   fields["hour"], fields["min"], fields["sec"]))
            time.gmtime(new)
        except (ValueError, OverflowError):
            log.debug("rtc: ignoring write 0x%02x to register 0x%02x", raw, reg)
            return
        if not (0 <= fields["sec"] < 60 and 0 <= fields["min"] < 60 and 0 <= fields["hour"] < 24
                and 1 <= fields["mon"] <= 12 and 1 <= fields["day"] <= 31):
            return
        if self.frozen is not None:
            self.frozen = new
        else:
            self.offset = new - self.clock()

    # --- bus interface ------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return 0xFF
        reg = self.index
        if reg in TIME_REGS:
            return self._time_register(reg)
        if reg == REG_A:
            return self.cmos[REG_A] & ~REG_A_UIP
        if reg == REG_C:
            now = int(self.clock())
            value = 0
            if now != self.last_c_read:
                value = C_UF
            self.last_c_read = now
            return value
        if reg == REG_D:
            return D_VRT
        return self.cmos[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == INDEX:
            self.index = value & 0x7F
            return
        if offset != DATA:
            return
        reg = self.index
        if reg in TIME_REGS:
            self._set_time_register(reg, value)
        elif reg == REG_A:
            self.cmos[REG_A] = value & ~REG_A_UIP
        elif reg == REG_B:
            self._write_b(value)
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            self.cmos[reg] = value

    def _write_b(self, value: int) -> None:
        was_set = self.cmos[REG_B] & B_SET
        if value & B_SET and not was_set:
            self.frozen = self._now()
        elif was_set and not value & B_SET and self.frozen is not None:
            self.offset = self.frozen - self.clock()
            self.frozen = None
        self.cmos[REG_B] = value

    # --- snapshots ----------------------------------------------------------

    def save(self) -> dict:
        return saved(self, {"index": self.index, "cmos": self.cmos.hex(), "offset": self.offset,
                            "frozen": self.frozen})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        cmos = bytearray(as_hex(state["cmos"]))
        if len(cmos) != CMOS_SIZE:
            raise ValueError(f"cmos has {len(cmos)} bytes, not {CMOS_SIZE}")
        self.index = as_int(state["index"])
        self.cmos = cmos
        self.offset = as_float(state["offset"])
        self.frozen = as_opt_int(state["frozen"])
