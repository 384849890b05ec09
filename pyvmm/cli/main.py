"""`pyvmm`: command-line front end. Every VmmError becomes one line on stderr
and a non-zero exit code; nothing here prints a traceback for bad input."""

from __future__ import annotations

import argparse
import gc
import glob
import json
import logging
import os
import sys

from ..boot.firmware import DEFAULT_BIOS
from ..config import (DEFAULT_CMDLINE, VmConfig, parse_mem_size, parse_net, parse_qemu_console,
                      parse_qemu_drives, parse_qemu_nets, parse_ide_drives)
from ..errors import ConfigError, GuestCrash, VmmError
from .exitcodes import EXIT_CODES_HELP, EXIT_ERROR, EXIT_GUEST_CRASH, EXIT_USAGE, exit_code


def default_kernel() -> str:
    """The newest Debian cloud kernel in /boot. Raises ConfigError if none."""
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64")) or sorted(glob.glob("/boot/vmlinuz-*"))
    if not found:
        raise ConfigError("no kernel given and none in /boot (install linux-image-cloud-amd64 or use --kernel)")
    return found[-1]


def _int(text: str) -> int:
    return int(text, 0)


def parse_debug_exit(text: str) -> tuple[int, int]:
    """"iobase=0xf4,iosize=4" (QEMU's property syntax) -> (iobase, iosize)."""
    values = {"iobase": 0xF4, "iosize": 4}  # what QEMU test setups use for isa-debug-exit
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        if key not in values or not val:
            raise ConfigError(f"bad --debug-exit {text!r} (expected iobase=N,iosize=N)")
        try:
            values[key] = _int(val)
        except ValueError:
            raise ConfigError(f"bad --debug-exit value {val!r}") from None
    if values["iosize"] not in (1, 2, 4) or not 0 <= values["iobase"] <= 0xFFFF - values["iosize"]:
        raise ConfigError(f"bad --debug-exit {text!r} (iosize 1, 2 or 4 and iobase a port)")
    return values["iobase"], values["iosize"]


def parse_fw_cfg(text: str) -> tuple[str, str]:
    """"name=opt/x,file=path" -> (name, path)."""
    fields = dict(p.partition("=")[::2] for p in text.split(","))
    if not fields.get("name") or not fields.get("file") or set(fields) - {"name", "file"}:
        raise ConfigError(f"bad --fw-cfg {text!r} (expected name=NAME,file=PATH)")
    if len(fields["name"]) > 55:
        raise ConfigError(f"--fw-cfg name {fields['name']!r} is longer than 55 bytes")
    return fields["name"], fields["file"]


