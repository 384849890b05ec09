"""Plain-data description of a VM, shared by the CLI, JSON files and the API."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from .errors import ConfigError

MIB = 1 << 20
# The kernel command line a Linux guest boots with when the user gives none.
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
ENGINES = ("hw", "bt", "hybrid")
MMU_MODES = ("shadow", "nested")
CPU_MODELS = ("baseline", "v2", "v3", "host")    # engines/bt/cpumodel.py


DRIVE_FORMATS = ("raw", "qcow2", "vmdk")
IDE_POSITIONS = 4        # two channels, master and slave on each


@dataclass
class DriveConfig:
    """One virtio-blk disk (`--drive file=PATH[,format=F][,readonly=on][,id=NAME][,cache=MODE]`)."""
    file: str
    format: str | None = None    # None: probed from the file's first bytes
    readonly: bool = False
    id: str | None = None        # also the disk's serial (virtio-blk GET_ID)
    cache: str = "writeback"     # QEMU's host-cache modes (storage/cache.py)
    # if=ide only: the position, bus * 2 + unit (0 primary master .. 3
    # secondary slave); None: the first free one (ide_positions).
    index: int | None = None

    @classmethod
    def from_dict(cls, data: object, where: str) -> "DriveConfig":
        """Raises ConfigError for a drive that is not an object of these fields."""
        if not isinstance(data, dict) or not isinstance(data.get("file"), str):
            raise ConfigError(f"{where}: drives: {json.dumps(data)} is not a drive (needs a \"file\")")
        kinds = {"file": (str,), "format": (str, type(None)), "readonly": (bool,), "id": (str, type(None)),
                 "cache": (str,), "index": (int, type(None))}
        for key, value in data.items():
            if key not in kinds or not isinstance(value, kinds[key]):
                raise ConfigError(f"{where}: drives: bad key or value {key!r}")
        drive = cls(**data)
        drive.validate()
        return drive

    def validate(self) -> None:
        if self.format is not None and self.format not in DRIVE_FORMATS:
            raise ConfigError(f"drive {self.file}: unknown format {self.format!r} "
                              f"(choose from {', '.join(DRIVE_FORMATS)})")
        from .storage.cache import CACHE_MODES
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"drive {self.file}: unknown cache mode {self.cache!r} "
                              f"(choose from {', '.join(CACHE_MODES)})")
        if self.index is not None and (isinstance(self.index, bool) or not 0 <= self.index < IDE_POSITIONS):
            raise ConfigError(f"drive {self.file}: IDE index {self.index} is not 0..{IDE_POSITIONS - 1} "
                              "(bus 0..1, unit 0..1)")


def parse_drive(text: str) -> DriveConfig:
    """Parses `file=PATH[,format=raw|qcow2|vmdk][,readonly=on][,id=NAME]
    [,cache=MODE]` (QEMU's spelling; `if=virtio` is accepted). Raises ConfigError."""
    drive, interface = _drive_and_interface(text)
    if interface == "ide":
        raise ConfigError(f"--drive {text!r}: an if=ide disk is not a virtio-blk disk (see parse_ide_drives)")
    if interface != "virtio":
        raise ConfigError(f"--drive {text!r}: if=none drives need -device virtio-blk-pci,drive=ID")
    return drive


def parse_ide_drives(drives: list[str]) -> list[DriveConfig]:
    """The `--drive ...,if=ide[,bus=B,unit=U|,index=I]` disks
    (devices/ide/), each with its position (index) filled in as QEMU
    places them: the one asked for, else the first free.  Raises
    ConfigError for two on one position or more than four."""
    out = [drive for drive, interface in map(_drive_and_interface, drives) if interface == "ide"]
    for drive, index in zip(out, ide_positions(out)):
        drive.index = index
    return out


def ide_positions(drives: list[DriveConfig]) -> list[int]:
    """Each IDE drive's position (bus * 2 + unit), in order as QEMU gives
    them: its own index, else the first position no drive before it holds.
    Raises ConfigError for two drives on one position or none left."""
    taken: dict[int, str] = {}
    for drive in drives:
        index = drive.index
        if index is None:
            index = next((i for i in range(IDE_POSITIONS) if i not in taken), None)
            if index is None:
                raise ConfigError(f"IDE drive {drive.file}: all {IDE_POSITIONS} positions are taken "
                                  "(two channels, master and slave)")
        elif index in taken:
            raise ConfigError(f"IDE drives {taken[index]} and {drive.file} are both at "
                              f"bus {index // 2}, unit {index % 2}")
        taken[index] = drive.file
    return list(taken)


def _ide_index(text: str, opts: dict[str, str]) -> int | None:
    """The position that if=ide's index=, or bus= and unit=, name (None:
    neither given); pops them from `opts`. Raises ConfigError."""
    def number(key: str, limit: int) -> int | None:
        value = opts.pop(key, None)
        if value is None:
            return None
        if not value.isdigit() or int(value) >= limit:
            raise ConfigError(f"--drive {text!r}: {key}={value} is not 0..{limit - 1}")
        return int(value)
    index, bus, unit = number("index", IDE_POSITIONS), number("bus", 2), number("unit", 2)
    if index is not None and (bus is not None or unit is not None):
        raise ConfigError(f"--drive {text!r}: index= or bus=/unit=, not both")
    if bus is None and unit is None:
        return index
    return (bus or 0) * 2 + (unit or 0)    # QEMU would seek a free unit for bus= alone; unit 0 here


def parse_qemu_drives(drives: list[str], devices: list[str]) -> list[DriveConfig]:
    """--drive texts and QEMU's `-drive file=...,if=none,id=ID` with
    `-device virtio-blk-pci,drive=ID`: the if=virtio drives in order, then
    those of the -devices in -device order. Raises ConfigError."""
    out, held = [], {}
    for text in drives:
        drive, interface = _drive_and_interface(text)
        if interface == "ide":
            continue            # parse_ide_drives' business
        if interface == "virtio":
            out.append(drive)
        elif not drive.id:
            raise ConfigError(f"--drive {text!r}: if=none needs id=ID for -device virtio-blk-pci,drive=ID")
        else:
            held[drive.id] = drive
    for text in devices:
        kind, opts = _options(text, "-device")
        if kind != "virtio-blk-pci":
            continue
        ref = opts.pop("drive", None)
        if ref not in held:
            raise ConfigError(f"-device {text!r}: drive={ref} names no (unused) -drive ...,if=none,id=ID")
        if opts:
            raise ConfigError(f"-device {text!r}: unknown option {sorted(opts)[0]!r}")
        out.append(held.pop(ref))
    if held:
        raise ConfigError(f"-drive id={sorted(held)[0]} (if=none) has no -device virtio-blk-pci")
    return out


CONSOLE_DEVICES = ("virtio-serial-pci", "virtio-serial", "virtconsole", "virtserialport")


def parse_qemu_console(chardevs: list[str], devices: list[str]) -> list[str]:
    """QEMU's `-chardev socket,id=C,path=P,server=on[,wait=off]` (or
    `-chardev stdio,id=C` / `null,id=C`) with `-device virtio-serial-pci`
    and `-device virtconsole,chardev=C` / `virtserialport,chardev=C,name=N`,
    as --virtio-console port specs in -device order. Raises ConfigError."""
    backends: dict[str, str] = {}
    for text in chardevs:
        kind, opts = _options(text, "-chardev")
        ident = opts.pop("id", None)
        if not ident:
            raise ConfigError(f"-chardev {text!r}: id=C is required")
        if kind == "socket":
            if not opts.get("path") or opts.pop("server", "off") not in ("on", "true", "yes"):
                raise ConfigError(f"-chardev {text!r}: pyvmm serves Unix sockets only (path=P,server=on)")
            backends[ident] = f"socket={opts.pop('path')}"
            opts.pop("wait", None)        # pyvmm never waits for the client
        elif kind in ("stdio", "null"):
            backends[ident] = kind
            opts.pop("signal", None)
        else:
            raise ConfigError(f"-chardev {text!r}: only socket, stdio and null backends are supported")
        if opts:
            raise ConfigError(f"-chardev {text!r}: unknown option {sorted(opts)[0]!r}")
    ports, used = [], set()
    for text in devices:
        kind, opts = _options(text, "-device")
        if kind not in ("virtconsole", "virtserialport"):
            continue
        chardev, name = opts.pop("chardev", None), opts.pop("name", None)
        opts.pop("id", None)
        if chardev not in backends or chardev in used:
            raise ConfigError(f"-device {text!r}: chardev={chardev} names no (unused) -chardev")
        if opts:
            raise ConfigError(f"-device {text!r}: unknown option {sorted(opts)[0]!r}")
        if kind == "virtserialport" and not name:
            raise ConfigError(f"-device {text!r}: a virtserialport needs name=N here")
        used.add(chardev)
        ports.append(backends[chardev] + (f",name={name}" if kind == "virtserialport" else ""))
    return ports


def _drive_and_interface(text: str) -> tuple[DriveConfig, str]:
    """A --drive text as its DriveConfig and its if= (virtio or none). Raises ConfigError."""
    opts: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or key in opts:
            raise ConfigError(f"--drive {text!r}: expected key=value items (file=PATH,format=raw,...)")
        opts[key] = value
    interface = opts.pop("if", "virtio")
    if interface not in ("virtio", "none", "ide"):
        raise ConfigError(f"--drive {text!r}: only if=virtio and if=ide disks (or if=none with -device) are supported")
    readonly = opts.pop("readonly", "off")
    if readonly not in ("on", "off"):
        raise ConfigError(f"--drive {text!r}: readonly is on or off")
    if not opts.get("file"):
        raise ConfigError(f"--drive {text!r}: file=PATH is required")
    index = _ide_index(text, opts) if interface == "ide" else None
    drive = DriveConfig(file=opts.pop("file"), format=opts.pop("format", None),
                        readonly=readonly == "on", id=opts.pop("id", None), cache=opts.pop("cache", "writeback"),
                        index=index)
    if opts:
        raise ConfigError(f"--drive {text!r}: unknown option {sorted(opts)[0]!r}")
    drive.validate()
    return drive, interface


@dataclass
class NetConfig:
    """One virtio-net NIC on exactly one backend: `--net tap=IFNAME`, `--net
    switch=NAME` (a `pyvmm switch`, started when not running) or a QEMU
    `-netdev stream` server socket (`stream`: its path); `[,mac=MAC][,id=NAME]`."""
    tap: str | None = None
    mac: str | None = None       # None: tap: 52:54:00:12:34:56 + index; switch/stream: derived from the VM
    id: str | None = None
    switch: str | None = None
    stream: str | None = None

    @classmethod
    def from_dict(cls, data: object, where: str) -> "NetConfig":
        """Raises ConfigError for a NIC that is not an object of these fields."""
        if not isinstance(data, dict) or not any(isinstance(data.get(k), str) for k in NET_BACKENDS):
            raise ConfigError(f"{where}: nets: {json.dumps(data)} is not a NIC (needs a \"tap\" or \"switch\")")
        for key, value in data.items():
            if key not in ("mac", "id") + NET_BACKENDS or not isinstance(value, (str, type(None))):
                raise ConfigError(f"{where}: nets: bad key or value {key!r}")
        net = cls(**data)
        net.validate()
        return net

    def validate(self) -> None:
        from .devices.virtio.net import parse_mac
        from .net.port import NetError
        from .net.switch_config import check_name
        from .net.tap import check_ifname
        backends = [k for k in NET_BACKENDS if getattr(self, k) is not None]
        if len(backends) != 1:
            raise ConfigError(f"--net: give exactly one of tap=IFNAME, switch=NAME (got {backends or 'none'})")
        try:
            if self.tap is not None:
                check_ifname(self.tap)
            elif self.switch is not None:
                check_name(self.switch)
            elif not self.stream:
                raise ConfigError("-netdev stream: addr.path is empty")
        except (NetError, ConfigError) as e:
            raise ConfigError(f"--net {str(e).removeprefix('--net ')}") from None
        if self.mac is not None:
            try:
                parse_mac(self.mac)
            except ValueError as e:
                raise ConfigError(f"--net mac={self.mac}: {e}") from None


NET_BACKENDS = ("tap", "switch", "stream")


def parse_net(text: str) -> NetConfig:
    """Parses `tap=IFNAME|switch=NAME[,mac=MAC][,id=NAME]`. Raises ConfigError."""
    opts: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or key in opts:
            raise ConfigError(f"--net {text!r}: expected key=value items (tap=IFNAME|switch=NAME,mac=MAC,id=NAME)")
        opts[key] = value
    if "tap" not in opts and "switch" not in opts:
        raise ConfigError(f"--net {text!r}: a backend is required (tap=IFNAME or switch=NAME)")
    net = NetConfig(tap=opts.pop("tap", None), switch=opts.pop("switch", None), mac=opts.pop("mac", None),
                    id=opts.pop("id", None))
    if opts:
        raise ConfigError(f"--net {text!r}: unknown option {sorted(opts)[0]!r}")
    net.validate()
    return net


def _options(text: str, flag: str) -> tuple[str, dict[str, str]]:
    """QEMU's `KIND,key=value,...` as (KIND, options). Raises ConfigError."""
    kind, *parts = text.split(",")
    opts: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key in opts:
            raise ConfigError(f"{flag} {text!r}: expected {kind},key=value,...")
        opts[key] = value
    return kind, opts


def parse_qemu_nets(netdevs: list[str], devices: list[str]) -> list[NetConfig]:
    """QEMU's `-netdev tap,id=N,ifname=IF` or `-netdev stream,id=N,addr.type=
    unix,addr.path=PATH` with `-device virtio-net-pci,netdev=N[,mac=MAC]`,
    as NICs in -device order. Raises ConfigError."""
    backends: dict[str, dict[str, str]] = {}
    for text in netdevs:
        kind, opts = _options(text, "-netdev")
        if kind == "tap":
            if not opts.get("id") or not opts.get("ifname"):
                raise ConfigError(f"-netdev {text!r}: id=N and ifname=IF are required")
            unknown = set(opts) - {"id", "ifname", "script", "downscript"}
            if unknown or opts.get("script", "no") != "no" or opts.get("downscript", "no") != "no":
                raise ConfigError(f"-netdev {text!r}: unsupported option "
                                  f"{sorted(unknown)[0] if unknown else 'script'!r}")
            backends[opts["id"]] = {"tap": opts["ifname"]}
        elif kind == "stream":
            # the client end of QEMU's stream netdev (a pyvmm switch is such a server)
            if not opts.get("id") or opts.get("addr.type") != "unix" or not opts.get("addr.path"):
                raise ConfigError(f"-netdev {text!r}: id=N, addr.type=unix and addr.path=PATH are required")
            unknown = set(opts) - {"id", "addr.type", "addr.path", "server"}
            if unknown or opts.get("server", "off") not in ("off", "false", "no"):
                raise ConfigError(f"-netdev {text!r}: unsupported option "
                                  f"{sorted(unknown)[0] if unknown else 'server'!r} (pyvmm is the client end)")
            backends[opts["id"]] = {"stream": opts["addr.path"]}
        else:
            raise ConfigError(f"-netdev {text!r}: only tap and stream backends are supported")
    nets, used = [], set()
    for text in devices:
        kind, opts = _options(text, "-device")
        if kind in ("virtio-blk-pci",) + CONSOLE_DEVICES:
            continue            # parse_qemu_drives' or parse_qemu_console's business
        if kind != "virtio-net-pci":
            raise ConfigError(f"-device {text!r}: only virtio-net-pci and virtio-blk-pci are supported here")
        netdev = opts.pop("netdev", None)
        if netdev not in backends or netdev in used:
            raise ConfigError(f"-device {text!r}: netdev={netdev} names no (unused) -netdev")
        used.add(netdev)
        net = NetConfig(**backends[netdev], mac=opts.pop("mac", None), id=opts.pop("id", netdev))
        if opts:
            raise ConfigError(f"-device {text!r}: unknown option {sorted(opts)[0]!r}")
        net.validate()
        nets.append(net)
    if set(backends) - used:
        raise ConfigError(f"-netdev id={sorted(set(backends) - used)[0]} has no -device virtio-net-pci")
    return nets


@dataclass
class VmConfig:
    kernel: str | None = None
    # BIOS firmware image (boot/firmware.py) that boots from the drives, or
    # None: pyvmm loads `kernel` itself. Both at once is refused (for now).
    bios: str | None = None
    initrd: list[str] = field(default_factory=list)  # several only for Multiboot modules
    cmdline: str = ""
    mem_mib: int = 512
    cpus: int = 1
    engine: str = "hw"
    no_reboot: bool = False
    # CPUID feature names (as in /proc/cpuinfo, e.g. "cx16", "xsave") hidden from the guest.
    cpuid_hide: list[str] = field(default_factory=list)
    # (iobase, iosize) of a QEMU-style isa-debug-exit device, or None.
    debug_exit: tuple[int, int] | None = None
    fw_cfg_files: list[tuple[str, str]] = field(default_factory=list)
    # Decompress a bzImage on the host and enter the ELF kernel directly.
    host_decompress: bool = True
    # False: no in-kernel interrupt controller under KVM, so HLT exits to
    # pyvmm (raw test guests use it; Linux needs the irqchip).
    irqchip: bool = True
    # hw: complete instructions KVM cannot emulate with pyvmm's own code.
    complete_instructions: bool = True
    # hw on hosts that emulate guest kernel mode: keep a Linux guest off the
    # features the host cannot run (engines/kvm/hostfit.py).
    fit_guest_to_host: bool = True
    # Appended to a Linux kernel's command line by pyvmm (not by the user).
    linux_cmdline_extra: str = ""
    # bt: "shadow" page tables kept coherent across guest page-table writes,
    # or "nested": every TLB miss walks the guest tables (EPT/NPT cost model).
    mmu: str = "shadow"
    # bt: guest time from instructions retired instead of the host clock.
    deterministic: bool = False
    # bt (and hybrid's kernel): the x86-64 level the virtual CPU offers,
    # "baseline", "v2", "v3" or "host" (engines/bt/cpumodel.py).
    cpu_model: str = "v3"
    # pyvmm's paravirtual interface (paravirt/, docs/paravirt.md): CPUID
    # signature, hypercall page MSR, doorbell. False: a plain PC.
    paravirt: bool = True
    # bt: KVM's paravirtual interface (KVM signature in CPUID 0x40000000,
    # kvmclock, PV EOI, steal time; engines/bt/kvmpv.py).  Under hw KVM
    # provides these itself.
    kvmclock: bool = True
    # The VMware backdoor (ports 0x5658/0x5659, docs/vmware-backdoor.md) and
    # the guestinfo.* values its GuestRPC "info-get" answers (key without
    # the "guestinfo." prefix -> value).
    vmware_backdoor: bool = False
    guestinfo: dict[str, str] = field(default_factory=dict)
    # bt: directory of the on-disk store of translated blocks
    # (engines/bt/blockstore.py); None: every block is compiled afresh.
    block_store: str | None = None
    # virtio-blk disks (devices/virtio/block.py) on PCI bus 0, in slot order.
    drives: list[DriveConfig] = field(default_factory=list)
    # legacy IDE disks (devices/ide/): a PIIX IDE function; primary channel at 0x1F0, IRQ 14,
    # secondary at 0x170, IRQ 15; each drive's index says where (ide_positions).
    ide_drives: list[DriveConfig] = field(default_factory=list)
    # virtio-net NICs (devices/virtio/net.py) on PCI bus 0, after the disks.
    nets: list[NetConfig] = field(default_factory=list)
    # a virtio-rng device (devices/virtio/rng.py) giving host entropy.
    virtio_rng: bool = False
    # virtio-console ports (devices/virtio/console.py), as given to
    # --virtio-console: "stdio", "null" or "socket=PATH", with ",name=NAME"
    # for a named port; the one without a name is the console (hvc0).
    virtio_console: list[str] = field(default_factory=list)
    # How the virtio devices are attached: "pci" (bus 0, transport/pci.py) or
    # "mmio" (transport/mmio.py, announced with virtio_mmio.device=).
    virtio_transport: str = "pci"
    # QMP control sockets (api/qmp.py), as given to --qmp:
    # "unix:PATH,server[,wait=off]" or "tcp:HOST:PORT,server[,wait=off]".
    qmp: list[str] = field(default_factory=list)
    # Start from this internal snapshot of the drives (QEMU's -loadvm; snapshot/savevm.py).
    loadvm: str | None = None
    # 16550 UARTs COM1..COM4 in order (builder.SERIAL_PORTS), each "stdio"
    # (the console), "null" or "file:PATH" (output appended to PATH).
    serials: list[str] = field(default_factory=lambda: ["stdio"])
    verbose: bool = False

    def validate(self) -> None:
        """Raises ConfigError for values no machine can have."""
        if self.mem_mib < 16:
            raise ConfigError(f"memory {self.mem_mib} MiB is too small (16 MiB at least)")
        if self.mem_mib > 64 * 1024:
            raise ConfigError(f"memory {self.mem_mib} MiB is too large (64 GiB at most)")
        if not 1 <= self.cpus <= 64:
            raise ConfigError(f"cpus must be 1..64, not {self.cpus}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r} (choose from {', '.join(ENGINES)})")
        if self.mmu not in MMU_MODES:
            raise ConfigError(f"unknown mmu {self.mmu!r} (choose from {', '.join(MMU_MODES)})")
        if self.cpu_model not in CPU_MODELS:
            raise ConfigError(f"unknown cpu model {self.cpu_model!r} (choose from {', '.join(CPU_MODELS)})")
        for drive in self.drives + self.ide_drives:
            drive.validate()
        for drive in self.drives:
            if drive.index is not None:
                raise ConfigError(f"drive {drive.file}: index is for IDE drives only")
        ide_positions(self.ide_drives)
        if self.qmp:
            from .api.endpoint import parse_endpoint
            for spec in self.qmp:
                parse_endpoint(spec)
        for net in self.nets:
            net.validate()
        if self.virtio_transport not in ("pci", "mmio"):
            raise ConfigError(f"unknown virtio transport {self.virtio_transport!r} (choose from pci, mmio)")
        if self.virtio_console:
            from .devices.virtio.console_ports import check_ports
            check_ports(self.virtio_console)
        if len(self.serials) > MAX_SERIALS:
            raise ConfigError(f"{len(self.serials)} serial ports: a PC has at most {MAX_SERIALS} (COM1-COM4)")
        for spec in self.serials:
            parse_serial(spec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- as JSON (pyvmm run --config / --print-config) ------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: object, where: str = "config") -> "VmConfig":
        """A config from plain data (parsed JSON): every key must be a field,
        of the field's kind; missing keys take the defaults.  Raises
        ConfigError naming `where` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a JSON object is needed, not {type(data).__name__}")
        defaults = cls()
        kw = {}
        for key, value in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"{where}: unknown key {key!r}")
            kw[key] = _field_value(key, value, getattr(defaults, key), where)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str) -> "VmConfig":
        """Reads a JSON config file. Raises ConfigError (one line)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not JSON: {e}") from None
        return cls.from_dict(data, path)


_FIELDS = {f.name for f in dataclasses.fields(VmConfig)}
# Fields whose JSON form (lists) becomes a tuple, or a list of tuples.
_PAIRS = {"debug_exit": 2}
_LISTS_OF_PAIRS = {"fw_cfg_files"}


def _field_value(key: str, value, default, where: str):
    """`value` checked against the kind of the field's default."""
    bad = ConfigError(f"{where}: {key}: {json.dumps(value)} is not a valid value")
    if key in ("drives", "ide_drives"):
        if not isinstance(value, list):
            raise bad
        return [DriveConfig.from_dict(v, where) for v in value]
    if key == "nets":
        if not isinstance(value, list):
            raise bad
        return [NetConfig.from_dict(v, where) for v in value]
    if key in _PAIRS:
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == _PAIRS[key] and all(_is_int(v) for v in value)):
            raise bad
        return tuple(value)
    if key in _LISTS_OF_PAIRS:
        if not isinstance(value, list) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in value):
            raise bad
        return [tuple(v) for v in value]
    if default is None:
        if value is not None and not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = _is_int(value)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, dict):
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise bad
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_SERIALS = 4


def parse_serial(spec: str) -> tuple[str, str]:
    """("stdio"|"null"|"file", path) of a serial port backend spec. Raises ConfigError."""
    if spec in ("stdio", "null"):
        return spec, ""
    if spec.startswith("file:") and len(spec) > 5:
        return "file", spec[5:]
    raise ConfigError(f"bad serial port {spec!r} (stdio, null or file:PATH)")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*$")
_SIZE_SHIFT = {"": 20, "k": 10, "m": 20, "g": 30, "t": 40}  # bare number means MiB, as in QEMU


def parse_mem_size(text: str) -> int:
    """Parses a QEMU-style size ("512", "256M", "1G") into MiB.

    Raises ConfigError on anything else."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"bad memory size {text!r} (e.g. 512, 256M, 1G)")
    nbytes = int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    if nbytes % MIB:
        raise ConfigError(f"memory size {text!r} is not a whole number of MiB")
    return nbytes // MIB
