"""The VM state of a snapshot: one versioned byte stream with checksummed
sections, and capture()/apply() between it and a paused Machine.

Layout (all integers big-endian):

    header   8s magic "PYVMMVM\\0", u32 format version, u32 section count
    section  4s name, u64 payload length, u32 CRC-32 of the payload, payload

Sections, in this order:

    META  JSON: pyvmm version, engine, vCPU count, RAM regions, device names,
          and "hotplugged": the records of device_add's devices (hotplugged.py),
          which a machine without them plugs back into their slots first
    CPUS  JSON: one CpuState per vCPU (cpu_to_json)
    DEVS  JSON: {device name: its save() envelope} (device.py's contract)
    RAM   u32 run count, then per run u64 guest address and u64 length, then
          the runs' bytes back to back; RAM not in a run is zero

A reader refuses an unknown magic or version, a section whose checksum
does not match, a truncated stream, and a state whose RAM layout, vCPU
count or device set differ from the machine's, before it changes anything.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from typing import TYPE_CHECKING

from .. import __version__, hotplugged
from ..cpu import CpuState, DescriptorTable, Segment
from ..device import DeviceStateError, current_state
from ..errors import VmmError

if TYPE_CHECKING:
    from ..machine import Machine

MAGIC = b"PYVMMVM\0"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sII")
SECTION = struct.Struct(">4sQI")
RUN = struct.Struct(">QQ")
CHUNK = 64 << 10           # RAM is saved in pieces of this size; all-zero pieces are left out
ZERO_CHUNK = bytes(CHUNK)

# Restored first (timers count from the guest clock) and last (KVM's
# platform sets per-vCPU state over what load_state put there).
FIRST_DEVICES = ("clock",)
# Devices a guest only uses once it has discovered them: a state saved on a
# machine without them (bt) loads into one with them (hybrid's paravirt
# interface), which get their power-on state.
OPTIONAL_DEVICES = ("paravirt",)
LAST_DEVICES = ("kvm_platform",)


class VmStateError(VmmError):
    """A VM state that cannot be loaded into this machine (what is wrong is said)."""


# -- vCPU state as JSON ---------------------------------------------------------------
def cpu_to_json(st: CpuState) -> dict:
    d = dataclasses.asdict(st)
    d["msrs"] = {str(k): v for k, v in st.msrs.items()}
    d["fxsave"] = st.fxsave.hex() if st.fxsave is not None else None
    return d


def cpu_from_json(d: dict) -> CpuState:
    """Raises VmStateError for a dict that is not a saved CpuState."""
    try:
        fields = dict(d)
        for name in CpuState.SEGMENT_NAMES:
            fields[name] = Segment(**fields[name])
        fields["gdt"] = DescriptorTable(**fields["gdt"])
        fields["idt"] = DescriptorTable(**fields["idt"])
        fields["msrs"] = {int(k): int(v) for k, v in fields["msrs"].items()}
        fields["fxsave"] = bytes.fromhex(fields["fxsave"]) if fields["fxsave"] is not None else None
        return CpuState(**fields)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise VmStateError(f"vmstate: a vCPU state is malformed ({e})") from None


# -- RAM ----------------------------------------------------------------------------------
def _ram_runs(mm, base: int, size: int) -> list[tuple[int, int]]:
    """(guest address, length) of the runs of a region's CHUNK-sized pieces
    that are not all zero (mmap.find compares in place: slicing would copy
    all of RAM; a finer grain costs more host time than it saves space)."""
    runs: list[tuple[int, int]] = []
    start = None
    for chunk in range(0, size, CHUNK):
        n = min(CHUNK, size - chunk)
        zero = mm.find(ZERO_CHUNK[:n], chunk, chunk + n) == chunk
        if zero and start is not None:
            runs.append((base + start, chunk - start))
            start = None
        elif not zero and start is None:
            start = chunk
    if start is not None:
        runs.append((base + start, size - start))
    return runs


def _encode_ram(machine: "Machine") -> list:
    """The RAM section's parts: its header, then views of guest RAM (no copy)."""
    memory = machine.memory
    runs = []
    for r in memory.regions:
        runs += [(gpa, n, r) for gpa, n in _ram_runs(r.mm, r.gpa, r.size)]
    head = b"".join([struct.pack(">I", len(runs)), *(RUN.pack(gpa, n) for gpa, n, _ in runs)])
    return [head, *(memoryview(r.mm)[gpa - r.gpa:gpa - r.gpa + n] for gpa, n, r in runs)]