def _guestinfo(items: list[str], backdoor: bool) -> dict[str, str]:
    """--guestinfo KEY=VALUE options as a dict. Raises ConfigError."""
    if items and not backdoor:
        raise ConfigError("--guestinfo needs --vmware-backdoor")
    from ..devices.guestrpc import parse_guestinfo
    return dict(parse_guestinfo(t) for t in items)


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="boot a VM", epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Boot a guest. With no options: the Debian cloud kernel with pyvmm's busybox initramfs.")
    p.add_argument("--kernel", "-kernel", help="bzImage, vmlinux ELF, Multiboot or PVH image (default: /boot/vmlinuz-*-cloud-amd64)")
    p.add_argument("--bios", "-bios", nargs="?", const=DEFAULT_BIOS, default=None, metavar="PATH",
                   help=f"boot through BIOS firmware (default image: {DEFAULT_BIOS}); the default "
                        "when --drive is given without --kernel")
    p.add_argument("--initrd", "-initrd", help="initrd; for Multiboot, comma-separated modules (default: pyvmm's initramfs when booting the default kernel)")
    p.add_argument("--append", "-append", help=f"kernel command line (default for Linux: {DEFAULT_CMDLINE!r})")
    p.add_argument("--mem", "-m", default="512M", help="guest RAM: MiB or a QEMU-style size (256M, 1G); default 512M")
    p.add_argument("--cpus", "--smp", "-smp", type=int, default=1, help="number of vCPUs (default 1)")
    p.add_argument("--engine", choices=["hw", "bt", "hybrid", "auto"], default="auto",
                   help="CPU engine: hw (KVM), bt (binary translation), hybrid (kernel code in bt, user code "
                        "under KVM) or auto (the default: chosen for "
                        "this host and guest, the choice and its reason printed; see pyvmm/autoselect.py)")
    p.add_argument("--no-reboot", "-no-reboot", action="store_true", help="exit when the guest resets instead of rebooting it")
    p.add_argument("--cpuid-hide", default="", metavar="FEATURES", help="comma-separated CPUID features to hide, e.g. cx16,xsave")
    p.add_argument("--debug-exit", nargs="?", const="iobase=0xf4,iosize=4", metavar="iobase=N,iosize=N",
                   help="add QEMU's isa-debug-exit device (writing v exits with (v<<1)|1)")
    p.add_argument("--serial", "-serial", action="append", metavar="stdio|null|file:PATH",
                   help="the next 16550 UART, COM1..COM4 in order (repeatable; default: COM1 on the console)")
    p.add_argument("--fw-cfg", action="append", default=[], metavar="name=NAME,file=PATH", help="add a named fw_cfg file")
    p.add_argument("--no-guest-fit", action="store_true",
                   help="hw on hosts that emulate guest kernel mode: do not hide the CPU features "
                        "the host cannot emulate from a Linux guest (see engines/kvm/hostfit.py)")
    p.add_argument("--no-completion", action="store_true",
                   help="hw: end the VM on an instruction KVM cannot emulate instead of completing it")
    p.add_argument("--no-host-decompress", action="store_true",
                   help="let a bzImage decompress itself in the guest instead of on the host")
    p.add_argument("--mmu", choices=["shadow", "nested"], default="shadow",
                   help="bt: shadow page tables (default) or a walk on every TLB miss (nested-paging cost model)")
    p.add_argument("--deterministic", action="store_true",
                   help="bt: guest time from instructions retired instead of the host clock (reproducible runs)")
    p.add_argument("--cpu-model", default="v3", metavar="baseline|v2|v3|host",
                   help="bt/hybrid: the x86-64 level the virtual CPU offers (default v3; host: the host's "
                        "features that pyvmm implements)")
    p.add_argument("--no-paravirt", action="store_true",
                   help="hide pyvmm's paravirtual interface (CPUID signature, hypercall page; docs/paravirt.md)")
    p.add_argument("--vmware-backdoor", action="store_true",
                   help="add the VMware backdoor port 0x5658 (GETVERSION, GETHZ, GETTIME, GuestRPC for "
                        "vmware-rpctool; docs/vmware-backdoor.md)")
    p.add_argument("--guestinfo", action="append", default=[], metavar="KEY=VALUE",
                   help="a guestinfo.KEY value for GuestRPC info-get (repeatable; needs --vmware-backdoor)")
    p.add_argument("--no-kvmclock", action="store_true",
                   help="bt: hide KVM's paravirtual interface (signature, kvmclock, PV EOI, steal time)")
    p.add_argument("--bt-cache", metavar="DIR",
                   help="bt: keep translated blocks in DIR between runs (default: $PYVMM_BT_CACHE, "
                        "else ~/.cache/pyvmm/bt; see engines/bt/blockstore.py)")
    p.add_argument("--no-bt-cache", action="store_true",
                   help="bt: translate every block afresh, keeping nothing on disk")
    p.add_argument("--bt-cache-max", metavar="SIZE",
                   help="bt: cap of the block store, least recently used blocks evicted past it "
                        "(default: $PYVMM_BT_CACHE_MAX, else 1G; `pyvmm cache` shows it)")
    p.add_argument("--drive", "-drive", action="append", default=[],
                   metavar="file=PATH[,format=raw|qcow2|vmdk][,readonly=on][,id=NAME]"
                           "[,cache=writeback|writethrough|none|directsync|unsafe][,if=none]",
                   help="add a virtio-blk disk on PCI (repeatable)")
    p.add_argument("--net", action="append", default=[], metavar="tap=IFNAME|switch=NAME[,mac=MAC][,id=NAME]",
                   help="add a virtio-net NIC on PCI on a host TAP device (created when missing) or on "
                        "pyvmm switch NAME (started when not running) (repeatable)")
    p.add_argument("-netdev", dest="netdev", action="append", default=[],
                   metavar="tap,id=N,ifname=IF|stream,id=N,addr.type=unix,addr.path=P",
                   help="QEMU spelling of a TAP or stream-client backend, for -device virtio-net-pci,netdev=N[,mac=MAC]")
    p.add_argument("-device", dest="qemu_device", action="append", default=[],
                   metavar="virtio-net-pci,netdev=N | virtio-blk-pci,drive=ID",
                   help="QEMU spelling of a NIC on a -netdev, or of a disk on a -drive ...,if=none,id=ID")
    p.add_argument("--virtio-rng", action="store_true", help="add a virtio-rng device (host entropy) on PCI")
    p.add_argument("--transport", choices=("pci", "mmio"), default="pci",
                   help="attach the virtio devices on PCI (default) or as virtio-mmio pages announced "
                        "on the kernel command line (virtio_mmio.device=, needs VIRTIO_MMIO_CMDLINE_DEVICES)")
    p.add_argument("-chardev", dest="chardev", action="append", default=[],
                   metavar="socket,id=C,path=P,server=on[,wait=off] | stdio,id=C",
                   help="QEMU spelling of a virtio-console port's backend, for -device virtconsole,chardev=C "
                        "or -device virtserialport,chardev=C,name=N")
    p.add_argument("--virtio-console", action="append", default=[], metavar="stdio|null|socket=PATH[,name=NAME]",
                   help="add a port to a virtio-console on PCI (repeatable): without name= the console "
                        "hvc0 (stdio: keyboard input goes to it instead of COM1), with one a named port")
    p.add_argument("--qmp", "-qmp", action="append", default=[],
                   metavar="unix:PATH,server[,wait=off] | tcp:HOST:PORT,server[,wait=off]",
                   help="serve the QEMU Machine Protocol there (repeatable); with wait=on, QEMU's default, "
                        "the guest starts once a client has connected")
    p.add_argument("--loadvm", "-loadvm", metavar="TAG",
                   help="start from the internal snapshot TAG of the qcow2 drives (made by savevm or snapshot-save)")
    p.add_argument("--restore", metavar="FILE",
                   help="start from snapshot file FILE (QMP x-snapshot-file-save; the VM options must describe the "
                        "same machine, --engine may differ); guest RAM is mapped from the file as it is touched")
    p.add_argument("--incoming", "-incoming", metavar="tcp:HOST:PORT|unix:PATH|defer",
                   help="wait there for a live migration from another pyvmm (started with the same "
                        "options), load it, and run the guest from where the source stopped; defer: "
                        "wait (status inmigrate) for QMP migrate-incoming to say where")
    p.add_argument("--ft", choices=["primary", "backup"],
                   help="fault tolerance (bt): run as the primary, which logs its inputs, or as the "
                        "backup, which replays them and goes live when the primary dies")
    p.add_argument("--ft-channel", metavar="tcp:HOST:PORT|unix:PATH",
                   help="the FT logging channel: the backup listens there, the primary connects")
    p.add_argument("--ft-lock", metavar="PATH",
                   help="the FT lock file on shared storage (default: next to the first disk image, "
                        "else next to the channel's socket)")
    p.add_argument("--ft-seed", action="store_true",
                   help="with --ft backup: protect a VM that runs live without a backup (after a "
                        "failover); it dials --ft-channel, sends its state and becomes the primary")
    p.add_argument("--config", metavar="FILE",
                   help="boot the VM a JSON file describes (as written by --print-config); "
                        "it replaces the other VM options")
    p.add_argument("--print-config", action="store_true",
                   help="write the VM's JSON description for the options given, and exit without booting")
    p.add_argument("--stats", action="store_true", help="print counters (exits, I/O by device) at the end")
    p.add_argument("--stats-json", metavar="FILE", help="write the counters as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="say what is loaded where and which boot protocol")


def _block_store(args: argparse.Namespace) -> str | None:
    """The bt block store directory the options ask for (None: off)."""
    if getattr(args, "no_bt_cache", False) or os.environ.get("PYVMM_BT_CACHE", "") in ("0", "off"):
        return None
    if getattr(args, "bt_cache_max", None):    # the store reads its cap from there (blockstore.py)
        from ..engines.bt.blockstore import MAX_ENV, parse_size
        parse_size(args.bt_cache_max)
        os.environ[MAX_ENV] = args.bt_cache_max
    if getattr(args, "bt_cache", None):
        return args.bt_cache
    from ..engines.bt.blockstore import default_dir
    return str(default_dir())


# `pyvmm run` options that are not part of the VM a --config file describes.
# --qmp sockets may be given beside --config (they add to the file's).
_NOT_VM_OPTIONS = {"command", "log", "config", "print_config", "stats", "stats_json", "verbose", "qmp", "loadvm",
                   "incoming", "restore", "ft", "ft_channel", "ft_lock", "ft_seed"}


def _config_file(args: argparse.Namespace) -> VmConfig:
    """The VmConfig of --config. Raises ConfigError when VM options are given beside it."""
    defaults = vars(build_parser().parse_args(["run"]))
    given = sorted(k for k, v in vars(args).items() if k not in _NOT_VM_OPTIONS and defaults.get(k) != v)
    if given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"--config describes the whole VM: drop {names} (or put them in the file)")
    cfg = VmConfig.load(args.config)
    cfg.verbose = cfg.verbose or args.verbose
    cfg.qmp = [*cfg.qmp, *getattr(args, "qmp", [])]
    cfg.loadvm = getattr(args, "loadvm", None) or cfg.loadvm
    cfg.validate()
    for path in [p for p in [cfg.kernel, *cfg.initrd] if p]:
        if not os.path.exists(path):
            raise ConfigError(f"{args.config}: {path}: no such file")
    return cfg


