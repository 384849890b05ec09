"""virtio-mmio, version 2 (virtio 1.2, section 4.2.2): one 4 KiB register
page per device, found by the guest through the kernel command line
(`virtio_mmio.device=4K@BASE:IRQ`, Firecracker's way; install.py writes
it) instead of a bus scan.

    0x000 magic "virt"    0x004 version 2        0x008 device id   0x00c vendor id
    0x010 device features (word DeviceFeaturesSel selects, 0x014)
    0x020 driver features (word DriverFeaturesSel selects, 0x024)
    0x030 queue select    0x034 queue num max    0x038 queue num   0x044 queue ready
    0x050 queue notify    0x060 interrupt status 0x064 interrupt ACK
    0x070 status          0x080/0x090/0x0a0 descriptor/driver/device ring (low, high)
    0x0ac shm select      0x0b0/0x0b8 shm length (all-ones: none), base
    0x0fc config generation, 0x100 on: the device's config_bytes()

Registers are 32 bits wide; the device config takes any size.  The
interrupt is one wire: each event (bit 0 used buffers, bit 1 config
change, in interrupt status until the driver ACKs it) is an edge on it,
so an event that comes while an earlier one is not yet ACKed is not lost
on an edge-triggered IOAPIC pin or 8259 input.

The protocol checks are those of the PCI transport: FEATURES_OK is refused
for features never offered or without VERSION_1, a queue made ready
before FEATURES_OK or with a bad size or bad ring addresses, or a queue
whose contents fail queue.py's checks, sets NEEDS_RESET and raises a
config-change interrupt; notifications before DRIVER_OK are ignored.
"""

from __future__ import annotations

import logging

from ....device import as_dict, as_int, as_list, restore_state, saved
from ....errors import VmmError
from ....irq import IrqLine
from ..device import (
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VirtioDevice,
)
from ..queue import QueueError, VirtQueue
from .negotiate import accept_status, open_rings

log = logging.getLogger(__name__)

MMIO_SIZE = 0x1000
MAGIC, VERSION, VENDOR_ID = 0x74726976, 2, 0x4D565950      # "virt", 2, "PYVM"
INT_USED, INT_CONFIG = 1, 2
CONFIG_OFFSET = 0x100
(R_MAGIC, R_VERSION, R_DEVICE_ID, R_VENDOR_ID, R_DEVICE_FEATURES, R_DEVICE_FEATURES_SEL,
 R_DRIVER_FEATURES, R_DRIVER_FEATURES_SEL, R_QUEUE_SEL, R_QUEUE_NUM_MAX, R_QUEUE_NUM, R_QUEUE_READY,
 R_QUEUE_NOTIFY, R_INTERRUPT_STATUS, R_INTERRUPT_ACK, R_STATUS, R_SHM_SEL, R_SHM_LEN_LOW, R_SHM_LEN_HIGH,
 R_CONFIG_GENERATION) = (0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
                         0x050, 0x060, 0x064, 0x070, 0x0AC, 0x0B0, 0x0B4, 0x0FC)
# (low-word register, QueueState attribute) of the three ring addresses
RING_REGISTERS = {0x080: "desc", 0x090: "driver", 0x0A0: "device"}


class QueueState:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self.size = max_size
        self.desc = self.driver = self.device = 0
        self.vq: VirtQueue | None = None


