"""KVM's CPUID under hybrid: bt's virtual CPU, leaf for leaf.

User code under KVM reaches CPUID two ways: the instruction (trapped to bt
where KVM honours CPUID faulting, switch.py; answered from KVM's table on
VT-x/AMD-V hosts that lack it) and the behaviour KVM derives from its
table (the physical-address width that decides which PTE bits are
reserved, the XCR0 bits XSETBV may enable, the vendor KVM's instruction
emulator follows).  So KVM gets the table the kernel reads in bt: vendor,
family, features, brand, cache and topology leaves, XSAVE layout and
address sizes (0x80000008: 40 physical bits, as bt's MMU checks).  Leaf
1's OSXSAVE and 0xD's area sizes follow CR4 and XCR0 in KVM as in bt.
Nothing here raises."""

from __future__ import annotations

from ..kvm import abi

FLAG_SIGNIFICANT_INDEX = 1
# Leaves whose subleaf selects the answer -> how many subleaves bt describes.
SUBLEAVES = {4: 5, 7: 1, 0xB: 2, 0xD: 3}
HYPERVISOR_LEAF = 0x40000000


def leaves_of(table) -> list[tuple[int, int]]:
    """Every (leaf, subleaf) the table answers: basic and extended ranges
    up to their maxima, and the hypervisor range's first leaf."""
    out = []
    ranges = (range(table.lookup(0, 0)[0] + 1),
              range(0x80000000, table.lookup(0x80000000, 0)[0] + 1),
              range(HYPERVISOR_LEAF, max(table.lookup(HYPERVISOR_LEAF, 0)[0], HYPERVISOR_LEAF) + 1))
    for leaves in ranges:
        for leaf in leaves:
            out.extend((leaf, sub) for sub in range(SUBLEAVES.get(leaf, 1)))
    return out


def kvm_entries(table) -> list[abi.CpuidEntry2]:
    """KVM_SET_CPUID2 entries with table's answers (a bt CpuidTable or overlay)."""
    out = []
    for leaf, sub in leaves_of(table):
        e = abi.CpuidEntry2()
        e.function, e.index = leaf, sub
        e.flags = FLAG_SIGNIFICANT_INDEX if leaf in SUBLEAVES else 0
        e.eax, e.ebx, e.ecx, e.edx = table.lookup(leaf, sub)
        out.append(e)
    return out
