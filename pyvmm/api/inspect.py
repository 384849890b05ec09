"""Looking inside the machine: QMP query-block and query-pci, and HMP's
info registers, info block, info pci, x and xp, in QEMU's shapes.

Reading vCPU registers needs the vCPUs still: `info registers` and `x`
(which walks the guest's page tables from CR3) pause a running machine
for the moment they read, and let it go on."""

from __future__ import annotations

import re
import struct

from ..cpu import CR0_PG, CR4_PAE, EFER_LMA, CpuState
from ..errors import GuestMemoryError
from ..runstate import RunState
from .commands import COMMANDS, HMP_COMMANDS, Command, CommandError, Target, _machine, _state_call


# -- drives ---------------------------------------------------------------------------------
def _drive_info(name: str, drive) -> dict:
    from ..storage.qcow2_snapshot import read_snapshots
    img = drive.image
    image = {"filename": img.path, "format": img.format, "virtual-size": img.size,
             "dirty-flag": False}
    if img.format == "qcow2":
        snaps = read_snapshots(img)
        if snaps:
            image["snapshots"] = [s.as_json() for s in snaps]
    return {"device": name, "qdev": f"/machine/peripheral/{name}/virtio-backend", "locked": False,
            "removable": False, "type": "unknown", "io-status": "ok",
            "inserted": {"file": img.path, "node-name": name, "ro": bool(drive.readonly), "drv": img.format,
                         "encrypted": False, "detect_zeroes": "off", "backing_file_depth": 0,
                         "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                         "write_threshold": 0, "image": image,
                         "cache": {"writeback": True, "direct": False, "no-flush": False}}}


def query_block(t: Target, args: dict) -> list[dict]:
    from ..snapshot.savevm import drives
    m = _machine(t)
    with m.lock:
        return [_drive_info(name, d) for name, d in drives(m).items()]


def hmp_info_block(t: Target, word: str, rest: str) -> str:
    lines = []
    for b in query_block(t, {}):
        ins = b["inserted"]
        lines.append(f"{b['device']}: {ins['file']} ({ins['drv']}{', read-only' if ins['ro'] else ''})")
        lines.append(f"    Attached to:      {b['qdev']}")
        lines.append("    Cache mode:       writeback")
    return "".join(line + "\r\n" for line in lines)


# -- PCI ----------------------------------------------------------------------------------------
def _pci_devices(m) -> list[dict]:
    from ..devices.pci.host import intx_gsi
    bridge = m.devices.get("pci_host")
    if bridge is None:
        return []
    out = []
    for slot, fn in sorted(bridge.functions.items()):
        cfg = fn.config
        vendor, device = struct.unpack_from("<HH", cfg, 0)
        class_code = struct.unpack_from("<H", cfg, 0x0A)[0]
        sub_vendor, sub = struct.unpack_from("<HH", cfg, 0x2C)
        regions = []
        for bar in fn.bars:
            if bar is None:
                continue
            region = {"bar": bar.index, "type": "io" if bar.kind == "io" else "memory",
                      "address": fn.bar_address(bar), "size": bar.size}
            if bar.kind != "io":
                region.update({"prefetch": bar.prefetchable, "mem_type_64": bar.kind == "mem64"})
            regions.append(region)
        info = {"bus": 0, "slot": slot, "function": 0,
                "class_info": {"class": class_code},
                "id": {"device": device, "vendor": vendor, "subsystem": sub, "subsystem-vendor": sub_vendor},
                "qdev_id": "" if slot == 0 else bridge.names.get(slot, ""), "regions": regions}
        if cfg[0x3D]:
            info["irq"] = intx_gsi(slot)
            info["irq_pin"] = cfg[0x3D]
        out.append(info)
    return out


def query_pci(t: Target, args: dict) -> list[dict]:
    m = _machine(t)
    with m.lock:
        return [{"bus": 0, "devices": _pci_devices(m)}]


def hmp_info_pci(t: Target, word: str, rest: str) -> str:
    lines = []
    for d in query_pci(t, {})[0]["devices"]:
        lines.append(f"  Bus  0, device {d['slot']:3d}, function {d['function']}:")
        lines.append(f"    Class {d['class_info']['class']:04x}: PCI device {d['id']['vendor']:04x}:"
                     f"{d['id']['device']:04x}")
        if "irq" in d:
            lines.append(f"      IRQ {d['irq']}, pin {chr(ord('A') + d['irq_pin'] - 1)}")
        for r in d["regions"]:
            kind = "I/O at" if r["type"] == "io" else ("64 bit memory at" if r.get("mem_type_64")
                                                       else "32 bit memory at")
            lines.append(f"      BAR{r['bar']}: {kind} 0x{r['address']:x} [0x{r['address'] + r['size'] - 1:x}].")
        lines.append(f"      id \"{d['qdev_id']}\"")
    return "".join(line + "\r\n" for line in lines)


