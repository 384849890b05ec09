"""Under hw, virtio-pci queue notifications and MSI-X messages skip the
vCPU loop: KVM_IOEVENTFD turns the guest's 2-byte write to a queue's notify
address into an eventfd signal inside the kernel (the vCPU goes straight
back into the guest), and the event loop runs the device on that queue;
MSI-X messages leave through KVM_IRQFD, one GSI route (KVM_SET_GSI_ROUTING)
per distinct message.

Linux writes the queue index with iowrite16, which the 2-byte ioeventfd
matches; any other width still arrives through the ordinary MMIO exit and
the same notify().

INTx (the guest left MSI-X off) leaves through KVM_IRQFD as well, as a
level-triggered line with a resample eventfd: raising the line is one
eventfd write; KVM lowers it at the guest's EOI and signals the resample
fd, and the event loop raises it again while the function still holds it
high (ISR status unread).  Lowering it (ISR read) needs no call at all:
the next EOI finds the line low and KVM leaves it so.

virtio-mmio pages get the same: all queues notify at one register
(QueueNotify, a 4-byte write of the queue index), so each queue has an
ioeventfd there that matches its own index (KVM's datamatch); any other
value or width still exits.  Their wire pulses once per event (an edge on
an edge-triggered ISA pin), so it leaves through a plain irqfd, whose
every write KVM turns into a rise and a fall, the pulse itself.  Not a
resampling one: that holds the pin high until an EOI, so a pulse inside
that window would not be an edge, and a pulse while the guest masks the
(edge-triggered) IOAPIC pin would hold it high for good, KVM neither
delivering it at the unmask nor ever resampling it.

One function at a time: attach_function() gives a function its eventfds,
for the functions of the built machine (attach_eventfds) and for those
device_add plugs in later (hotplugged.plug_function, which a snapshot load
or an incoming migration also calls); detach_function() takes them back
when the function leaves the bus (hotplugged.unplug).

After a move to another engine (migrate.switch_engine) this VM and its
irqfds are gone: MSI-X messages and INTx go through machine.engine again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from ...irq import IrqLine
from .transport.mmio import R_QUEUE_NOTIFY, VirtioMmio
from .transport.pci import BAR_INDEX, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VirtioPci

log = logging.getLogger(__name__)

NOTIFY_WIDTH = 2                 # virtio 1.2, 4.1.4.4: the driver writes a 16-bit queue index
MMIO_NOTIFY_WIDTH = 4            # virtio 1.2, 4.2.2: QueueNotify is a 32-bit register
FIRST_MSI_GSI = 24               # above the IOAPIC's 24 pins
MAX_MSI_ROUTES = 1024


class NotifyEventFds:
    """One ioeventfd per queue of `function`, kept on the notify addresses
    of the BAR `where()` says is mapped (None: unmapped), while `live()`
    says the VM is still open and runs the machine."""

    def __init__(self, vm, loop, function: VirtioPci | VirtioMmio, where: Callable[[], int | None],
                 live: Callable[[], bool] = lambda: True):
        self.vm, self.loop, self.function, self.where, self.live = vm, loop, function, where, live
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in function.device.QUEUE_SIZES]
        self.base: int | None = None
        self.kicks = 0
        for queue, fd in enumerate(self.fds):
            loop.add_reader(fd, lambda queue=queue, fd=fd: self._kicked(queue, fd))
        try:
            self.rebind()
        except OSError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"NotifyEventFds({len(self.fds)} queues at {self.base}, kicks={self.kicks})"

    def _one(self, base: int, queue: int, fd: int, deassign: bool) -> None:
        self.vm.ioeventfd(base + NOTIFY_OFFSET + queue * NOTIFY_MULTIPLIER, NOTIFY_WIDTH, fd, deassign)

    def _assign(self, base: int, deassign: bool) -> None:
        done = []
        try:
            for queue, fd in enumerate(self.fds):
                self._one(base, queue, fd, deassign)
                done.append((queue, fd))
        except OSError:
            # All or none: a queue left bound to an eventfd nobody reads would lose its notifies.
            for queue, fd in done if not deassign else ():
                try:
                    self._one(base, queue, fd, True)
                except OSError:
                    pass
            raise

    def rebind(self) -> None:
        """Follows the BAR: called after every change that may move it.
        Raises OSError when KVM refuses (the notifies then exit to pyvmm)."""
        if not self.live():
            return              # the VM is gone: its ioeventfds with it
        base = self.where()
        if base == self.base:
            return
        if self.base is not None:
            self._assign(self.base, deassign=True)
            self.base = None
        if base is not None:
            self._assign(base, deassign=False)
            self.base = base

    def _kicked(self, queue: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.kicks += 1
        self.function.notify(queue)      # the loop holds the machine's lock

    def close(self) -> None:
        """Takes the ioeventfds off a VM still open (a closed one took
        them with it) and closes the eventfds. Idempotent."""
        if self.base is not None and self.live():
            try:
                self._assign(self.base, deassign=True)
            except OSError as e:
                log.warning("KVM_IOEVENTFD deassign refused (errno %d, %s)", e.errno, e.strerror)
        self.base = None
        for fd in self.fds:
            try:
                self.loop.remove_reader(fd)
            except (OSError, ValueError, RuntimeError):   # the loop closed first
                pass
            os.close(fd)
        self.fds = []


class MmioNotifyEventFds(NotifyEventFds):
    """virtio-mmio: every queue notifies at QueueNotify, telling itself by
    the value written; one ioeventfd per queue there, matching its index."""

    def _one(self, base: int, queue: int, fd: int, deassign: bool) -> None:
        self.vm.ioeventfd(base + R_QUEUE_NOTIFY, MMIO_NOTIFY_WIDTH, fd, deassign, datamatch=queue)

    def __repr__(self) -> str:
        return f"MmioNotifyEventFds({len(self.fds)} queues at {self.base}, kicks={self.kicks})"


class MsiIrqFds:
    """MSI messages through irqfd: the first time a (address, data) pair is
    sent, it gets a GSI, a route and an eventfd; later sends are one
    eventfd write.  Past MAX_MSI_ROUTES pairs (a guest that keeps
    reprogramming vectors), send() says False and the caller injects the
    message itself."""

    def __init__(self, vm):
        self.vm = vm
        self.routes: dict[int, tuple[int, int]] = {}
        self.fds: dict[tuple[int, int], int] = {}
        self.sent = 0

    def __repr__(self) -> str:
        return f"MsiIrqFds({len(self.fds)} routes, sent={self.sent})"

    def send(self, address: int, data: int) -> bool:
        """Raises OSError when KVM refuses a route or an irqfd."""
        key = (address, data)
        fd = self.fds.get(key)
        if fd is None:
            if len(self.fds) >= MAX_MSI_ROUTES:
                return False
            gsi = FIRST_MSI_GSI + len(self.fds)
            self.vm.set_gsi_routing({**self.routes, gsi: key})
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self.vm.irqfd(fd, gsi)
            except OSError:
                os.close(fd)
                raise
            self.routes[gsi] = key
            self.fds[key] = fd
        os.eventfd_write(fd, 1)
        self.sent += 1
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class IntxIrqFd:
    """A function's INTx `line` (irq.IrqLine, which keeps the level the
    function sets) delivered through a resampling irqfd on its GSI while
    `current()` says this VM is open and still runs the machine; after a
    move to another engine (migrate.switch_engine) the line's own sink
    again.  With `resample` False (a line that only pulses: virtio-mmio)
    a plain irqfd, each write one rise and fall of the pin."""

    def __init__(self, vm, loop, line: IrqLine, current: Callable[[], bool] = lambda: True,
                 resample: bool = True):
        self.vm, self.loop, self.line, self.current = vm, loop, line, current
        self.fallback = line.sink
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if resample else -1
        self.raised = self.resamples = 0
        try:
            vm.irqfd(self.fd, line.gsi, resample_fd=self.resample_fd if resample else None)
        except OSError:
            os.close(self.fd)
            if resample:
                os.close(self.resample_fd)
            raise
        if resample:
            loop.add_reader(self.resample_fd, self._resampled)
        line.sink = self._sink
        if line.level and resample:     # already high: KVM has not seen it yet
            self._raise()

    def __repr__(self) -> str:
        return f"IntxIrqFd(gsi={self.line.gsi}, raised={self.raised}, resamples={self.resamples})"

    def _raise(self) -> None:
        self.raised += 1
        os.eventfd_write(self.fd, 1)

    def _sink(self, gsi: int, level: int) -> None:
        if not self.current():
            if self.fallback is not None:
                self.fallback(gsi, level)
            return
        if level:
            self._raise()
        # Low: nothing to do; KVM lowers the pin at the EOI and _resampled
        # then leaves it low.

    def _resampled(self) -> None:
        try:
            os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            return
        if self.line.level:         # the driver has not read the ISR yet: still pending
            self._raise()
        self.resamples += 1

    def close(self) -> None:
        """Gives the line its own sink back, takes the irqfd off a VM still
        open (which lowers a pin it holds) and closes the eventfds.
        Idempotent: a second call must not close fd numbers reused since."""
        if self.fd < 0:
            return
        if self.line.sink == self._sink:
            self.line.sink = self.fallback
        if self.current():
            try:
                self.vm.irqfd(self.fd, self.line.gsi, deassign=True)
            except OSError as e:
                log.warning("KVM irqfd deassign refused (errno %d, %s)", e.errno, e.strerror)
        if self.resample_fd >= 0:
            try:
                self.loop.remove_reader(self.resample_fd)
            except (OSError, ValueError, RuntimeError):   # the loop closed first
                pass
            os.close(self.resample_fd)
        os.close(self.fd)
        self.fd = self.resample_fd = -1


@dataclass
class Attached:
    """What attach_function gave one function on one VM, and what it replaced."""
    notify: NotifyEventFds | None
    intx: IntxIrqFd | None
    msi: Callable | None                 # the function's own MSI-X sender
    on_decode_change: Callable | None    # the bridge's remap of its BARs


def _hw(machine):
    """(engine, vm) when machine runs under hw with the in-kernel irqchip, else None."""
    engine = machine.engine
    vm = getattr(engine, "vm", None)
    if getattr(engine, "name", None) != "hw" or vm is None or not getattr(engine, "irqchip", False):
        return None
    return engine, vm


def _attached(machine) -> dict:
    """Function -> Attached. The first call also makes the machine's lists
    (eventfds, intx_irqfds) and has the machine's close release them."""
    found = getattr(machine, "attached_eventfds", None)
    if found is None:
        found = machine.attached_eventfds = {}
        machine.eventfds = []
        machine.intx_irqfds = []
        machine.msi_irqfds = None
        spent: list[MsiIrqFds] = []      # MSI routes of earlier VMs (an engine switch back to hw)
        machine.spent_msi_irqfds = spent

        def close() -> None:
            for function in list(found):
                detach_function(machine, function)
            for irqfds in spent + ([machine.msi_irqfds] if machine.msi_irqfds is not None else []):
                irqfds.close()
        machine.closers.append(close)
    return found


