"""guestos: the small paravirtualisation-aware guest OS in guestos/ (C and
assembly), built with the host's gcc and ld, and run under pyvmm or QEMU.

    from pyvmm.guest.guestos import build, run_pyvmm, run_qemu, parse
    image = build()                           # cached by a hash of the sources
    out = run_pyvmm(image, "bt", paravirt=True, cmdline="bench=0")
    result = parse(out.stdout)                # self-test lines, bench numbers

The image is a flat Multiboot (a.out kludge) kernel: pyvmm's Multiboot
loader and QEMU's -kernel both load it.  It prints over COM1 and exits
through isa-debug-exit (native) or the shutdown hypercall (pyvmm) with
status 0x10 on success (exit code 33), 0x11 on a panic (35).
docs/guestos.md describes the guest."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ImageError

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "guestos"
SOURCES_C = ("main.c", "console.c", "cpu.c", "kbench.c", "mm.c", "proc.c", "pvops.c", "user.c")
SOURCES_S = ("boot.S", "entry.S")
LD_SCRIPT = "guestos.ld"
CFLAGS = ["-m64", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone", "-mgeneral-regs-only",
          "-fno-stack-protector", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
          "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-nostdlib", "-Wall", "-Werror",
          "-Wno-builtin-declaration-mismatch"]
EXIT_OK = (0x10 << 1) | 1          # status 0x10 through isa-debug-exit or the shutdown hypercall
EXIT_PANIC = (0x11 << 1) | 1
BENCHES = ("syscall", "in", "cr8wr", "call_ret", "pgfault", "divzero", "ptemod", "forkwait")


def missing_tools() -> list[str]:
    """The host programs a build needs that are not on PATH."""
    return [t for t in ("gcc", "ld", "objcopy") if shutil.which(t) is None]


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/pyvmm/guestos (XDG_CACHE_HOME defaults to ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "pyvmm" / "guestos"


def source_hash(src: Path = SOURCE_DIR) -> str:
    """A hash of every source, the linker script and the flags."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for name in sorted(SOURCES_C + SOURCES_S + (LD_SCRIPT, "kernel.h")):
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"guestos build: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


def build(outdir: Path | None = None, src: Path = SOURCE_DIR) -> Path:
    """Compiles and links guestos; returns the flat image (guestos.bin).
    Reuses a cached image of the same sources.  Raises ConfigError when
    gcc/ld/objcopy are missing, ImageError when a step fails."""
    missing = missing_tools()
    if missing:
        raise ConfigError(f"guestos build needs {', '.join(missing)} on PATH")
    out = Path(outdir) if outdir is not None else cache_dir() / source_hash(src)
    image = out / "guestos.bin"
    if image.exists():
        return image
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        objs = []
        for name in SOURCES_C + SOURCES_S:
            obj = work / (Path(name).stem + ".o")
            _run(["gcc", *CFLAGS, "-c", str(src / name), "-o", str(obj)], work)
            objs.append(str(obj))
        elf = work / "guestos.elf"
        _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-z", "max-page-size=4096", "-T", str(src / LD_SCRIPT),
              "-o", str(elf), *objs], work)
        _run(["objcopy", "-O", "binary", str(elf), str(work / "guestos.bin")], work)
        shutil.copy(elf, out / "guestos.elf")
        os.replace(work / "guestos.bin", image)
    log.debug("guestos built: %s", image)
    return image


def cmdline(iters: int | None = None, forks: int | None = None, bench: bool = True) -> str:
    """The guest's command line: iters=N (nano benchmarks), forks=N, bench=0|1."""
    parts = [f"bench={int(bench)}"]
    if iters is not None:
        parts.append(f"iters={iters}")
    if forks is not None:
        parts.append(f"forks={forks}")
    return " ".join(parts)


def pyvmm_command(image: Path, engine: str, paravirt: bool, append: str, mem: str = "128M") -> list[str]:
    """`python -m pyvmm run` for guestos on `engine` with or without pyvmm's interface."""
    cmd = [sys.executable, "-m", "pyvmm", "run", "--engine", engine, "--kernel", str(image), "--mem", mem,
           "--append", append, "--debug-exit", "iobase=0xf4,iosize=4", "--no-reboot"]
    return cmd + ([] if paravirt else ["--no-paravirt"])


