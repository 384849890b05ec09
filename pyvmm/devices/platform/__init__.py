"""The PC interrupt and timer platform in Python, for the `bt` engine (under
`hw` KVM provides these in the kernel): guest time (clock), the 8259 pair
(pic), the 8254 PIT with port 0x61 (pit), the local APICs (lapic), the
IOAPIC (ioapic) and the glue that wires them as on a PC (intc)."""

from .clock import CRYSTAL_HZ, PIT_HZ, TSC_HZ, GuestClock, cpuid_15, cpuid_16
from .intc import PlatformInterrupts
from .ioapic import IoApic
from .lapic import LocalApic
from .pic import Pic8259, PicPair
from .pit import Pit

__all__ = ["CRYSTAL_HZ", "PIT_HZ", "TSC_HZ", "GuestClock", "IoApic", "LocalApic", "Pic8259",
           "PicPair", "Pit", "PlatformInterrupts", "cpuid_15", "cpuid_16"]
