"""MSI-X for one PCI function (PCI Local Bus spec 3.0, section 6.8.2): the
capability in config space, the vector table and the pending-bit array
(PBA), both in a memory BAR of the function's choosing.

    capability   id 0x11; message control: table size - 1 (read-only),
                 bit 14 function mask, bit 15 enable; then the table's and
                 the PBA's offset | BAR index
    table entry  16 bytes: message address (64 bits), message data, vector
                 control (bit 0 masked; every vector starts masked)
    PBA          one bit per vector, set while a masked vector has a message
                 waiting; read-only to the guest

A vector is signalled with notify(vector): the message (address, data)
goes to `send`, the platform's MSI sink (a write to the local APIC page:
the bt platform's signal_msi, or KVM_SIGNAL_MSI), unless the vector or the
whole function is masked, in which case its pending bit is set and the
message leaves when the guest unmasks it.  The object knows offsets only:
the owner routes table and PBA accesses and control writes to it.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from ...device import as_bool, as_hex, as_int

log = logging.getLogger(__name__)

CAP_MSIX = 0x11
ENTRY_SIZE = 16
CTRL_FUNCTION_MASK, CTRL_ENABLE = 1 << 14, 1 << 15
VECTOR_MASKED = 1
MAX_VECTORS = 2048
CAPABILITY = struct.Struct("<HII")    # message control, table offset|BIR, PBA offset|BIR

MsiSink = Callable[[int, int], None]  # (address, data)


def pba_size(count: int) -> int:
    """Bytes of the PBA for `count` vectors (whole qwords)."""
    return 8 * -(-count // 64)


class MsixTable:
    """`count` vectors; messages leave through `send` (None: dropped)."""

    def __init__(self, count: int, send: MsiSink | None = None):
        if not 0 < count <= MAX_VECTORS:
            raise ValueError(f"{count} MSI-X vectors (1 to {MAX_VECTORS})")
        self.count = count
        self.send = send
        self.table = bytearray(ENTRY_SIZE * count)
        self.pending = 0
        self.enabled = False
        self.function_masked = False
        self.sent = 0             # messages delivered (tests and stats)
        self.reset()

    def __repr__(self) -> str:
        return (f"MsixTable({self.count} vectors, enabled={self.enabled}, "
                f"masked={self.function_masked}, pending={self.pending:#x})")

    def reset(self) -> None:
        self.table[:] = bytes(ENTRY_SIZE * self.count)
        for v in range(self.count):
            struct.pack_into("<I", self.table, ENTRY_SIZE * v + 12, VECTOR_MASKED)
        self.pending = 0
        self.enabled = self.function_masked = False

    def capability(self, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> bytes:
        """The capability body (after id and next) for the given placement."""
        return CAPABILITY.pack(self.count - 1, table_offset | table_bar, pba_offset | pba_bar)

    # --- guest accesses ------------------------------------------------------------------

    def set_control(self, control: int) -> None:
        """The guest wrote the message control word: enable and function mask."""
        self.enabled = bool(control & CTRL_ENABLE)
        self.function_masked = bool(control & CTRL_FUNCTION_MASK)
        self._flush_pending()

    def table_read(self, offset: int, size: int) -> int:
        data = bytes(self.table[offset:offset + size])
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, len(self.table))
        if offset >= end:
            return
        self.table[offset:end] = value.to_bytes(size, "little")[:end - offset]
        self._flush_pending()    # an unmasked vector sends what waited

    def pba_read(self, offset: int, size: int) -> int:
        return (self.pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    # --- device side ---------------------------------------------------------------------

    def masked(self, vector: int) -> bool:
        control = struct.unpack_from("<I", self.table, ENTRY_SIZE * vector + 12)[0]
        return self.function_masked or bool(control & VECTOR_MASKED)

    def notify(self, vector: int) -> None:
        """Signals `vector` (ignored when out of range or MSI-X is off)."""
        if not self.enabled or not 0 <= vector < self.count:
            return
        if self.masked(vector):
            self.pending |= 1 << vector
        else:
            self._send(vector)

    def _send(self, vector: int) -> None:
        address, data = struct.unpack_from("<QI", self.table, ENTRY_SIZE * vector)
        self.sent += 1
        if self.send is not None:
            self.send(address, data)

    def _flush_pending(self) -> None:
        if not self.enabled or self.function_masked or not self.pending:
            return
        for vector in range(self.count):
            if self.pending >> vector & 1 and not self.masked(vector):
                self.pending &= ~(1 << vector)
                self._send(vector)

    # --- snapshots (inside the owner's state) --------------------------------------------

    def save_fields(self) -> dict:
        return {"table": bytes(self.table).hex(), "pending": self.pending, "enabled": self.enabled,
                "function_masked": self.function_masked}

    def restore_fields(self, state: dict) -> None:
        """Raises ValueError (or KeyError/TypeError) for a bad state."""
        table = as_hex(state["table"])
        if len(table) != len(self.table):
            raise ValueError(f"MSI-X table of {len(table)} bytes")
        self.table[:] = table
        self.pending = as_int(state["pending"])
        self.enabled = as_bool(state["enabled"])
        self.function_masked = as_bool(state["function_masked"])


__all__ = [
    "CAP_MSIX",
    "CTRL_ENABLE",
    "CTRL_FUNCTION_MASK",
    "ENTRY_SIZE",
    "VECTOR_MASKED",
    "MsiSink",
    "MsixTable",
    "pba_size",
]
