"""Differential harness: run a code snippet on an oracle CPU and on the bt
translator from the same state and compare what the architecture defines.

An oracle implements `run(code, regs, rflags, data) -> Outcome`. Unicorn is
the oracle here; a KVM (CPL3, real CPU) oracle plugs in with the same
interface."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass

from pyvmm.bus import Bus
from pyvmm.boot.entry import long_mode_64
from pyvmm.cpu import GPR_NAMES
from pyvmm.engines.bt.engine import BtCpu
from pyvmm.engines.bt.faults import GuestFault
from pyvmm.memory import GuestMemory

CODE_ADDR = 0x200000
DATA_ADDR = 0x300000
DATA_SIZE = 0x1000
STACK_TOP = 0x3FF000
ARITH = 0x8D5


@dataclass
class Outcome:
    regs: list[int]
    rflags: int
    data: bytes
    vector: int | None = None   # exception raised, if any
    rip: int = 0


def needs_unicorn_and_as():
    """Fails the calling test module unless Unicorn (the second oracle) and
    GNU as (the snippets' assembler) are installed, as scripts/setup.sh
    does; returns unicorn."""
    from tests.hostfacts import require_from_setup
    require_from_setup(programs=["as"], modules=["unicorn"], package="binutils; unicorn: pip .[test]")
    import unicorn
    return unicorn


def assemble(src: str, bits: int = 64) -> bytes:
    """Assembles Intel-syntax text with GNU as into flat bytes."""
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/a.s", "w") as f:
            f.write(f".intel_syntax noprefix\n.code{bits}\n{src}\n")
        subprocess.run(["as", "--64" if bits == 64 else "--32", "-o", f"{d}/a.o", f"{d}/a.s"], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", f"{d}/a.o", f"{d}/a.bin"], check=True)
        with open(f"{d}/a.bin", "rb") as f:
            return f.read()


def assemble_many(snippets: list[str]) -> list[bytes]:
    """Assembles many 64-bit snippets in one `as` run."""
    marks = []
    parts = []
    for i, s in enumerate(snippets):
        parts.append(f"s{i}:\n{s}\n")
    parts.append(f"s{len(snippets)}:\n")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/a.s", "w") as f:
            f.write(".intel_syntax noprefix\n.code64\n" + "".join(parts))
        subprocess.run(["as", "--64", "-o", f"{d}/a.o", f"{d}/a.s"], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", f"{d}/a.o", f"{d}/a.bin"], check=True)
        nm = subprocess.run(["nm", f"{d}/a.o"], check=True, capture_output=True, text=True).stdout
        with open(f"{d}/a.bin", "rb") as f:
            blob = f.read()
    addr = {}
    for line in nm.splitlines():
        v, _, name = line.split()
        if name.startswith("s") and name[1:].isdigit():
            addr[int(name[1:])] = int(v, 16)
    return [blob[addr[i]:addr[i + 1]] for i in range(len(snippets))]


# Translator paths a BtOracle can force: every block compiled at once, or
# every block on the cold path (per-instruction template functions) for good.
COMPILED, COLD = 0, 1 << 60


class BtOracle:
    """The system under test, driven like an oracle (64-bit, CPL0, flat).

    hot_after: the translator's cold-path threshold (COMPILED, COLD, or
    None for the engine's default mix)."""

    def __init__(self, hot_after: int | None = COMPILED):
        self.mem = GuestMemory(8 << 20)
        self.state = long_mode_64(self.mem, CODE_ADDR)
        self.hot_after = hot_after

    def run(self, code: bytes, regs: list[int], rflags: int, data: bytes, limit: int = 10000,
            setup=None) -> Outcome:
        """Runs `code` (then hlt) from the given state; `setup(cpu)` may adjust
        the loaded vCPU first (SIMD registers, CR0 bits). The returned
        Outcome also carries `cpu` for callers that read more state."""
        mem = self.mem
        mem.write(CODE_ADDR, code + b"\xf4")
        mem.write(DATA_ADDR, data)
        st = self.state
        st.regs = dict(zip(GPR_NAMES, regs))
        st.rflags = rflags
        st.rip = CODE_ADDR
        cpu = BtCpu(mem, Bus("io"), Bus("mmio"))
        if self.hot_after is not None:
            cpu.translator.hot_after = self.hot_after
        vector = None
        try:
            cpu.load(st)
            if setup is not None:
                setup(cpu)
            end = CODE_ADDR + len(code)
            for _ in range(limit):
                if cpu.rip == end or cpu.halted:
                    break
                try:
                    la = (cpu.sb[1] + cpu.rip) & cpu.ipmask   # the engine's dispatch
                    fn = cpu.jmp.get(la)
                    if fn is None:
                        fn = cpu.jmp[la] = cpu.translator.lookup()
                    fn(cpu)
                except GuestFault as f:
                    vector = f.vector
                    break
        finally:
            cpu.detach()
        out = Outcome(list(cpu.R), cpu.rflags, mem.read(DATA_ADDR, len(data)), vector, cpu.rip)
        out.cpu = cpu
        return out


class UnicornOracle:
    """Unicorn (QEMU TCG) as the reference CPU, 64-bit flat."""

    def __init__(self):
        import unicorn as U
        import unicorn.x86_const as X
        self.U, self.X = U, X
        self.regids = [getattr(X, f"UC_X86_REG_{n.upper()}") for n in GPR_NAMES]

    def run(self, code: bytes, regs: list[int], rflags: int, data: bytes) -> Outcome:
        U, X = self.U, self.X
        uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64)
        uc.mem_map(CODE_ADDR, 0x1000 * (1 + len(code) // 0x1000))
        uc.mem_map(DATA_ADDR, 0x100000)
        uc.mem_write(CODE_ADDR, code)
        uc.mem_write(DATA_ADDR, data)
        for rid, v in zip(self.regids, regs):
            uc.reg_write(rid, v)
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags)
        vec = []

        def on_intr(uc_, intno, _ud):
            vec.append(intno)
            uc_.emu_stop()
        uc.hook_add(U.UC_HOOK_INTR, on_intr)
        try:
            uc.emu_start(CODE_ADDR, CODE_ADDR + len(code), count=10000)
        except U.UcError as e:
            if not vec:
                vec.append(6 if e.errno == U.UC_ERR_INSN_INVALID else -1)
        out = [uc.reg_read(r) for r in self.regids]
        return Outcome(out, uc.reg_read(X.UC_X86_REG_RFLAGS), bytes(uc.mem_read(DATA_ADDR, len(data))),
                       vec[0] if vec else None, uc.reg_read(X.UC_X86_REG_RIP))