def _decode_ram(machine: "Machine", payload: bytes) -> list[tuple[int, memoryview]]:
    """The runs of a RAM section, each checked to lie in the machine's RAM."""
    try:
        (count,) = struct.unpack_from(">I", payload)
        pos = 4 + count * RUN.size
        view, runs = memoryview(payload), []
        for i in range(count):
            gpa, n = RUN.unpack_from(payload, 4 + i * RUN.size)
            if not machine.memory.is_ram(gpa, n) or pos + n > len(payload):
                raise VmStateError(f"vmstate: RAM run 0x{gpa:x}+0x{n:x} is outside this machine's RAM")
            runs.append((gpa, view[pos:pos + n]))
            pos += n
    except struct.error:
        raise VmStateError("vmstate: the RAM section is truncated") from None
    if pos != len(payload):
        raise VmStateError("vmstate: the RAM section has trailing bytes")
    return runs


def _load_ram(machine: "Machine", runs: list[tuple[int, memoryview]]) -> None:
    from .lazymap import map_zero_fast
    memory = machine.memory
    for r in memory.regions:
        # Fresh zero pages, no page touched that the state leaves zero (not
        # MADV_DONTNEED: RAM mapped from a snapshot file (file.py) would
        # read the file's bytes again, not zeros).
        map_zero_fast(r.host_address(), r.size)
    machine.snapshot_parent = None                 # RAM no longer mirrors a snapshot file
    for gpa, data in runs:
        memory.view(gpa, len(data))[:] = data
    for r in memory.regions:       # translated code and the dirty log see the whole of RAM change
        memory.mark_dirty(r.gpa, r.size)
        for fn in memory.write_listeners:
            fn(r.gpa, r.size)
    _forget_translations(machine.engine)


def _forget_translations(engine) -> None:
    """Drops what an engine cached from the guest's page tables: the
    restored tables may differ from the ones it read (a process that
    forked after the save has other frames behind the same CR3), and
    loading the same CR3 value back would not flush them. bt's TLB of
    each vCPU (and its shadow tables); under hybrid, KVM's too."""
    bt = getattr(engine, "bt", engine)            # hybrid runs kernel code on a bt engine
    for cpu in getattr(bt, "cpus", None) or []:
        mmu = getattr(cpu, "mmu", None)
        if mmu is not None:
            mmu.flush()
    if hasattr(engine, "_flush_kvm_mmu") and getattr(engine, "vm", None) is not None:
        engine._flush_kvm_mmu()
        watch = getattr(engine, "watch", None)
        if watch is not None:
            watch.reset(None)


# -- the stream ----------------------------------------------------------------------------
def _meta(machine: "Machine") -> dict:
    meta = {"pyvmm": __version__, "engine": machine.config.engine, "cpus": machine.config.cpus,
            "ram": [[r.gpa, r.size] for r in machine.memory.regions], "devices": sorted(machine.devices)}
    plugged = hotplugged.records(machine)
    if plugged:                  # device_add's devices: a machine without them plugs them back first
        meta["hotplugged"] = plugged
    return meta


def to_replug(machine: "Machine", sections: dict[bytes, bytes]) -> list[dict]:
    """The records (hotplugged.py) of devices plugged at run time into the
    saved machine that this one lacks: a load plugs them back into their
    slots before the states go in. Raises VmStateError."""
    try:
        meta = json.loads(sections[b"META"])
        return hotplugged.missing(machine, meta.get("hotplugged") if isinstance(meta, dict) else None)
    except (ValueError, hotplugged.ReplugError) as e:      # malformed JSON or records
        raise VmStateError(f"vmstate: {e}") from None