def config_from_args(args: argparse.Namespace) -> VmConfig:
    """Turns `pyvmm run` options into a VmConfig. Raises ConfigError."""
    if getattr(args, "config", None):
        return _config_file(args)
    # As QEMU: disks and no kernel boot through the BIOS, from the disk.
    bios = args.bios or (DEFAULT_BIOS if getattr(args, "drive", None) and not args.kernel else None)
    kernel = args.kernel or (None if bios else default_kernel())
    engine = args.engine
    if engine == "auto":
        from ..autoselect import choose
        decision = choose(kernel)
        print(decision.line(), file=sys.stderr)
        engine = decision.engine
    initrd = [s for s in (args.initrd or "").split(",") if s]
    if not args.kernel and not initrd and not bios:
        from ..guest.initramfs import ensure_default_initramfs
        # virtio devices: the stock kernel has their drivers as modules, which the initramfs then carries
        release = (os.path.basename(kernel).partition("vmlinuz-")[2] or None
                   if getattr(args, "drive", None) or getattr(args, "virtio_rng", False)
                   or getattr(args, "virtio_console", None) or getattr(args, "chardev", None)
                   or getattr(args, "net", None) or getattr(args, "qemu_device", None) else None)
        if release and not os.path.isdir(f"/lib/modules/{release}"):
            release = None      # a kernel with its drivers built in (or none at all)
        initrd = [str(ensure_default_initramfs(release=release))]
    cfg = VmConfig(kernel=kernel, initrd=initrd, bios=bios,
                   cmdline=args.append if args.append is not None else ("" if kernel is None else DEFAULT_CMDLINE),
                   mem_mib=parse_mem_size(args.mem), cpus=args.cpus, engine=engine,
                   no_reboot=args.no_reboot,
                   cpuid_hide=[s for s in args.cpuid_hide.split(",") if s],
                   debug_exit=parse_debug_exit(args.debug_exit) if args.debug_exit else None,
                   fw_cfg_files=[parse_fw_cfg(t) for t in args.fw_cfg],
                   serials=args.serial or ["stdio"],
                   host_decompress=not args.no_host_decompress, mmu=args.mmu,
                   deterministic=args.deterministic, verbose=args.verbose,
                   cpu_model=getattr(args, "cpu_model", "v3"),
                   fit_guest_to_host=not args.no_guest_fit,
                   complete_instructions=not args.no_completion,
                   paravirt=not getattr(args, "no_paravirt", False),
                   kvmclock=not getattr(args, "no_kvmclock", False),
                   vmware_backdoor=getattr(args, "vmware_backdoor", False),
                   guestinfo=_guestinfo(getattr(args, "guestinfo", []), getattr(args, "vmware_backdoor", False)),
                   block_store=_block_store(args),
                   drives=parse_qemu_drives(getattr(args, "drive", []), getattr(args, "qemu_device", [])),
                   ide_drives=parse_ide_drives(getattr(args, "drive", [])),
                   nets=[parse_net(t) for t in getattr(args, "net", [])]
                   + parse_qemu_nets(getattr(args, "netdev", []), getattr(args, "qemu_device", [])),
                   virtio_rng=getattr(args, "virtio_rng", False),
                   virtio_console=list(getattr(args, "virtio_console", []))
                   + parse_qemu_console(getattr(args, "chardev", []), getattr(args, "qemu_device", [])),
                   virtio_transport=getattr(args, "transport", "pci"),
                   qmp=list(getattr(args, "qmp", [])),
                   loadvm=getattr(args, "loadvm", None))
    for path in [p for p in [cfg.kernel, *cfg.initrd] if p]:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such file")
    if bios:
        from ..boot.firmware import read_bios
        read_bios(bios)   # a missing or corrupt image: one line now, not at boot
    cfg.validate()
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from ..console import Console
    from ..runner import run_vm, write_stats_json
    cfg = config_from_args(args)
    if args.print_config:
        sys.stdout.write(cfg.to_json())
        return 0
    # The translator makes millions of short-lived objects and few cycles:
    # Python's default young-generation threshold (700) ran ~640 collections
    # in a fitted-kernel boot under bt (0.4 s of host time); this runs 3.
    gc.set_threshold(100_000, 20, 100)

    if getattr(args, "ft", None):
        from ..ft.session import run_ft
        return run_ft(args, cfg)
    if getattr(args, "ft_seed", False):
        raise ConfigError("--ft-seed is for a new backup (--ft backup): the live VM seeds it")
    incoming = [getattr(args, "incoming", None)]
    restore = [getattr(args, "restore", None)]
    deferred = incoming[0] == "defer"
    listen_at = None if deferred else incoming[0]
    if deferred and not cfg.qmp:
        raise ConfigError("--incoming defer needs a --qmp socket (migrate-incoming says where to listen)")
    if cfg.qmp:
        # Not received in announce(): serve() receives once QMP answers, so
        # that it says "inmigrate" while the destination waits, as QEMU's does.
        incoming[0] = None

    def announce(machine) -> None:
        if cfg.verbose:
            print(f"pyvmm: boot protocol: {machine.boot_protocol}; engine: {cfg.engine}; "
                  f"{cfg.cpus} vCPU, {cfg.mem_mib} MiB", file=sys.stderr)
        if incoming and incoming[0]:    # --incoming: the first machine takes the migrated state
            from ..migration.announce import announce_in_background
            from ..migration.receiver import receive
            receive(machine, incoming.pop())
            announce_in_background(machine)
        if restore and restore[0]:      # --restore: the first machine takes the file's state
            from ..snapshot.file import load_file
            from ..migration.announce import announce_in_background
            took = load_file(machine, restore.pop())
            # The NIC is on a new port (the saved VM may have died): tell
            # the switch where its MAC is now, as after a migration.
            announce_in_background(machine)
            if cfg.verbose:
                print(f"pyvmm: restored in {took * 1e3:.1f} ms", file=sys.stderr)

    serving = [bool(getattr(args, "incoming", None))]

    def serve(machine, target) -> None:
        if not serving or not serving[0] or target is None:
            return
        serving.pop()
        from ..migration.incoming import IncomingMigration
        job = target.incoming = IncomingMigration(target.emit)
        if deferred:
            print("pyvmm: waiting for migrate-incoming on the QMP socket", file=sys.stderr, flush=True)
        else:                           # --incoming URI: as QEMU, it exits on error
            job.start(listen_at)
            target.migration = job      # query-migrate reports the destination's side
        if job.run(machine):
            from ..api.hotplug import bind_ejects
            from ..migration.announce import announce_in_background
            with target.lock:
                bind_ejects(target)     # name the backends of devices the stream plugged back
            announce_in_background(machine)

    result = run_vm(cfg, Console(), on_machine=announce, on_serving=serve)
    if args.engine != cfg.engine:
        result.stats["mode"] = f"{args.engine}->{cfg.engine}"
    if args.stats:
        print(json.dumps(result.stats, indent=2), file=sys.stderr)
    code = exit_code(result.status)
    if args.stats_json:
        write_stats_json(args.stats_json, result, cfg, code)
    if cfg.verbose:
        print(f"pyvmm: guest stopped: {result.status.reason.value} {result.status.detail}", file=sys.stderr)
    return code


