"""virtio-pci, modern interface only (virtio 1.2, section 4.1): a PCI
function whose BAR 4 (64-bit memory, 32 KiB) holds the four structures
the vendor capabilities point at, and the MSI-X table and PBA:

    0x0000  common config   features with the select protocol, status, queues
    0x1000  ISR status      bit 0 queue interrupt, bit 1 config change; read clears
    0x2000  device config   the device model's config_bytes()
    0x3000  notify          queue N is notified by a write at 0x3000 + 4 * N
    0x4000  MSI-X table     one vector per queue and one for config changes
    0x6000  MSI-X PBA

Interrupts: while the guest has MSI-X off, INTx (ISR status says why).
With MSI-X on, a queue interrupt is the message of the vector the driver
wrote in that queue's queue_msix_vector and a config change that of
config_msix_vector (pci/msix.py); NO_VECTOR there means no interrupt, and
the ISR is not used.  A vector number beyond the table reads back as
NO_VECTOR, which is how Linux learns it was refused.  The function id is
0x1040 + device type and the revision 1, which is how a driver tells a
modern-only device.

A driver that breaks the protocol gets NEEDS_RESET in the status and a
config-change interrupt: features never offered (FEATURES_OK is refused
instead), a queue enabled with a bad size or bad ring addresses, or a
queue whose contents fail queue.py's checks.  Notifications before
DRIVER_OK, and for queues that are not enabled, are ignored.
"""

from __future__ import annotations

import logging
import struct

from ....device import as_bool, as_dict, as_int, as_list, restore_state, saved
from ....errors import VmmError
from ....irq import IrqLine
from ..device import (STATUS_DRIVER_OK,
                      STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VirtioDevice)
from ..queue import QueueError, VirtQueue
from .negotiate import accept_status, open_rings
from ...pci.function import COMMAND, PciFunction
from ...pci.msix import CAP_MSIX, CTRL_ENABLE, CTRL_FUNCTION_MASK, MsiSink, MsixTable, pba_size

log = logging.getLogger(__name__)

VENDOR_REDHAT_QUMRANET = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
PCI_CAP_VENDOR = 0x09
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE = 1, 2, 3, 4
BAR_INDEX, BAR_SIZE = 4, 0x8000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x6000
NOTIFY_MULTIPLIER = 4
NO_VECTOR = 0xFFFF
ISR_QUEUE, ISR_CONFIG = 1, 2
VIRTIO_CAP = struct.Struct("<BBBBxxII")   # cap_len, cfg_type, bar, id, offset, length

# struct virtio_pci_common_cfg: (offset, size, name)
COMMON_FIELDS = ((0x00, 4, "dfselect"), (0x04, 4, "dfeature"), (0x08, 4, "gfselect"),
                 (0x0C, 4, "gfeature"), (0x10, 2, "msix_config"), (0x12, 2, "num_queues"),
                 (0x14, 1, "status"), (0x15, 1, "generation"), (0x16, 2, "queue_select"),
                 (0x18, 2, "queue_size"), (0x1A, 2, "queue_msix"), (0x1C, 2, "queue_enable"),
                 (0x1E, 2, "queue_notify_off"), (0x20, 8, "queue_desc"), (0x28, 8, "queue_driver"),
                 (0x30, 8, "queue_device"), (0x38, 2, "queue_notify_data"), (0x3A, 2, "queue_reset"))
COMMON_SIZE = 0x3C