# -- vCPU state ------------------------------------------------------------------------------------
def _with_cpu(t: Target, index: int, read):
    """read(machine, CpuState of vCPU `index`) with the vCPUs still."""
    m = _machine(t)
    if not 0 <= index < m.config.cpus:
        raise CommandError(f"CPU {index} does not exist")
    was_running = m.state is RunState.RUNNING and not m.stopping
    if was_running:
        _state_call(m.pause)
    try:
        return read(m, m.engine.save_state(index))
    finally:
        if was_running and m.state is RunState.PAUSED:
            _state_call(m.resume)


def _flags(rflags: int) -> str:
    bits = [(11, "O"), (10, "D"), (7, "S"), (6, "Z"), (4, "A"), (2, "P"), (0, "C")]
    return "[" + "".join(c if rflags >> b & 1 else "-" for b, c in bits) + "]"


def format_registers(st: CpuState) -> str:
    """`info registers` as QEMU's x86 target prints it (64-bit layout in
    long mode, 32-bit otherwise)."""
    r = st.regs
    cpl = st.cs.dpl if st.cr0 & 1 else 0
    lines = []
    if st.efer & EFER_LMA:
        names = [("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"), ("RSI", "rsi"), ("RDI", "rdi"),
                 ("RBP", "rbp"), ("RSP", "rsp")] + [(f"R{i:<2d}", f"r{i}") for i in range(8, 16)]
        for i in range(0, 16, 4):
            lines.append(" ".join(f"{n}={r[k]:016x}" for n, k in names[i:i + 4]))
        lines.append(f"RIP={st.rip:016x} RFL={st.rflags:08x} {_flags(st.rflags)} CPL={cpl} II=0 A20=1 SMM=0 HLT=0")
        width = 16
    else:
        names = [("EAX", "rax"), ("EBX", "rbx"), ("ECX", "rcx"), ("EDX", "rdx"), ("ESI", "rsi"), ("EDI", "rdi"),
                 ("EBP", "rbp"), ("ESP", "rsp")]
        for i in range(0, 8, 4):
            lines.append(" ".join(f"{n}={r[k] & 0xFFFFFFFF:08x}" for n, k in names[i:i + 4]))
        lines.append(f"EIP={st.rip & 0xFFFFFFFF:08x} EFL={st.rflags:08x} {_flags(st.rflags)} CPL={cpl} II=0 "
                     f"A20=1 SMM=0 HLT=0")
        width = 8
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        s = getattr(st, name)
        flags = ((s.type | s.s << 4 | s.dpl << 5 | s.present << 7) << 8
                 | s.avl << 20 | s.l << 21 | s.db << 22 | s.g << 23)
        label = {"ldt": "LDT", "tr": "TR "}.get(name, name.upper() + " ")
        lines.append(f"{label}={s.selector:04x} {s.base:0{width}x} {s.limit:08x} {flags:08x}")
    lines.append(f"GDT=     {st.gdt.base:0{width}x} {st.gdt.limit:08x}")
    lines.append(f"IDT=     {st.idt.base:0{width}x} {st.idt.limit:08x}")
    lines.append(f"CR0={st.cr0:08x} CR2={st.cr2:0{width}x} CR3={st.cr3:0{width}x} CR4={st.cr4:08x}")
    lines.append(f"EFER={st.efer:016x}")
    return "".join(line + "\r\n" for line in lines)


def hmp_info_registers(t: Target, word: str, rest: str) -> str:
    """vCPU 0's registers; `-a`: every vCPU's; `-c N`: vCPU N's."""
    show = lambda m, st: format_registers(st)  # noqa: E731
    if rest == "-a":
        return "".join(f"CPU#{i}\r\n" + _with_cpu(t, i, show) for i in range(_machine(t).config.cpus))
    m = re.fullmatch(r"(?:-c\s+(\d+))?", rest)
    if m is None:
        raise CommandError(f"info registers: bad argument {rest!r} (give -a or -c N)")
    return _with_cpu(t, int(m.group(1) or 0), show)


