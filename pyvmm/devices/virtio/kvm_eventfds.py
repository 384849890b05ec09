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

After a move to another engine (migrate.switch_engine) this VM and its
irqfds are gone: MSI-X messages and INTx go through machine.engine again.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from ...irq import IrqLine
from .transport.pci import BAR_INDEX, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VirtioPci

log = logging.getLogger(__name__)

NOTIFY_WIDTH = 2                 # virtio 1.2, 4.1.4.4: the driver writes a 16-bit queue index
FIRST_MSI_GSI = 24               # above the IOAPIC's 24 pins
MAX_MSI_ROUTES = 1024


class NotifyEventFds:
    """One ioeventfd per queue of `function`, kept on the notify addresses
    of the BAR `where()` says is mapped (None: unmapped)."""

    def __init__(self, vm, loop, function: VirtioPci, where: Callable[[], int | None]):
        self.vm, self.loop, self.function, self.where = vm, loop, function, where
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

    def _assign(self, base: int, deassign: bool) -> None:
        for queue, fd in enumerate(self.fds):
            self.vm.ioeventfd(base + NOTIFY_OFFSET + queue * NOTIFY_MULTIPLIER, NOTIFY_WIDTH, fd, deassign)

    def rebind(self) -> None:
        """Follows the BAR: called after every change that may move it.
        Raises OSError when KVM refuses."""
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
        for fd in self.fds:
            try:
                self.loop.remove_reader(fd)
            except (OSError, ValueError, RuntimeError):   # the loop closed first
                pass
            os.close(fd)
        self.fds = []


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
    `current()` says this VM still runs the machine; after a move to
    another engine (migrate.switch_engine) the line's own sink again."""

    def __init__(self, vm, loop, line: IrqLine, current: Callable[[], bool] = lambda: True):
        self.vm, self.loop, self.line, self.current = vm, loop, line, current
        self.fallback = line.sink
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.raised = self.resamples = 0
        try:
            vm.irqfd(self.fd, line.gsi, resample_fd=self.resample_fd)
        except OSError:
            os.close(self.fd)
            os.close(self.resample_fd)
            raise
        loop.add_reader(self.resample_fd, self._resampled)
        line.sink = self._sink
        if line.level:              # already high: KVM has not seen it yet
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
        """Idempotent: a second call must not close fd numbers reused since."""
        if self.fd < 0:
            return
        try:
            self.loop.remove_reader(self.resample_fd)
        except (OSError, ValueError, RuntimeError):   # the loop closed first
            pass
        os.close(self.fd)
        os.close(self.resample_fd)
        self.fd = self.resample_fd = -1


def attach_eventfds(machine) -> None:
    """Under hw with the in-kernel irqchip, moves every virtio-pci
    function's notifies to ioeventfds, its MSI-X messages to irqfds and
    its INTx line to a resampling irqfd.
    Logs and keeps the ordinary paths when KVM refuses (with the errno)."""
    engine, bridge = machine.engine, machine.devices.get("pci_host")
    vm = getattr(engine, "vm", None)
    if getattr(engine, "name", None) != "hw" or vm is None or bridge is None or not engine.irqchip:
        return
    irqfds = MsiIrqFds(vm)
    machine.eventfds = []
    machine.intx_irqfds = []
    for slot, function in sorted(bridge.functions.items()):
        if not isinstance(function, VirtioPci):
            continue
        try:
            fds = NotifyEventFds(vm, machine.loop, function, lambda slot=slot: bridge.mapping(slot, BAR_INDEX))
        except OSError as e:
            log.warning("KVM_IOEVENTFD refused (errno %d, %s): virtio notifies exit to pyvmm", e.errno, e.strerror)
            break
        machine.eventfds.append(fds)
        moved = function.on_decode_change

        def on_decode_change(moved=moved, fds=fds) -> None:
            moved()
            fds.rebind()
        function.on_decode_change = on_decode_change

        def msi(address: int, data: int, inject=function.msi) -> None:
            if machine.engine is not engine:   # moved to another engine: this VM's irqfds are gone
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
                machine.intx_irqfds.append(IntxIrqFd(vm, machine.loop, function.irq,
                                                     lambda: machine.engine is engine))
            except OSError as e:
                log.warning("KVM resampling irqfd refused (errno %d, %s): INTx through KVM_IRQ_LINE",
                            e.errno, e.strerror)
    machine.msi_irqfds = irqfds

    def close() -> None:
        for fds in machine.eventfds:
            fds.close()
        for line in machine.intx_irqfds:
            line.close()
        irqfds.close()
    machine.closers.append(close)


__all__ = ["NotifyEventFds", "MsiIrqFds", "IntxIrqFd", "attach_eventfds"]