class VirtioMmio:
    """A virtio device model behind a virtio-mmio register page; `irq` is
    its wire (set by the board)."""

    STATE_VERSION = 1

    def __init__(self, device: VirtioDevice, irq: IrqLine | None = None):
        self.device = device
        device.config_changed = self.config_changed
        self.irq = irq
        self._virtio_reset()

    def __repr__(self) -> str:
        return f"VirtioMmio({self.device!r}, status={self.status:#x}, interrupt={self.interrupt_status})"

    def _virtio_reset(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.dfselect = self.gfselect = self.queue_select = 0
        self.driver_features = 0
        self.queues = [QueueState(n) for n in self.device.QUEUE_SIZES]
        self.device.reset()

    # --- interrupts ------------------------------------------------------------------------

    def _interrupt(self, bit: int) -> None:
        self.interrupt_status |= bit
        if self.irq is not None:
            self.irq.pulse()

    def config_changed(self) -> None:
        """The device's config bytes changed: a config interrupt, once the driver runs."""
        if self.status & STATUS_DRIVER_OK:
            self._interrupt(INT_CONFIG)

    def needs_reset(self, why: str) -> None:
        log.warning("virtio-mmio %s: device needs reset: %s", type(self.device).__name__, why)
        if not self.status & STATUS_NEEDS_RESET:
            self.status |= STATUS_NEEDS_RESET
            if self.status & STATUS_DRIVER_OK:
                self._interrupt(INT_CONFIG)

    # --- registers ---------------------------------------------------------------------------

    def _queue(self) -> QueueState | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_OFFSET:
            start = offset - CONFIG_OFFSET
            data = self.device.config_bytes()[start:start + size]
            return int.from_bytes(data.ljust(size, b"\0"), "little")
        if size != 4 or offset % 4:
            return 0
        q = self._queue()
        if offset == R_MAGIC:
            return MAGIC
        if offset == R_VERSION:
            return VERSION
        if offset == R_DEVICE_ID:
            return self.device.DEVICE_ID
        if offset == R_VENDOR_ID:
            return VENDOR_ID
        if offset == R_DEVICE_FEATURES:
            return (self.device.offered >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if offset == R_QUEUE_NUM_MAX:
            return 0 if q is None else q.max_size
        if offset == R_QUEUE_READY:
            return int(q is not None and q.vq is not None)
        if offset == R_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == R_STATUS:
            return self.status
        if offset in (R_SHM_LEN_LOW, R_SHM_LEN_HIGH):
            return 0xFFFFFFFF                   # no shared memory regions
        if q is not None:
            for low, name in RING_REGISTERS.items():
                if offset in (low, low + 4):
                    return (getattr(q, name) >> (32 if offset > low else 0)) & 0xFFFFFFFF
        return 0                                # write-only and reserved registers, generation 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET:
            self.device.config_write(offset - CONFIG_OFFSET, value.to_bytes(size, "little"))
            return
        if size != 4 or offset % 4:
            return
        q = self._queue()
        if offset == R_DEVICE_FEATURES_SEL:
            self.dfselect = value
        elif offset == R_DRIVER_FEATURES_SEL:
            self.gfselect = value
        elif offset == R_DRIVER_FEATURES:
            if self.gfselect < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.gfselect
                self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
        elif offset == R_QUEUE_SEL:
            self.queue_select = value
        elif offset == R_QUEUE_NOTIFY:
            self.notify(value & 0xFFFF)
        elif offset == R_INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == R_STATUS:
            self._set_status(value)
        elif q is None:
            return
        elif offset == R_QUEUE_NUM and q.vq is None:
            q.size = value
        elif offset == R_QUEUE_READY:
            if value == 1 and q.vq is None:
                self._enable(q)
            elif value == 0:
                q.vq = None
        elif q.vq is None:
            for low, name in RING_REGISTERS.items():
                if offset in (low, low + 4):
                    shift = 32 if offset > low else 0
                    setattr(q, name, getattr(q, name) & ~(0xFFFFFFFF << shift) | value << shift)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._virtio_reset()
            return
        self.status = accept_status(self.device, self.driver_features, self.status, value, "virtio-mmio")

    def _enable(self, q: QueueState) -> None:
        try:
            q.vq = open_rings(self.device, q, self.status)
        except QueueError as e:
            self.needs_reset(str(e))

    def notify(self, index: int) -> None:
        """The driver kicked queue `index` (or a device woke it)."""
        if (not self.status & STATUS_DRIVER_OK or self.status & STATUS_NEEDS_RESET
                or index >= len(self.queues) or self.queues[index].vq is None):
            return
        vq = self.queues[index].vq
        try:
            self.device.process(index, vq)
        except VmmError as e:
            self.needs_reset(str(e))
        if vq.should_notify():
            self._interrupt(INT_USED)

    # --- contract ------------------------------------------------------------------------------

    def reset(self) -> None:
        self._virtio_reset()

    def save(self) -> dict:
        queues = [{"size": q.size, "desc": q.desc, "driver": q.driver, "device": q.device,
                   "vq": None if q.vq is None else q.vq.save()} for q in self.queues]
        return saved(self, {"status": self.status, "interrupt_status": self.interrupt_status,
                            "dfselect": self.dfselect, "gfselect": self.gfselect,
                            "queue_select": self.queue_select, "driver_features": self.driver_features,
                            "acked": self.device.acked, "queues": queues, "device": self.device.save_fields()})

    def restore(self, state: dict) -> None:
        def load(s: dict) -> None:
            queues = []
            for q, qs in zip(self.queues, as_list(s["queues"], len(self.queues))):
                qs = as_dict(qs)
                q.size, q.desc, q.driver, q.device = (as_int(qs[k]) for k in ("size", "desc", "driver", "device"))
                q.vq = None
                if qs["vq"] is not None:
                    v = as_dict(qs["vq"])
                    try:
                        q.vq = VirtQueue(self.device.memory, as_int(v["size"]), as_int(v["desc"]),
                                         as_int(v["avail"]), as_int(v["used"]), bool(v["event_idx"]),
                                         bool(v["indirect"]))
                    except QueueError as e:
                        raise ValueError(str(e)) from None
                    q.vq.last_avail, q.vq.used_idx, q.vq.signalled_used = (
                        as_int(v[k]) for k in ("last_avail", "used_idx", "signalled_used"))
                queues.append(q)
            self.status, self.interrupt_status = as_int(s["status"]), as_int(s["interrupt_status"])
            self.dfselect, self.gfselect = as_int(s["dfselect"]), as_int(s["gfselect"])
            self.queue_select, self.driver_features = as_int(s["queue_select"]), as_int(s["driver_features"])
            self.device.acked = as_int(s["acked"])
            self.device.restore_fields(as_dict(s["device"]))
        restore_state(self, state, load)


__all__ = ["INT_CONFIG", "INT_USED", "MAGIC", "MMIO_SIZE", "VirtioMmio"]