def _msi_irqfds(machine, vm) -> MsiIrqFds:
    """The VM's MSI routes, shared by its functions (the routing table is the VM's)."""
    irqfds = machine.msi_irqfds
    if irqfds is None or irqfds.vm is not vm:
        if irqfds is not None:
            machine.spent_msi_irqfds.append(irqfds)
        irqfds = machine.msi_irqfds = MsiIrqFds(vm)
    return irqfds


def _mmio_base(machine, function: VirtioMmio) -> int | None:
    return next((base for base, _, _ in machine.mmio_bus.devices()
                 if machine.mmio_bus.find(base).device is function), None)


def attach_function(machine, function: VirtioPci | VirtioMmio) -> None:
    """Under hw with the in-kernel irqchip, moves `function`'s notifies to
    ioeventfds, its MSI-X messages to irqfds and its INTx line (virtio-mmio:
    its wire) to an irqfd; a no-op under other engines or when done already.
    For a virtio-pci function, call it once the function is in its slot
    with its irq and msi set.  Logs and keeps the ordinary paths when KVM
    refuses (with the errno)."""
    hw = _hw(machine)
    if hw is None:
        return
    engine, vm = hw
    attached = _attached(machine)
    if function in attached:
        return

    def live() -> bool:
        return machine.engine is engine and engine.vm is vm
    notify = _notify_eventfds(machine, function, vm, live)
    record = Attached(notify, None, function.msi if isinstance(function, VirtioPci) else None,
                      function.on_decode_change if isinstance(function, VirtioPci) else None)
    if notify is not None and isinstance(function, VirtioPci):
        moved = record.on_decode_change

        def on_decode_change() -> None:
            if moved is not None:
                moved()
            try:
                notify.rebind()
            except OSError as e:
                log.warning("KVM_IOEVENTFD refused (errno %d, %s): virtio notifies exit to pyvmm",
                            e.errno, e.strerror)
        function.on_decode_change = on_decode_change
    if record.msi is not None:
        irqfds, inject = _msi_irqfds(machine, vm), record.msi

        def msi(address: int, data: int) -> None:
            if not live():               # moved to another engine: this VM's irqfds are gone
                inject(address, data)
                return
            try:
                if irqfds.send(address, data):
                    return
            except OSError as e:
                log.warning("KVM irqfd refused (errno %d, %s): MSI through KVM_SIGNAL_MSI", e.errno, e.strerror)
            inject(address, data)
        function.msi = msi
    if function.irq is not None:
        try:
            record.intx = IntxIrqFd(vm, machine.loop, function.irq, live,
                                    resample=not isinstance(function, VirtioMmio))
            machine.intx_irqfds.append(record.intx)
        except OSError as e:
            log.warning("KVM irqfd refused (errno %d, %s): the interrupt line through KVM_IRQ_LINE",
                        e.errno, e.strerror)
    attached[function] = record