class QueueConfig:
    """What the driver programmed for one queue, and the queue once enabled."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.size = max_size
        self.desc = self.driver = self.device = 0
        self.vector = NO_VECTOR
        self.vq: VirtQueue | None = None


class VirtioPci(PciFunction):
    """A virtio device model behind the modern virtio-pci interface.  The
    object is the PCI function (config space) and the BAR's registers."""

    STATE_VERSION = 2          # 2: MSI-X vectors and table

    def __init__(self, device: VirtioDevice, class_code: int, irq: IrqLine | None = None,
                 msi: MsiSink | None = None):
        super().__init__(VENDOR_REDHAT_QUMRANET, MODERN_DEVICE_BASE + device.DEVICE_ID, class_code,
                         revision=1, subsystem_vendor=VENDOR_REDHAT_QUMRANET, subsystem=0x1100)
        self.device = device
        device.config_changed = self.config_changed
        self.irq = irq
        self.msi = msi            # where MSI-X messages go: (address, data)
        self.add_bar(BAR_INDEX, BAR_SIZE, "mem64", self)
        self.msix = MsixTable(len(device.QUEUE_SIZES) + 1, self._send_msi)
        assert MSIX_TABLE_OFFSET + 16 * self.msix.count <= MSIX_PBA_OFFSET
        caps = [(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE), (CAP_ISR, ISR_OFFSET, 1)]
        config_len = len(device.config_bytes())
        if config_len:
            caps.append((CAP_DEVICE, DEVICE_OFFSET, config_len))
        for kind, offset, length in caps:
            self.add_capability(PCI_CAP_VENDOR, VIRTIO_CAP.pack(VIRTIO_CAP.size + 2, kind, BAR_INDEX, 0,
                                                                offset, length))
        self.add_capability(PCI_CAP_VENDOR, VIRTIO_CAP.pack(VIRTIO_CAP.size + 6, CAP_NOTIFY, BAR_INDEX, 0,
                                                            NOTIFY_OFFSET,
                                                            NOTIFY_MULTIPLIER * len(device.QUEUE_SIZES))
                            + struct.pack("<I", NOTIFY_MULTIPLIER))
        self._msix_control = self.add_capability(
            CAP_MSIX, self.msix.capability(BAR_INDEX, MSIX_TABLE_OFFSET, BAR_INDEX, MSIX_PBA_OFFSET),
            writable=struct.pack("<H", CTRL_ENABLE | CTRL_FUNCTION_MASK)) + 2
        self._virtio_reset()

    def __repr__(self) -> str:
        return f"VirtioPci({self.device!r}, status={self.status_byte:#x}, isr={self.isr})"

    def _virtio_reset(self) -> None:
        self.status_byte = 0
        self.isr = 0
        self.dfselect = self.gfselect = self.queue_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queues = [QueueConfig(n) for n in self.device.QUEUE_SIZES]
        self.device.reset()
        self._set_line(False)

    # --- interrupts ------------------------------------------------------------------------

    def _set_line(self, level: bool) -> None:
        self.set_interrupt_status(level)
        if self.irq is not None:
            self.irq.set_level(1 if level and not self.intx_disabled else 0)

    def _send_msi(self, address: int, data: int) -> None:
        if self.msi is not None:
            self.msi(address, data)

    def _interrupt(self, bit: int, queue: int = 0) -> None:
        """Interrupts the driver for queue `queue` (ISR_QUEUE) or a config
        change (ISR_CONFIG): by MSI-X when the guest enabled it, else INTx."""
        if self.msix.enabled:
            vector = self.config_vector if bit == ISR_CONFIG else self.queues[queue].vector
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        if self.isr & bit:
            return               # pending and unread: the line is as it should be already
        self.isr |= bit
        self._set_line(True)

    def config_changed(self) -> None:
        """The device's config bytes changed: a config interrupt, once the driver runs."""
        if self.status_byte & STATUS_DRIVER_OK:
            self._interrupt(ISR_CONFIG)

    def needs_reset(self, why: str) -> None:
        """The driver broke the protocol: say so and stop using the device."""
        log.warning("virtio %s: device needs reset: %s", type(self.device).__name__, why)
        if not self.status_byte & STATUS_NEEDS_RESET:
            self.status_byte |= STATUS_NEEDS_RESET
            if self.status_byte & STATUS_DRIVER_OK:
                self._interrupt(ISR_CONFIG)

    # --- common config -------------------------------------------------------------------

    def _queue(self) -> QueueConfig | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _get(self, name: str) -> int:
        q = self._queue()
        if name == "dfeature":
            return (self.device.offered >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if name == "gfeature":
            return (self.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF if self.gfselect < 2 else 0
        if name == "msix_config":
            return self.config_vector
        if name == "queue_msix":
            return NO_VECTOR if q is None else q.vector
        if name == "num_queues":
            return len(self.queues)
        if name == "status":
            return self.status_byte
        if name in ("generation", "queue_notify_data", "queue_reset"):
            return self.queue_select if name == "queue_notify_data" else 0
        if name in ("dfselect", "gfselect", "queue_select"):
            return getattr(self, name)
        if q is None:
            return 0
        return {"queue_size": q.size, "queue_enable": int(q.vq is not None), "queue_notify_off": self.queue_select,
                "queue_desc": q.desc, "queue_driver": q.driver, "queue_device": q.device}[name]

    def _set(self, name: str, value: int) -> None:
        q = self._queue()
        if name in ("dfselect", "gfselect", "queue_select"):
            setattr(self, name, value)
        elif name == "gfeature" and self.gfselect < 2 and not self.status_byte & STATUS_FEATURES_OK:
            shift = 32 * self.gfselect
            self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
        elif name == "status":
            self._set_status(value)
        elif name == "msix_config":
            self.config_vector = value if value < self.msix.count else NO_VECTOR
        elif name == "queue_msix" and q is not None:
            q.vector = value if value < self.msix.count else NO_VECTOR
        elif q is not None and q.vq is None and name in ("queue_size", "queue_desc", "queue_driver",
                                                         "queue_device"):
            setattr(q, name[6:] if name != "queue_size" else "size", value)
        elif q is not None and name == "queue_enable" and value == 1 and q.vq is None:
            self._enable(q)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._virtio_reset()
            return
        self.status_byte = accept_status(self.device, self.driver_features, self.status_byte, value, "virtio-pci")

    def _enable(self, q: QueueConfig) -> None:
        try:
            q.vq = open_rings(self.device, q, self.status_byte)
        except QueueError as e:
            self.needs_reset(str(e))

    def _common_read(self, offset: int, size: int) -> int:
        image = bytearray(COMMON_SIZE)
        for off, n, name in COMMON_FIELDS:
            image[off:off + n] = (self._get(name) & ((1 << 8 * n) - 1)).to_bytes(n, "little")
        return int.from_bytes(image[offset:offset + size].ljust(size, b"\0"), "little")

    def _common_write(self, offset: int, size: int, value: int) -> None:
        end = offset + size
        for off, n, name in COMMON_FIELDS:
            if off < end and offset < off + n:
                old = self._get(name).to_bytes(8, "little")[:n]
                field = bytearray(old)
                for i in range(max(off, offset), min(off + n, end)):
                    field[i - off] = (value >> 8 * (i - offset)) & 0xFF
                self._set(name, int.from_bytes(field, "little"))

    # --- the BAR ---------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset < COMMON_OFFSET + COMMON_SIZE:
            return self._common_read(offset - COMMON_OFFSET, size)
        if offset == ISR_OFFSET:
            value, self.isr = self.isr, 0
            self._set_line(False)
            return value
        if DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            data = self.device.config_bytes()[offset - DEVICE_OFFSET:offset - DEVICE_OFFSET + size]
            return int.from_bytes(data.ljust(size, b"\0"), "little")
        if MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + pba_size(self.msix.count):
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            self.device.config_write(offset - DEVICE_OFFSET, value.to_bytes(size, "little"))
        elif NOTIFY_OFFSET <= offset < MSIX_TABLE_OFFSET:
            self.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
        elif MSIX_TABLE_OFFSET <= offset < MSIX_PBA_OFFSET:
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    def notify(self, index: int) -> None:
        """The driver kicked queue `index`: let the device work on it."""
        if (not self.status_byte & STATUS_DRIVER_OK or self.status_byte & STATUS_NEEDS_RESET
                or index >= len(self.queues) or self.queues[index].vq is None):
            return
        vq = self.queues[index].vq
        try:
            self.device.process(index, vq)
        except VmmError as e:   # QueueError, or guest memory that is not RAM
            self.needs_reset(str(e))
        if vq.should_notify():
            self._interrupt(ISR_QUEUE, index)

    # --- contract --------------------------------------------------------------------------

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        if offset < COMMAND + 2 and offset + size > COMMAND:
            self._set_line(bool(self.isr))      # INTx disable takes effect at once, both ways
        if offset < self._msix_control + 2 and offset + size > self._msix_control:
            self.msix.set_control(struct.unpack_from("<H", self.config, self._msix_control)[0])

    def reset(self) -> None:
        super().reset()
        self.msix.reset()
        self._virtio_reset()

    def save(self) -> dict:
        queues = [{"size": q.size, "desc": q.desc, "driver": q.driver, "device": q.device,
                   "vector": q.vector, "vq": None if q.vq is None else q.vq.save()} for q in self.queues]
        return saved(self, {"config": bytes(self.config).hex(), "status": self.status_byte,
                            "isr": self.isr, "dfselect": self.dfselect, "gfselect": self.gfselect,
                            "queue_select": self.queue_select, "driver_features": self.driver_features,
                            "acked": self.device.acked, "queues": queues, "device": self.device.save_fields(),
                            "config_vector": self.config_vector, "msix": self.msix.save_fields()})

    def restore(self, state: dict) -> None:
        def load(s: dict) -> None:
            config = bytes.fromhex(s["config"])
            if len(config) != len(self.config):
                raise ValueError(f"config space of {len(config)} bytes")
            queues = []
            for q, qs in zip(self.queues, as_list(s["queues"], len(self.queues))):
                qs = as_dict(qs)
                q.size, q.desc, q.driver, q.device = (as_int(qs[k]) for k in ("size", "desc", "driver", "device"))
                q.vector = as_int(qs["vector"])
                q.vq = None
                if qs["vq"] is not None:
                    v = as_dict(qs["vq"])
                    try:
                        q.vq = VirtQueue(self.device.memory, as_int(v["size"]), as_int(v["desc"]),
                                         as_int(v["avail"]), as_int(v["used"]), as_bool(v["event_idx"]),
                                         as_bool(v["indirect"]))
                    except QueueError as e:
                        raise ValueError(str(e)) from None
                    q.vq.last_avail, q.vq.used_idx, q.vq.signalled_used = (
                        as_int(v[k]) for k in ("last_avail", "used_idx", "signalled_used"))
                queues.append(q)
            self.config[:] = config
            self.status_byte, self.isr = as_int(s["status"]), as_int(s["isr"])
            self.dfselect, self.gfselect = as_int(s["dfselect"]), as_int(s["gfselect"])
            self.queue_select, self.driver_features = as_int(s["queue_select"]), as_int(s["driver_features"])
            self.device.acked = as_int(s["acked"])
            self.device.restore_fields(as_dict(s["device"]))
            self.config_vector = as_int(s["config_vector"])
            self.msix.restore_fields(as_dict(s["msix"]))
            if self.on_decode_change is not None:
                self.on_decode_change()
            self._set_line(bool(self.isr))
        restore_state(self, state, load)


__all__ = ["VirtioPci"]