def qemu_command(image: Path, append: str, mem: str = "128M", accel: str = "tcg") -> list[str]:
    """qemu-system-x86_64 running guestos as on bare metal (no pyvmm signature).
    Raises ConfigError when QEMU is not installed."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise ConfigError("qemu-system-x86_64 is not installed")
    return [qemu, "-accel", accel, "-m", mem, "-kernel", str(image), "-append", append, "-nographic",
            "-no-reboot", "-monitor", "none", "-serial", "stdio", "-nodefaults",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs one boot; stdout/stderr decoded (latin-1).  Raises
    subprocess.TimeoutExpired when it takes longer than `timeout`."""
    repo = SOURCE_DIR.parent
    return subprocess.run(cmd, cwd=repo, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          text=True, encoding="latin-1")


@dataclass
class GuestResult:
    """What one boot printed: the mode, the self-test block, benchmarks."""
    paravirt: str = ""
    selftest: list[str] = field(default_factory=list)
    ok: bool = False
    tsc_khz: int = 0
    bench: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (ops, cycles)
    done: bool = False
    hypercalls: dict[str, int] = field(default_factory=dict)   # made by the guest (PV only)

    def per_op(self, name: str) -> float:
        ops, cycles = self.bench[name]
        return cycles / ops if ops else 0.0

    def ns_per_op(self, name: str) -> float:
        """Cycles per operation in ns, by the guest's own TSC calibration."""
        return self.per_op(name) * 1e6 / self.tsc_khz if self.tsc_khz else 0.0


_BENCH = re.compile(r"^bench (\w+) ops=(\d+) cycles=(\d+) per_op=\d+$")


