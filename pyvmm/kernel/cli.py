"""`pyvmm kernel config|build`: thin adapters over pyvmm.kernel.

Hooked into pyvmm/cli/main.py by `add_kernel_parser(sub)`; the parsed
arguments carry their handler in `args.kernel_handler`.  Handlers raise
VmmError subclasses, which main() turns into one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import BuildResult, build_kernel, terminal_progress
from .config import generate_config
from .fragment import FITTED, FragmentRequest
from .source import default_build_dir, kernel_version, resolve_source

CONFIG_EPILOG = """The fitted configuration starts from the kernel's tinyconfig and adds only
what pyvmm's machine has: 64-bit SMP, 8250 serial console, i8042, CMOS RTC,
ACPI (pyvmm's tables: power off, MADT), KVM guest/paravirt (kvm-clock), PVH
entry, virtio-mmio (command-line devices) with block/net/console/rng,
initramfs (gzip), ELF and #! binaries, proc/sys/devtmpfs, TTY; LZ4 payload.
Symbols may be given with or without CONFIG_; each option repeats."""


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", metavar="DIR",
                   help="kernel source tree or linux-source tarball (default: Debian's "
                        "/usr/src/linux-source-*.tar.xz, unpacked into ~/.cache/pyvmm/kernel)")
    p.add_argument("--output", "-O", metavar="DIR",
                   help="build directory (default: ~/.cache/pyvmm/kernel/build-<source name>)")


def _add_fragment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable", action="append", default=[], metavar="SYM", help="also build SYM in (=y)")
    p.add_argument("--disable", action="append", default=[], metavar="SYM", help="leave SYM out")
    p.add_argument("--module", action="append", default=[], metavar="SYM",
                   help="build SYM as a module (=m; turns on CONFIG_MODULES)")


def add_kernel_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `kernel config|build` to a `pyvmm` subparsers object."""
    kernel = subparsers.add_parser("kernel", help="configure and build a guest kernel fitted to pyvmm")
    sub = kernel.add_subparsers(dest="kernel_command", required=True)

    pc = sub.add_parser("config", help="write a .config fitted to pyvmm's hardware", epilog=CONFIG_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_options(pc)
    _add_fragment_options(pc)
    pc.add_argument("--list", action="store_true", help="print the symbols the fitted fragment sets and exit")
    pc.set_defaults(kernel_handler=cmd_kernel_config)

    pb = sub.add_parser("build", help="build the fitted bzImage (configures first if needed)",
                        epilog="The build directory is reused: rebuilds are incremental. "
                               "The full make output is kept in <build dir>/build.log. "
                               "The new image is then booted once under --engine bt (about half a "
                               "minute) so that its translated blocks are on disk before its first run.")
    _add_source_options(pb)
    _add_fragment_options(pb)
    pb.add_argument("--jobs", "-j", type=int, metavar="N", help="parallel make jobs (default: CPUs available)")
    pb.add_argument("--no-pretranslate", action="store_true",
                    help="skip the bt boot that fills the block store after the build (pretranslate.py)")
    pb.add_argument("--bt-cache", metavar="DIR",
                    help="block store the pretranslation fills (default: the one `pyvmm run` uses)")
    pb.set_defaults(kernel_handler=cmd_kernel_build)
    return kernel


def _request(args: argparse.Namespace) -> FragmentRequest | None:
    if not (args.enable or args.disable or args.module):
        return None
    return FragmentRequest(enable=list(args.enable), disable=list(args.disable), module=list(args.module))


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    tree = resolve_source(args.source)
    build_dir = Path(args.output).expanduser().resolve() if args.output else default_build_dir(tree)
    return tree, build_dir


def cmd_kernel_config(args: argparse.Namespace) -> int:
    """Raises KernelSourceError, ToolchainError, KernelBuildError, KernelConfigError."""
    if args.list:
        for sym, value in FITTED.items():
            print(f"CONFIG_{sym}={value}")
        return 0
    tree, build_dir = _dirs(args)
    result = generate_config(tree, build_dir, _request(args) or FragmentRequest())
    print(f"pyvmm: kernel {kernel_version(tree) or '?'} config written to {result.config_path} "
          f"({len(result.enabled())} symbols on, all {len(result.requested)} requested ones as asked)")
    return 0


def print_build_result(result: BuildResult, out=None) -> None:
    out = out or sys.stdout
    what = "up to date" if result.compiled == 0 else f"built in {result.seconds:.0f} s ({result.compiled} objects)"
    print(f"pyvmm: kernel {what}: {result.summary()}", file=out)
    print(f"pyvmm: boot it with: pyvmm run --kernel {result.image}", file=out)


def cmd_kernel_build(args: argparse.Namespace) -> int:
    """Raises KernelSourceError, ToolchainError, KernelBuildError, KernelConfigError."""
    tree, build_dir = _dirs(args)
    if args.jobs is not None and args.jobs < 1:
        from ..errors import ConfigError
        raise ConfigError(f"--jobs must be at least 1, not {args.jobs}")
    show = terminal_progress()
    try:
        result = build_kernel(tree, build_dir, args.jobs, show, _request(args))
    finally:
        if sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 79 + "\r")
    print_build_result(result)
    if not args.no_pretranslate:
        from .pretranslate import pretranslate
        print("pyvmm: pretranslating for --engine bt: one boot to the init's marker "
              "(--no-pretranslate skips it)", flush=True)
        print(f"pyvmm: {pretranslate(result.image, args.bt_cache).summary()}")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    """The one handler main() needs: dispatches to config or build."""
    return args.kernel_handler(args)