def cmd_guest_build(args: argparse.Namespace) -> int:
    if args.guest_command == "disk":
        from .guest_disk import cmd_guest_disk
        return cmd_guest_disk(args)
    from ..guest.initramfs import write_default_initramfs
    path = write_default_initramfs(args.output)
    print(f"pyvmm: default initramfs written to {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import main as report_main
    print(report_main(args.reports, args.png))
    if args.png:
        print(f"pyvmm: chart written to {args.png}", file=sys.stderr)
    return 0


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="compare --stats-json reports side by side",
                       description="Print a side-by-side table of the costs in several `pyvmm run --stats-json` "
                                   "reports (e.g. the same workload under bt, hw and auto) and draw a chart.")
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("--png", metavar="FILE", help="write a PNG chart (needs matplotlib)")


def cmd_bench(argv: list[str]) -> int:
    """`pyvmm bench paper [options]`: its own parser (pyvmm/guest/guestos.py paper_main)."""
    from ..guest.guestos import paper_main
    return paper_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvmm", description="A multi-mode x86 virtual machine monitor in Python.")
    parser.add_argument("--log", default="warning", choices=["debug", "info", "warning", "error"], help="log level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_report_parser(sub)
    guest = sub.add_parser("guest", help="default guest images").add_subparsers(dest="guest_command", required=True)
    gb = guest.add_parser("build", help="write the default busybox initramfs")
    gb.add_argument("--output", help="where to write it (default: the pyvmm cache directory)")
    from .guest_disk import add_guest_disk_parser
    add_guest_disk_parser(guest)
    from ..kernel.cli import add_kernel_parser
    from .cache import add_cache_parser
    add_cache_parser(sub)
    add_kernel_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bench.add_parser("paper", help="guestos nano-benchmarks under bt, bt+pv, hw, hw+pv, QEMU (bench/paper.py)")
    sub.add_parser("img", help="disk images: create, info, convert, check, compare, map, resize, snapshot, commit")
    sub.add_parser("switch", help="virtual switch: run NAME, status NAME")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "paper"]:
        return cmd_bench(argv[2:])
    if argv[:1] == ["img"]:  # its own parser, qemu-img's spellings (pyvmm/cli/img.py)
        from .img import main as img_main
        return img_main(argv[1:])
    if argv[:1] == ["migrate"]:  # its own parser (pyvmm/migration/cli.py)
        from ..migration.cli import main as migrate_main
        return migrate_main(argv[1:])
    if argv[:1] == ["switch"]:  # its own parser (pyvmm/cli/switch.py)
        from .switch import main as switch_main
        return switch_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    logging.basicConfig(level=getattr(logging, args.log.upper()), format="pyvmm: %(name)s: %(message)s")
    from ..kernel.cli import cmd_kernel
    from .cache import cmd_cache
    handlers = {"cache": cmd_cache, "run": cmd_run, "guest": cmd_guest_build, "kernel": cmd_kernel, "report": cmd_report}
    try:
        return handlers[args.command](args)
    except GuestCrash as e:
        print(f"pyvmm: guest crash: {e}", file=sys.stderr)
        return EXIT_GUEST_CRASH
    except VmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # host trouble not wrapped deeper down: still one line
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