def parse(text: str) -> GuestResult:
    """Reads guestos's console output."""
    r = GuestResult()
    for line in text.replace("\r", "").splitlines():
        if "guestos: boot " in line:           # QEMU: SeaBIOS leaves no newline before it
            line = line[line.index("guestos: boot "):]
        if line.startswith("guestos: boot "):
            r.paravirt = line.rsplit("paravirt=", 1)[-1]
        elif line.startswith("guestos: tsc_khz="):
            r.tsc_khz = int(line.split("=", 1)[1])
        elif line.startswith("guestos: hypercalls"):
            r.hypercalls = {k: int(v) for k, _, v in (w.partition("=") for w in line.split()[2:])}
        elif line.startswith(("selftest: ", "guestos: pid ")):
            r.selftest.append(line)
            if line == "selftest: result ok":
                r.ok = True
        elif line == "guestos: done":
            r.done = True
        else:
            m = _BENCH.match(line)
            if m:
                r.bench[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return r


# ------------------------------------------------------------ the paper table
@dataclass
class Column:
    """One configuration of the paper benchmark: how to boot it and its N."""
    name: str
    engine: str             # "bt", "hw" or "qemu"
    paravirt: bool
    iters: int
    forks: int


def paper_columns(iters_bt: int = 5000, forks_bt: int = 300, iters_hw: int = 5000, forks_hw: int = 300,
                  iters_qemu: int = 100000, forks_qemu: int = 40000) -> list[Column]:
    """bt, bt+pv, hw, hw+pv, qemu (TCG; the bare-metal stand-in)."""
    return [Column("bt", "bt", False, iters_bt, forks_bt), Column("bt+pv", "bt", True, iters_bt, forks_bt),
            Column("hw", "hw", False, iters_hw, forks_hw), Column("hw+pv", "hw", True, iters_hw, forks_hw),
            Column("qemu", "qemu", False, iters_qemu, forks_qemu)]


def tsc_hz(col: Column, res: GuestResult) -> float:
    """The TSC rate behind a column's cycles: bt's RDTSC runs at pyvmm's fixed
    TSC_HZ; hw and QEMU TCG read the host's TSC, which the guest calibrated
    against its timer."""
    if col.engine == "bt":
        from ..devices.platform.clock import TSC_HZ
        return float(TSC_HZ)
    return res.tsc_khz * 1000.0


def run_column(image: Path, col: Column, timeout: float) -> tuple[GuestResult | None, str]:
    """Boots one column; (result, "") or (None, why it has no numbers)."""
    append = cmdline(col.iters, col.forks)
    try:
        if col.engine == "qemu":
            cmd = qemu_command(image, append)
        else:
            if col.engine == "hw" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
                return None, "no /dev/kvm"
            cmd = pyvmm_command(image, col.engine, col.paravirt, append)
        proc = run(cmd, timeout)
    except ConfigError as e:
        return None, str(e)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    res = parse(proc.stdout)
    if proc.returncode != EXIT_OK or not res.ok or len(res.bench) != len(BENCHES):
        tail = (proc.stdout + proc.stderr)[-400:].replace("\n", " | ")
        return None, f"exit {proc.returncode}: {tail}"
    return res, ""


def paper_table(cols: list[Column], results: dict[str, GuestResult]) -> tuple[str, dict[str, float]]:
    """The ns/op table (ratio to the qemu column in brackets) and the RESULT values."""
    ns = {c.name: {b: results[c.name].per_op(b) * 1e9 / tsc_hz(c, results[c.name]) for b in BENCHES}
          for c in cols if c.name in results}
    head = f"{'ns/op':<10}" + "".join(f"{c.name:>22}" for c in cols)
    lines = [head, "-" * len(head)]
    for b in BENCHES:
        cells = []
        for c in cols:
            v = ns.get(c.name, {}).get(b)
            q = ns.get("qemu", {}).get(b)
            num = "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
            cells.append(num + (f" ({v / q:,.1f}x)" if v is not None and q else ""))
        lines.append(f"{b:<10}" + "".join(f"{x:>22}" for x in cells))
    lines.append(f"{'N':<10}" + "".join(f"{f'{c.iters}/{c.forks}':>22}" for c in cols))
    values: dict[str, float] = {}
    for b in BENCHES:
        for a, p in (("bt", "bt+pv"), ("hw", "hw+pv")):
            if a in ns and p in ns and ns[p][b]:
                values[f"{b}_{a}_over_{a}pv"] = ns[a][b] / ns[p][b]
        for c in ("bt", "bt+pv", "hw", "hw+pv"):
            if c in ns and "qemu" in ns and ns["qemu"][b]:
                values[f"{b}_{c.replace('+', '')}_over_qemu"] = ns[c][b] / ns["qemu"][b]
    return "\n".join(lines), values


def paper_main(argv: list[str] | None = None, out=None) -> int:
    """`pyvmm bench paper` and bench/paper.py: boots guestos under bt, bt+pv,
    hw, hw+pv and QEMU TCG, prints the nano-benchmark table and one RESULT
    line.  Returns 0, or 1 when the image cannot be built."""
    import argparse
    out = out or sys.stdout
    ap = argparse.ArgumentParser(prog="pyvmm bench paper", description=paper_main.__doc__)
    ap.add_argument("--iters-bt", type=int, default=5000, help="nano-benchmark iterations under bt (default 5000)")
    ap.add_argument("--forks-bt", type=int, default=300, help="forkwait pairs under bt (default 300)")
    ap.add_argument("--iters-hw", type=int, default=5000, help="iterations under hw (kernel code may be emulated)")
    ap.add_argument("--forks-hw", type=int, default=300)
    ap.add_argument("--iters-qemu", type=int, default=100000, help="iterations under QEMU TCG (default 100000)")
    ap.add_argument("--forks-qemu", type=int, default=40000, help="forkwait pairs under QEMU (the paper's 40000)")
    ap.add_argument("--only", default="", help="comma-separated columns to run (bt,bt+pv,hw,hw+pv,qemu)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per boot")
    args = ap.parse_args(argv)
    try:
        image = build()
    except (ConfigError, ImageError) as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1
    cols = paper_columns(args.iters_bt, args.forks_bt, args.iters_hw, args.forks_hw, args.iters_qemu,
                         args.forks_qemu)
    if args.only:
        keep = set(args.only.split(","))
        cols = [c for c in cols if c.name in keep]
    results: dict[str, GuestResult] = {}
    for col in cols:
        res, why = run_column(image, col, args.timeout)
        if res is None:
            print(f"{col.name}: no numbers ({why})", file=out)
            continue
        results[col.name] = res
        calls = " ".join(f"{k}={v}" for k, v in res.hypercalls.items())
        print(f"{col.name}: paravirt={res.paravirt} tsc_khz={res.tsc_khz} {calls}", file=out)
    table, values = paper_table(cols, results)
    print(table, file=out)
    first = [k for k in ("ptemod_bt_over_btpv", "forkwait_bt_over_btpv", "ptemod_hw_over_hwpv",
                         "forkwait_hw_over_hwpv") if k in values]
    keys = first + [k for k in values if k.endswith(("_btpv", "_hwpv")) and k not in first] \
        + [k for k in values if k.endswith("_over_qemu")]
    parts = [f"{k}={values[k]:.2f}" for k in keys] + [f"columns={','.join(results) or 'none'}"]
    print("RESULT " + " ".join(parts), file=out)
    return 0