def _pack(sections: list[tuple[bytes, list]]) -> list:
    """The stream as a list of buffers (sections given as lists of parts)."""
    out = [HEADER.pack(MAGIC, FORMAT_VERSION, len(sections))]
    for name, parts in sections:
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        out += [SECTION.pack(name, sum(len(p) for p in parts), crc), *parts]
    return out


def unpack(data: bytes) -> dict[bytes, bytes]:
    """Sections by name. Raises VmStateError for a stream that is not ours,
    of another format version, truncated or with a bad checksum."""
    if len(data) < HEADER.size:
        raise VmStateError("vmstate: truncated (no header)")
    magic, version, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise VmStateError("vmstate: not a pyvmm VM state")
    if version != FORMAT_VERSION:
        raise VmStateError(f"vmstate: format version {version} is not supported (this pyvmm reads {FORMAT_VERSION})")
    sections, pos = {}, HEADER.size
    for _ in range(count):
        if pos + SECTION.size > len(data):
            raise VmStateError("vmstate: truncated (section header)")
        name, length, crc = SECTION.unpack_from(data, pos)
        pos += SECTION.size
        payload = data[pos:pos + length]
        if len(payload) != length:
            raise VmStateError(f"vmstate: truncated (section {name.decode(errors='replace').strip()})")
        if zlib.crc32(payload) != crc:
            raise VmStateError(f"vmstate: section {name.decode(errors='replace').strip()} is corrupt (checksum)")
        sections[name] = payload
        pos += length
    for need in (b"META", b"CPUS", b"DEVS", b"RAM "):
        if need not in sections:
            raise VmStateError(f"vmstate: section {need.decode().strip()} is missing")
    return sections


def capture_parts(machine: "Machine") -> list:
    """The whole VM state of a machine whose vCPUs are not running (paused,
    or not started), as buffers to write out before the vCPUs run again:
    the RAM parts are views of guest memory."""
    with machine.lock:
        cpus = [cpu_to_json(machine.engine.save_state(i)) for i in range(machine.config.cpus)]
        devices = {name: dev.save() for name, dev in machine.devices.items()}
        ram = _encode_ram(machine)
    return _pack([(b"META", [json.dumps(_meta(machine)).encode()]),
                  (b"CPUS", [json.dumps(cpus).encode()]),
                  (b"DEVS", [json.dumps(devices).encode()]),
                  (b"RAM ", ram)])


def capture(machine: "Machine") -> bytes:
    """capture_parts() as one bytes object."""
    return b"".join(capture_parts(machine))


def check(machine: "Machine", data: bytes) -> tuple[list[CpuState], dict, list]:
    """Decodes `data` for `machine` without changing it. Raises VmStateError."""
    sections = unpack(data)
    cpus, devices = check_sections(machine, sections)
    return cpus, devices, _decode_ram(machine, sections[b"RAM "]), to_replug(machine, sections)