def _notify_eventfds(machine, function, vm, live) -> NotifyEventFds | None:
    try:
        if isinstance(function, VirtioMmio):
            base = _mmio_base(machine, function)
            fds = MmioNotifyEventFds(vm, machine.loop, function, lambda: base, live)
        else:
            bridge = machine.devices["pci_host"]
            slot = next(s for s, f in bridge.functions.items() if f is function)
            fds = NotifyEventFds(vm, machine.loop, function, lambda: bridge.mapping(slot, BAR_INDEX), live)
    except OSError as e:
        log.warning("KVM_IOEVENTFD refused (errno %d, %s): virtio notifies exit to pyvmm", e.errno, e.strerror)
        return None
    machine.eventfds.append(fds)
    return fds


def detach_function(machine, function: VirtioPci | VirtioMmio) -> None:
    """Undoes attach_function: the function's notifies exit to pyvmm again,
    its interrupts go through the engine, and its eventfds are off the VM
    (if it is still open) and closed. A no-op for a function without them."""
    record = getattr(machine, "attached_eventfds", {}).pop(function, None)
    if record is None:
        return
    if isinstance(function, VirtioPci):
        function.msi, function.on_decode_change = record.msi, record.on_decode_change
    if record.notify is not None:
        record.notify.close()
        machine.eventfds.remove(record.notify)
    if record.intx is not None:
        record.intx.close()
        machine.intx_irqfds.remove(record.intx)


def _virtio_functions(machine) -> list:
    bridge = machine.devices.get("pci_host")
    pci = [f for _, f in sorted(bridge.functions.items()) if isinstance(f, VirtioPci)] if bridge else []
    return pci + [d for d in machine.devices.values() if isinstance(d, VirtioMmio)]


def attach_eventfds(machine) -> None:
    """Under hw with the in-kernel irqchip, attach_function for every
    virtio function the machine was built with (virtio-pci on bus 0 and
    virtio-mmio pages); the machine's close releases them."""
    if _hw(machine) is None:
        return
    _attached(machine)
    for function in _virtio_functions(machine):
        attach_function(machine, function)


__all__ = ["Attached", "IntxIrqFd", "MmioNotifyEventFds", "MsiIrqFds", "NotifyEventFds", "attach_eventfds",
           "attach_function", "detach_function"]
