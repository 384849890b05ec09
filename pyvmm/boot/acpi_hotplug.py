"""The DSDT's side of PCI hotplug (devices/pcihotplug.py): slot objects
under PCI0 and the GPE handler that tells the guest about them.

    Scope (\\_SB.PCI0) {
        OperationRegion (PCST, SystemIO, 0xAE00, 8)
        Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32 }
        OperationRegion (SEJ, SystemIO, 0xAE08, 4)
        Field (SEJ, DWordAcc, NoLock, WriteAsZeros) { B0EJ, 32 }
        Method (PCEJ, 1) { Store (ShiftLeft (One, Arg0), B0EJ) }
        Device (S01) { Name (_ADR, 0x00010000)  Name (_SUN, 1)
                       Method (_EJ0, 1) { PCEJ (_SUN) } }
        ... one Device per slot 1-31 ...
        Method (PCNT, 0) {
            Store (PCIU, Local0)  Store (PCID, Local1)
            If (And (Local0, 0x00000002)) { Notify (S01, 1) }   // device check
            If (And (Local1, 0x00000002)) { Notify (S01, 3) }   // eject request
            ...
        }
    }
    Scope (\\_GPE) { Method (_E01) { \\_SB.PCI0.PCNT () } }

A slot's Device has _EJ0, which is what makes Linux's acpiphp take it as
a hotplug slot (acpi_pci_check_ejectable); _SUN names the slot, so it is
also the slot number PCEJ shifts by.  _E01 is edge-triggered: ACPICA
clears the GPE's status before it runs the method, so a plug that comes
while PCNT runs raises a new event rather than being lost.
"""

from __future__ import annotations

from ..devices.pcihotplug import HOTPLUG_BASE, HOTPLUG_GPE, PCI_EJ, PCI_UP, SLOTS
from . import aml

FIELD_FLAGS = aml.DWORD_ACC | aml.NO_LOCK | aml.WRITE_AS_ZEROS


def slot_name(slot: int) -> str:
    return f"S{slot:02X}"


def slot_device(slot: int) -> bytes:
    return aml.device(slot_name(slot),
                      aml.name("_ADR", slot << 16),        # device `slot`, function 0
                      aml.name("_SUN", slot),
                      aml.method("_EJ0", 1, aml.call("PCEJ", aml.name_string("_SUN"))))


def notify_method(slots: range) -> bytes:
    """PCNT: Notify each slot whose bit is set in PCI_UP or PCI_DOWN."""
    checks = [aml.store(aml.name_string("PCIU"), aml.local(0)),
              aml.store(aml.name_string("PCID"), aml.local(1))]
    for slot in slots:
        mask = aml.dword(1 << slot)
        checks.append(aml.if_(aml.and_(aml.local(0), mask), aml.notify(slot_name(slot), aml.DEVICE_CHECK)))
        checks.append(aml.if_(aml.and_(aml.local(1), mask), aml.notify(slot_name(slot), aml.EJECT_REQUEST)))
    return aml.method("PCNT", 0, *checks)


def pci_hotplug_aml(slots: range = range(1, SLOTS)) -> bytes:
    """The two scopes above, to append to a DSDT after the PCI0 device."""
    pci0 = aml.scope("\\_SB_.PCI0",
                     aml.operation_region("PCST", aml.SYSTEM_IO, HOTPLUG_BASE + PCI_UP, 8),
                     aml.field("PCST", FIELD_FLAGS, ("PCIU", 32), ("PCID", 32)),
                     aml.operation_region("SEJ", aml.SYSTEM_IO, HOTPLUG_BASE + PCI_EJ, 4),
                     aml.field("SEJ", FIELD_FLAGS, ("B0EJ", 32)),
                     aml.method("PCEJ", 1, aml.store(aml.shift_left(1, aml.arg(0)), aml.name_string("B0EJ"))),
                     *(slot_device(s) for s in slots),
                     notify_method(slots))
    gpe = aml.scope("\\_GPE", aml.method(f"_E{HOTPLUG_GPE:02X}", 0, aml.call("\\_SB_.PCI0.PCNT")))
    return pci0 + gpe


__all__ = ["pci_hotplug_aml", "slot_name"]