def check_sections(machine: "Machine", sections: dict[bytes, bytes]) -> tuple[list[CpuState], dict]:
    """The vCPU and device states of META, CPUS and DEVS, checked against
    the machine's RAM layout, vCPU count and device set (shared with the
    snapshot file format, file.py). Raises VmStateError."""
    try:
        meta = json.loads(sections[b"META"])
        cpus = [cpu_from_json(c) for c in json.loads(sections[b"CPUS"])]
        devices = json.loads(sections[b"DEVS"])
    except ValueError as e:
        raise VmStateError(f"vmstate: a JSON section is malformed ({e})") from None
    if not isinstance(meta, dict):
        raise VmStateError("vmstate: the META section is not an object")
    here = _meta(machine)
    here["devices"] = sorted(here["devices"] + [hotplugged.key(r["id"]) for r in to_replug(machine, sections)])
    if meta.get("ram") != here["ram"]:
        raise VmStateError(f"vmstate: saved with {_mib(meta.get('ram'))} MiB of RAM, this machine has "
                           f"{_mib(here['ram'])} MiB")
    if len(cpus) != here["cpus"]:
        raise VmStateError(f"vmstate: saved with {len(cpus)} vCPU(s), this machine has {here['cpus']}")
    if isinstance(devices, dict):          # saved where the machine had them, never used: dropped
        devices = {n: st for n, st in devices.items()
                   if n in here["devices"] or not _unused_optional(n, st)}
    extra = set(here["devices"]) - set(devices) if isinstance(devices, dict) else set()
    if isinstance(devices, dict) and extra <= set(OPTIONAL_DEVICES):
        devices = {**devices, **{name: None for name in extra}}     # reset: the guest never found them
    if not isinstance(devices, dict) or sorted(devices) != here["devices"]:
        theirs = set(devices) if isinstance(devices, dict) else set()
        diff = sorted(theirs ^ set(here["devices"]))
        raise VmStateError(f"vmstate: the device set does not match this machine's (differs in: "
                           f"{', '.join(diff) or '?'}; saved under engine {meta.get('engine')})")
    try:
        check_device_versions(machine, devices)
    except DeviceStateError as e:
        raise VmStateError(f"vmstate: {e}") from None
    return cpus, devices


def check_device_versions(machine: "Machine", devices: dict) -> None:
    """Refuses a device state of a version its device cannot restore (nor
    upgrade from) before anything is loaded: found in the middle of a
    restore, it would leave the machine half the old state and half the
    new. Raises DeviceStateError."""
    for name, state in devices.items():
        device = machine.devices.get(name)
        if state is not None and hasattr(device, "STATE_VERSION"):
            current_state(device, state)


def _unused_optional(name: str, state: object) -> bool:
    """True for the saved state of an OPTIONAL_DEVICES device the guest
    never set up (the paravirt interface with no hypercall page, shared
    page or timer), which a machine without that device can go on without."""
    if name not in OPTIONAL_DEVICES or not isinstance(state, dict):
        return False
    return not state.get("page_msr") and not state.get("shared") and state.get("timer_deadline_ns") is None


def _mib(ram) -> str:
    try:
        return str(sum(size for _, size in ram) >> 20)
    except (TypeError, ValueError):
        return "?"


def restore_devices_and_cpus(machine: "Machine", devices: dict, cpus: list) -> None:
    """Gives each device and vCPU its state, in the order they depend on
    one another: the devices FIRST_DEVICES names, the others, the vCPUs,
    then LAST_DEVICES (which read vCPU state).  A None state resets the
    device.  The caller holds the machine's lock; raises DeviceStateError.
    Shared by snapshot loads and incoming migrations."""
    order = ([n for n in FIRST_DEVICES if n in devices]
             + [n for n in devices if n not in FIRST_DEVICES + LAST_DEVICES])
    for name in order:
        if devices[name] is None:
            machine.devices[name].reset()
        else:
            machine.devices[name].restore(devices[name])
    for i, st in enumerate(cpus):
        machine.engine.load_state(i, st)
    for name in LAST_DEVICES:
        if devices.get(name) is not None:
            machine.devices[name].restore(devices[name])


def apply(machine: "Machine", data: bytes, checked: tuple | None = None) -> None:
    """Loads a VM state into a machine whose vCPUs are not running.
    Everything is checked first (VmStateError, machine untouched); a
    device that refuses its state afterwards raises VmStateError too.
    checked: what check(machine, data) returned, if the caller has it."""
    cpus, devices, runs, replug = checked if checked is not None else check(machine, data)
    with machine.lock:
        replug_or_refuse(machine, replug)
        _load_ram(machine, runs)
        try:
            restore_devices_and_cpus(machine, devices, cpus)
        except DeviceStateError as e:
            raise VmStateError(f"vmstate: {e}") from None


def replug_or_refuse(machine: "Machine", records: list[dict]) -> list[str]:
    """Plugs back the devices `records` describe (to_replug). Raises
    VmStateError with none of them plugged."""
    try:
        return hotplugged.replug(machine, records)
    except hotplugged.ReplugError as e:
        raise VmStateError(f"vmstate: {e}") from None

