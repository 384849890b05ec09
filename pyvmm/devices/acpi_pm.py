r"""ACPI fixed-hardware PM block: PM1 event and control registers and the PM timer.

Offsets inside the device's 16-byte range (the builder puts it at PM_BASE,
0x600, which the FADT written by boot/acpi.py describes):

    0x0  PM1_STS  16-bit, write 1 to clear (TMR_STS, PWRBTN_STS, WAK_STS ...)
    0x2  PM1_EN   16-bit
    0x4  PM1_CNT  16-bit; SCI_EN reads 1 (ACPI is always on); SLP_EN (bit 13)
                  with SLP_TYP (bits 10-12) == 5 means "power off"
    0x8  PM_TMR   32-bit, read-only, counts at 3.579545 MHz
    0xC  GPE0_STS 16-bit, write 1 to clear: general-purpose events 0-15
    0xE  GPE0_EN  16-bit

The FADT names 0xC..0xF as the GPE0 block (status half, then enable half;
ACPI 6.4, 4.8.4.1).  GPE 1 is the PCI hotplug event (pcihotplug.py), which
the DSDT's \_GPE._E01 handles.

Any access size is accepted; registers are little-endian byte lanes.  The
SCI (an IrqLine, level-triggered) is high while a status bit and its enable
bit are both set, in PM1 or in GPE0.  TMR_STS (timer MSB toggled) is not generated.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Callable

from ..device import as_int, restore_state, saved
from ..irq import IrqLine

log = logging.getLogger(__name__)

PM_TIMER_HZ = 3_579_545
PM_TIMER_BITS = 32
PM_TIMER_MASK = (1 << PM_TIMER_BITS) - 1

PM1_STS_OFFSET = 0x0
PM1_EN_OFFSET = 0x2
PM1_CNT_OFFSET = 0x4
PM_TMR_OFFSET = 0x8
GPE0_STS_OFFSET = 0xC
GPE0_EN_OFFSET = 0xE
GPE0_LENGTH = 4
REGISTER_RANGE = 16
# Where the board puts the block; boot/acpi.py describes it there in the FADT.
PM_BASE = 0x600
PM_LENGTH = REGISTER_RANGE
# Register image: PM1_STS, PM1_EN, PM1_CNT, 2 unused bytes, PM_TMR, GPE0_STS, GPE0_EN.
_REGS = struct.Struct("<HHH2xIHH")
GPE_COUNT = 16

# PM1_STS / PM1_EN bits.
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15
STS_WRITABLE = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | WAK_STS
EN_WRITABLE = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS

# PM1_CNT bits.
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_STORED = SCI_EN | BM_RLD | SLP_TYP_MASK
SLP_TYP_SOFT_OFF = 5  # matches the DSDT's \_S5_ package


class AcpiPm:
    """PM1a event/control block and PM timer.

    `clock()` returns seconds (default time.monotonic); `on_poweroff()` is
    called when the guest enters S5; `sci` is the SCI line (GSI 9), or None."""

    STATE_VERSION = 2       # 2: the GPE0 block
    # A version-1 state predates GPE0: no event raised, none enabled.
    STATE_UPGRADES = {1: lambda fields: {**fields, "gpe_sts": 0, "gpe_en": 0, "gpe_used": 0}}

    def __init__(self, on_poweroff: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, sci: IrqLine | None = None,
                 on_sleep: Callable[[int], None] | None = None):
        self.on_poweroff = on_poweroff
        self.on_sleep = on_sleep
        self.clock = clock
        self.sci = sci
        self.reset()

    def __repr__(self) -> str:
        return (f"AcpiPm(sts=0x{self.sts:04x}, en=0x{self.en:04x}, cnt=0x{self.cnt:04x}, "
                f"timer=0x{self.timer():08x})")

    def reset(self) -> None:
        self.sts = 0
        self.en = 0
        self.cnt = SCI_EN
        self.gpe_sts = 0
        self.gpe_en = 0
        self.gpe_used = 0             # GPEs the guest has enabled since reset
        self._timer_base = 0          # timer value at clock() == _clock_base
        self._clock_base = self.clock()
        self._update_sci()

    # -- timer --------------------------------------------------------------
    def timer(self) -> int:
        """The PM timer's current value (wraps at 2**32)."""
        ticks = int((self.clock() - self._clock_base) * PM_TIMER_HZ)
        return (self._timer_base + ticks) & PM_TIMER_MASK

    # -- events -------------------------------------------------------------
    def press_power_button(self) -> None:
        """Sets PWRBTN_STS (the guest's ACPI then shuts down gracefully)."""
        self.sts |= PWRBTN_STS
        self._update_sci()

    def raise_gpe(self, bit: int) -> None:
        """Sets general-purpose event `bit`'s status (the SCI follows if the
        guest enabled it)."""
        self.gpe_sts |= 1 << bit
        self._update_sci()

    def gpe_handled(self, bit: int) -> bool:
        """Whether the guest has a handler for GPE `bit`: it has enabled it
        since reset (ACPICA masks a GPE while its method runs, so the
        enable bit alone would flicker)."""
        return bool(self.gpe_used & 1 << bit)

    def _update_sci(self) -> None:
        if self.sci is not None:
            pending = (self.sts & self.en) or (self.gpe_sts & self.gpe_en)
            self.sci.set_level(bool(self.cnt & SCI_EN) and bool(pending))

    # -- registers ----------------------------------------------------------
    def _image(self) -> bytes:
        return _REGS.pack(self.sts, self.en, self.cnt, self.timer(), self.gpe_sts, self.gpe_en)

    def read(self, offset: int, size: int) -> int:
        data = self._image()[offset:offset + size]
        # Bytes past the range read as all-ones, as on an unmapped bus.
        return int.from_bytes(data.ljust(size, b"\xff"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= REGISTER_RANGE:
            return
        old = bytearray(self._image())
        new = bytearray(old)
        raw = value.to_bytes(size, "little")[:REGISTER_RANGE - offset]
        new[offset:offset + len(raw)] = raw
        # Which bytes each register got from this write (0 elsewhere).
        mask = bytearray(REGISTER_RANGE)
        mask[offset:offset + len(raw)] = b"\xff" * len(raw)
        sts_w, en_w, cnt_w, _tmr, gsts_w, gen_w = _REGS.unpack(bytes(new))
        sts_m, en_m, cnt_m, _, gsts_m, gen_m = _REGS.unpack(bytes(mask))
        if sts_m:
            self.sts &= ~(sts_w & sts_m & STS_WRITABLE)
        if en_m:
            self.en = (self.en & ~en_m) | (en_w & en_m & EN_WRITABLE)
        self.gpe_sts &= ~(gsts_w & gsts_m)
        self.gpe_en = (self.gpe_en & ~gen_m) | (gen_w & gen_m)
        self.gpe_used |= self.gpe_en
        if cnt_m:
            self._write_cnt((self.cnt & ~cnt_m) | (cnt_w & cnt_m))
        self._update_sci()

    def _write_cnt(self, value: int) -> None:
        self.cnt = (value & CNT_STORED) | SCI_EN
        if value & SLP_EN:
            slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            log.debug("guest entered sleep type %d", slp_typ)
            if slp_typ == SLP_TYP_SOFT_OFF:
                if self.on_poweroff is not None:
                    self.on_poweroff()
            elif self.on_sleep is not None:
                self.on_sleep(slp_typ)

    # -- snapshots ----------------------------------------------------------
    def save(self) -> dict:
        return saved(self, {"sts": self.sts, "en": self.en, "cnt": self.cnt, "timer": self.timer(),
                            "gpe_sts": self.gpe_sts, "gpe_en": self.gpe_en, "gpe_used": self.gpe_used})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.sts = as_int(state["sts"])
        self.en = as_int(state["en"])
        self.cnt = as_int(state["cnt"]) | SCI_EN
        self.gpe_sts = as_int(state["gpe_sts"]) & 0xFFFF
        self.gpe_en = as_int(state["gpe_en"]) & 0xFFFF
        self.gpe_used = as_int(state["gpe_used"]) & 0xFFFF
        self._timer_base = as_int(state["timer"]) & PM_TIMER_MASK
        self._clock_base = self.clock()
        self._update_sci()