# -- memory dumps ---------------------------------------------------------------------------------
def translate(memory, st: CpuState, vaddr: int) -> int:
    """The guest physical address of `vaddr` under the vCPU's paging.
    Raises CommandError for an address that is not mapped."""
    if not st.cr0 & CR0_PG:
        return vaddr & 0xFFFFFFFF
    def entry(addr: int, size: int) -> int:
        try:
            return memory.read_u64(addr) if size == 8 else memory.read_u32(addr)
        except GuestMemoryError:
            raise CommandError(f"Cannot access memory at 0x{vaddr:x}") from None
    if st.efer & EFER_LMA or st.cr4 & CR4_PAE:
        levels = [(39, 0x1FF), (30, 0x1FF), (21, 0x1FF), (12, 0x1FF)] if st.efer & EFER_LMA \
            else [(30, 0x3), (21, 0x1FF), (12, 0x1FF)]
        table = st.cr3 & (0xFFFFFFFFFF000 if st.efer & EFER_LMA else 0xFFFFFFE0)
        for depth, (shift, mask) in enumerate(levels):
            e = entry(table + ((vaddr >> shift) & mask) * 8, 8)
            if not e & 1:
                raise CommandError(f"Cannot access memory at 0x{vaddr:x}")
            frame = e & 0xFFFFFFFFFF000
            if shift in (30, 21) and e & 0x80 and not (shift == 30 and len(levels) == 3):
                return (frame & ~((1 << shift) - 1)) | (vaddr & ((1 << shift) - 1))
            table = frame
        return table | (vaddr & 0xFFF)
    e = entry((st.cr3 & 0xFFFFF000) + ((vaddr >> 22) & 0x3FF) * 4, 4)
    if not e & 1:
        raise CommandError(f"Cannot access memory at 0x{vaddr:x}")
    if e & 0x80 and st.cr4 & 0x10:                      # a 4 MiB page (CR4.PSE)
        return (e & 0xFFC00000) | (vaddr & 0x3FFFFF)
    e = entry((e & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4, 4)
    if not e & 1:
        raise CommandError(f"Cannot access memory at 0x{vaddr:x}")
    return (e & 0xFFFFF000) | (vaddr & 0xFFF)


_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def _parse_dump(word: str, rest: str) -> tuple[int, str, int, int]:
    """`x/NFU ADDR` -> (count, format, unit size, address) as QEMU reads it."""
    spec = word.split("/", 1)[1] if "/" in word else ""
    if not spec and rest.startswith("/"):
        spec, _, rest = rest[1:].partition(" ")
    m = re.fullmatch(r"(\d*)([xduoc]?)([bhwg]?)", spec)
    if m is None:
        raise CommandError(f"invalid format /{spec}")
    count = int(m.group(1) or 1)
    fmt = m.group(2) or "x"
    size = _SIZES[m.group(3) or ("b" if fmt == "c" else "w")]
    try:
        addr = int(rest.strip(), 0)
    except ValueError:
        raise CommandError(f"{word}: give an address (e.g. {word.split('/')[0]} /4x 0x1000)") from None
    if count > 1 << 16:
        raise CommandError("too many units to dump")
    return count, fmt, size, addr


def _dump(read, addr: int, count: int, fmt: str, size: int) -> str:
    per_line = 8 if size == 1 else 16
    out, pos, end = [], addr, addr + count * size
    while pos < end:
        n = min(per_line, end - pos)
        data = read(pos, n)
        cells = []
        for i in range(0, n, size):
            v = int.from_bytes(data[i:i + size], "little")
            if fmt == "x":
                cells.append(f"0x{v:0{size * 2}x}")
            elif fmt == "d":
                cells.append(str(v - (1 << size * 8) if v >> (size * 8 - 1) else v))
            elif fmt == "u":
                cells.append(str(v))
            elif fmt == "o":
                cells.append(f"0{v:o}")
            else:
                cells.append(repr(chr(v)) if 32 <= v < 127 else f"'\\x{v:02x}'")
        out.append(f"{pos:016x}: " + " ".join(cells))
        pos += n
    return "".join(line + "\r\n" for line in out)


def hmp_xp(t: Target, word: str, rest: str) -> str:
    count, fmt, size, addr = _parse_dump(word, rest)
    m = _machine(t)

    def read(gpa: int, n: int) -> bytes:
        try:
            return m.memory.read(gpa, n)
        except GuestMemoryError:
            raise CommandError(f"Cannot access memory at 0x{gpa:x}") from None
    return _dump(read, addr, count, fmt, size)


def hmp_x(t: Target, word: str, rest: str) -> str:
    count, fmt, size, addr = _parse_dump(word, rest)

    def dump(m, st: CpuState) -> str:
        def read(va: int, n: int) -> bytes:
            out = b""
            while n:                             # page by page: pages need not be contiguous
                k = min(n, 0x1000 - (va & 0xFFF))
                gpa = translate(m.memory, st, va)
                try:
                    out += m.memory.read(gpa, k)
                except GuestMemoryError:
                    raise CommandError(f"Cannot access memory at 0x{va:x}") from None
                va, n = va + k, n - k
            return out
        return _dump(read, addr, count, fmt, size)
    return _with_cpu(t, 0, dump)


COMMANDS.update({c.name: c for c in [
    Command("query-block", query_block),
    Command("query-pci", query_pci),
]})
HMP_COMMANDS.update({"info registers": hmp_info_registers, "info block": hmp_info_block,
                     "info pci": hmp_info_pci, "x": hmp_x, "xp": hmp_xp})
