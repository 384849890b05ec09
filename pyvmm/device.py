"""The device contract: what the buses, the machine and snapshots rely on.

Three protocols, from the narrowest:

  Registers  read(offset, size) / write(offset, size, value): what a Bus
             dispatches to.  A device, or a window onto part of one (the
             i8042's second port, the PIC's ELCR, port 0x61 of the PIT),
             which owns no state of its own.
  Stateful   reset(), save() -> dict, restore(state), STATE_VERSION: every
             piece of machine state, mapped or not (the guest clock, the
             interrupt platform, GuestRPC).  What `Machine.devices` holds.
  Device     both: a device that sits on a bus and carries its own state.

A device that is not reached through a bus therefore simply has no
read/write; `isinstance(x, Device)` tells the two kinds apart.

State is plain JSON-able data (ints, floats, strings, bools, None, lists,
str-keyed dicts), so a snapshot can store it as is.  Every save() returns a
versioned envelope {"version": STATE_VERSION, ...fields}; a component's
state nested in its owner's (the PIC pair's chips, the PIT's counters) is
that component's own envelope.  restore() accepts its own version, and an
older one its class can bring up to date (STATE_UPGRADES: {old version:
a function from that version's fields to the next version's}, applied in
a chain, so a snapshot saved before a device grew a register still loads
with the register at its power-on value).  Any other version, or a state
that is not its shape, raises a one-line DeviceStateError; the device is
then left as it was before the call.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from .errors import VmmError


class DeviceStateError(VmmError):
    """A saved device state cannot be restored (unknown version, bad shape)."""


@runtime_checkable
class Registers(Protocol):
    """Something a Bus dispatches to; offsets are relative to its range."""

    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """Machine state that can be reset, saved and restored."""

    STATE_VERSION: int

    def reset(self) -> None:
        """Power-on state."""

    def save(self) -> dict:
        """The state as JSON-able data, {"version": STATE_VERSION, ...}."""

    def restore(self, state: dict) -> None:
        """Loads what save() returned. Raises DeviceStateError."""


@runtime_checkable
class Device(Registers, Stateful, Protocol):
    """A bus-mapped device: registers plus state."""


# The exceptions a restore body raises on a state of the wrong shape.
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)


def _name(device: object) -> str:
    return type(device).__name__


def saved(device: Stateful, fields: dict[str, Any]) -> dict:
    """The envelope save() returns: `fields` under the device's version."""
    return {"version": device.STATE_VERSION, **fields}


def restore_state(device: Stateful, state: object, load: Callable[[dict], None]) -> None:
    """Checks `state`'s envelope against the device's STATE_VERSION, then
    runs `load(state)`.  If the envelope is wrong, or `load` fails on a
    field of the wrong shape, the device is put back as it was and a
    one-line DeviceStateError raised."""
    name = _name(device)
    state = current_state(device, state)
    before = device.save()
    try:
        load(state)
    except (DeviceStateError, *_SHAPE_ERRORS) as e:
        load(before)   # the state we just saved always loads
        if isinstance(e, DeviceStateError):   # a part's state: say whose part
            raise DeviceStateError(f"{name} state: {e}") from None
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
        detail = " ".join(detail.split())  # one line, whatever the message was
        raise DeviceStateError(f"{name} state: {detail}") from None


def current_state(device: Stateful, state: object) -> dict:
    """`state` as an envelope of the device's STATE_VERSION (an older one
    upgraded), without touching the device: what a restore checks before
    anything of the machine changes. Raises DeviceStateError."""
    name = _name(device)
    if not isinstance(state, dict):
        raise DeviceStateError(f"{name} state: expected a dict, got {type(state).__name__}")
    version = state.get("version")
    if type(version) is not int:
        raise DeviceStateError(f"{name} state: no integer version")
    return state if version == device.STATE_VERSION else _upgraded(device, state, version)


def _upgraded(device: Stateful, state: dict, version: int) -> dict:
    """`state`, of an older `version`, brought up to the device's
    STATE_VERSION through its STATE_UPGRADES chain. Raises DeviceStateError
    for a version the chain does not start from (older, or newer than this
    pyvmm's) or an old state of the wrong shape."""
    name, current = _name(device), device.STATE_VERSION
    upgrades = getattr(device, "STATE_UPGRADES", {})
    oldest = current
    while oldest - 1 in upgrades:          # the unbroken chain up to the current version
        oldest -= 1
    if not oldest <= version < current:
        known = f"version {current}" if oldest == current else f"versions {oldest} to {current}"
        raise DeviceStateError(f"{name} state: version {version} is not supported "
                               f"(this pyvmm restores {known})")
    fields = {k: v for k, v in state.items() if k != "version"}
    try:
        while version < current:
            fields = upgrades[version](fields)
            version += 1
    except _SHAPE_ERRORS as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise DeviceStateError(f"{name} state: version {version}: {detail}") from None
    return {"version": current, **fields}


# Strict field readers for restore bodies: int("7") and bool("no") would
# quietly accept what no save() ever wrote.

def as_int(value: object) -> int:
    """`value` if it is an int (not a bool). Raises TypeError."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def as_opt_int(value: object) -> int | None:
    """`value` if it is None or an int. Raises TypeError."""
    return None if value is None else as_int(value)


def as_bool(value: object) -> bool:
    """`value` if it is a bool. Raises TypeError."""
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def as_float(value: object) -> float:
    """`value` as a float if it is a number (JSON writes 2.0 as 2.0, but a
    hand-made state may say 2). Raises TypeError."""
    if type(value) not in (int, float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def as_list(value: object, length: int | None = None) -> list:
    """`value` if it is a list (of `length` items, when given).
    Raises TypeError or ValueError."""
    if type(value) is not list:
        raise TypeError(f"expected a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"expected {length} items, got {len(value)}")
    return value


def as_dict(value: object) -> dict:
    """`value` if it is a dict. Raises TypeError."""
    if type(value) is not dict:
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def as_hex(value: object) -> bytes:
    """The bytes a hex string stands for. Raises TypeError or ValueError."""
    if type(value) is not str:
        raise TypeError(f"expected a hex string, got {type(value).__name__}")
    return bytes.fromhex(value)
