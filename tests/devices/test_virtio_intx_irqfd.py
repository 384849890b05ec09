"""Under hw, a virtio-pci function whose MSI-X is off interrupts through
INTx, and that line leaves through a resampling KVM_IRQFD
(devices/virtio/kvm_eventfds.py IntxIrqFd): no KVM_IRQ_LINE from pyvmm.

A 64-bit guest routes the function's GSI through the IOAPIC (level
triggered) to a vector, kicks a virtio-rng queue (ioeventfd), and counts
interrupts.  Its handler EOIs twice without reading the ISR status, so
the level line must come back after each EOI; from the third time on it
reads the ISR first, and once that was EOI'd the line must stay low: the
guest waits until the host saw every raise resampled with the line low,
lets time pass with interrupts on, and reports its count.

After a move to bt (migrate.switch_engine) the same function's INTx and
MSI-X messages go to the new engine, not into the old VM's eventfds."""

from __future__ import annotations

from pyvmm.devices.pci.host import intx_gsi
from pyvmm.devices.virtio.transport.pci import ISR_OFFSET, ISR_QUEUE
from pyvmm.engines.kvm import abi
from pyvmm.migrate import switch_engine

from ..modeguests import CODE, boot_for
from .ioapicguest import CHECKPOINT, LEVEL, ioapic_guest, run_with_cue
from .test_virtio_kvm_eventfds import POINTER, USED, Checkpoint, rng_machine, set_up_queue

ISR_POINTER, SEEN_ISR, SETTLED, COUNT, COUNT_SETTLED = 0x200000, 0x200008, 0x200010, 0x200018, 0x200020
RAISES_BEFORE_READ = 2        # EOIs without an ISR read: each must bring the interrupt back


def guest(gsi: int) -> bytes:
    """Kicks, waits for the interrupts and the host's word that all is
    settled (ioapicguest); the handler reads the ISR from the third on."""
    last = RAISES_BEFORE_READ + 1
    return ioapic_guest(gsi, LEVEL, f"""
    mov eax, dword ptr [{POINTER}]
    mov word ptr [rax], 0                        # kick queue 0: the ioeventfd
1:  cmp ebx, {last}
    jb 1b
2:  cmp dword ptr [{SETTLED}], 0                 # the host saw every raise EOI'd, the line low
    je 2b
    mov dword ptr [{COUNT_SETTLED}], ebx
""", f"""    cmp ebx, {last}
    jb 5f
    mov eax, dword ptr [{ISR_POINTER}]
    movzx eax, byte ptr [rax]                    # reading the ISR lowers the line
    cmp ebx, {last}
    jne 5f
    mov dword ptr [{SEEN_ISR}], eax              # what the first read found
""", COUNT)


def test_intx_goes_through_a_resampling_irqfd_and_is_level():
    with rng_machine(boot_for(b"\xf4")) as m:
        m.io_bus.insert(CHECKPOINT, 1, Checkpoint(m), "checkpoint")
        fn, base = set_up_queue(m)
        [intx] = m.intx_irqfds
        assert intx.line is fn.irq
        gsi = intx.line.gsi
        assert gsi == intx_gsi(next(s for s, f in m.devices["pci_host"].functions.items() if f is fn))
        m.memory.write(CODE, guest(gsi))
        m.memory.write_u32(ISR_POINTER, base + ISR_OFFSET)
        # tell the guest once the ISR was read and every raise EOI'd
        run_with_cue(m, lambda: bool(m.memory.read_u32(SEEN_ISR) and intx.line.level == 0
                                     and intx.resamples == intx.raised), SETTLED, 60, 90)
        assert m.stop_status.detail == "checkpoint", m.stop_status
        assert m.memory.read_u16(USED + 2) == 1                   # the rng request was served
        assert m.memory.read_u32(SEEN_ISR) == 1                   # ISR_QUEUE, still set after two EOIs
        count = m.memory.read_u32(COUNT)
        # Re-raised after each EOI until the read (on this kvm_pvm host the
        # guest now and then takes one more before its first read, each
        # still one irqfd write after a resample, as checked below) ...
        assert RAISES_BEFORE_READ + 1 <= count <= RAISES_BEFORE_READ + 2
        # ... and quiet once it was read and EOI'd.
        assert m.memory.read_u32(COUNT_SETTLED) == count
        assert intx.line.level == 0 and fn.isr == 0
        assert intx.raised == intx.resamples == count   # each interrupt one irqfd write, resampled at its EOI
        assert m.engine.irq_injections == 0                       # no KVM_IRQ_LINE, no KVM_SIGNAL_MSI
        # The handlers' ISR reads are the only exits to pyvmm: the kick went by ioeventfd.
        assert sum(c[abi.EXIT_MMIO] for c in m.engine.exit_counts) == count - RAISES_BEFORE_READ


def test_after_a_move_to_bt_intx_and_msi_go_through_the_new_engine():
    with rng_machine() as m:
        [intx] = m.intx_irqfds
        fn = next(f for f in m.devices["pci_host"].functions.values() if getattr(f, "irq", None) is intx.line)
        gsi = intx.line.gsi
        fn.msi(0xFEE00000, 0x41)                          # under hw: a route and an irqfd for it
        assert m.msi_irqfds.sent == 1
        switch_engine(m, "bt")
        seen = []
        m.engine.set_irq = lambda g, level: seen.append((g, level))
        m.engine.signal_msi = lambda address, data: seen.append((address, data))
        fn._interrupt(ISR_QUEUE)                          # MSI-X off: INTx
        assert fn.read(ISR_OFFSET, 1) == ISR_QUEUE
        fn.msi(0xFEE00000, 0x41)
        assert seen == [(gsi, 1), (gsi, 0), (0xFEE00000, 0x41)]
        assert intx.raised == 0 and m.msi_irqfds.sent == 1   # nothing into the old VM's eventfds
