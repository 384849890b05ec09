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
from pyvmm.boot import layout
from pyvmm.boot.entry import long_mode_64
from pyvmm.cpu import CR0_MP, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, GPR_NAMES, Segment
from pyvmm.engines.bt import translator as bt_translator
from pyvmm.engines.bt.engine import BtCpu
from pyvmm.engines.bt.faults import GuestFault, SmcRestart
from pyvmm.memory import GuestMemory

# Tests read the generated source of blocks (fn.src).
bt_translator.KEEP_SOURCE = True

CODE_ADDR = 0x200000
DATA_ADDR = 0x300000
DATA_SIZE = 0x1000
STACK_TOP = 0x3FF000
ARITH = 0x8D5
# 16-bit code runs with CS based at the code, DS/ES/SS at the data.
CODE16_BASES = (CODE_ADDR, DATA_ADDR)


@dataclass
class Outcome:
    regs: list[int]
    rflags: int
    data: bytes
    vector: int | None = None   # exception raised, if any
    rip: int = 0
    error_code: int | None = None   # of that exception, where it has one
    cr2: int | None = None          # at a #PF


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
        st.rip = CODE_ADDR - st.cs.base
        cpu = BtCpu(mem, Bus("io"), Bus("mmio"))
        if self.hot_after is not None:
            cpu.translator.hot_after = self.hot_after
        vector = fault = None
        try:
            cpu.load(st)
            if setup is not None:
                setup(cpu)
            end = CODE_ADDR + len(code) - st.cs.base
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
                    fault = f
                    break
                except SmcRestart:   # a store into translated code: the engine reruns it alone
                    cpu.mmu.smc_ok = True
                    try:
                        cpu.translator.lookup(True)(cpu)
                    except GuestFault as f:
                        fault = f
                        break
                    finally:
                        cpu.mmu.smc_ok = False
        finally:
            cpu.detach()
        out = Outcome(list(cpu.R), cpu.rflags, mem.read(DATA_ADDR, len(data)), vector, cpu.rip)
        if fault is not None:
            out.vector, out.error_code, out.cr2 = fault.vector, fault.error_code, fault.cr2
        out.cpu = cpu
        return out


USER_PT = 0x600000
_P, _W, _U = 1, 2, 4


class UserBtOracle(BtOracle):
    """BtOracle laid out as KvmOracle is: CPL3, and 4 KiB user pages over
    2-4 MiB whose flags set_page changes, so page faults compare too."""

    def __init__(self, hot_after: int | None = COMPILED):
        super().__init__(hot_after)
        mem, st = self.mem, self.state
        mem.write_u64(layout.PML4_ADDR, mem.read_u64(layout.PML4_ADDR) | _U)
        mem.write_u64(layout.PDPT_ADDR, mem.read_u64(layout.PDPT_ADDR) | _U)
        mem.write_u64(layout.PD_ADDR + 8, USER_PT | _P | _W | _U)
        self.reset_pages()
        st.cr0 |= CR0_WP | CR0_MP
        st.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT     # as KvmOracle: SSE enabled
        self.set_code_bits(64)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(st, name, Segment(selector=0x1B, limit=0xFFFFFFFF, type=3, dpl=3, db=1, g=1))

    def run(self, code: bytes, regs: list[int], rflags: int, data: bytes, limit: int = 10000,
            setup=None) -> Outcome:
        """BtOracle.run; the hlt after the snippet raises #GP at CPL3, which
        marks the end here."""
        out = super().run(code, regs, rflags, data, limit, setup)
        if out.vector == 13 and out.rip == CODE_ADDR + len(code) - self.state.cs.base:
            out.vector = out.error_code = None
        return out

    def set_page(self, linear: int, flags: int) -> None:
        """Sets the PTE flags of the user page holding `linear` (0 unmaps)."""
        index = (linear - 0x200000) >> 12
        if not 0 <= index < 512:
            raise ValueError(f"{linear:#x} is not in the user 2 MiB at 0x200000")
        self.mem.write_u64(USER_PT + 8 * index, (0x200000 + (index << 12)) | flags)

    def reset_pages(self) -> None:
        """Maps every user page present, writable and user-accessible again."""
        for i in range(512):
            self.mem.write_u64(USER_PT + 8 * i, (0x200000 + (i << 12)) | _P | _W | _U)

    def set_code_bits(self, bits: int) -> None:
        """A 64-bit user code segment, or a 32/16-bit one (compatibility
        mode; 16-bit code with the CODE16_BASES)."""
        cs_base, data_base = CODE16_BASES if bits == 16 else (0, 0)
        st = self.state
        st.cs = Segment(selector={64: 0x23, 32: 0x3B, 16: 0x43}[bits], base=cs_base, limit=0xFFFFFFFF, type=0xB,
                        dpl=3, db=1 if bits == 32 else 0, l=1 if bits == 64 else 0, g=1)
        for name in ("ds", "es", "ss"):
            getattr(st, name).base = data_base


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


def templates(text: str) -> list[tuple[str, str, str]]:
    """A differential test's instruction table: each line is "WIDTHS name
    SPECS; name SPECS; ..."; returns (widths, name, specs) per instruction."""
    out = []
    for line in text.strip().splitlines():
        widths, rest = line.split(" ", 1)
        for item in rest.split(";"):
            name, _, specs = item.strip().partition(" ")
            out.append((widths, name, specs))
    return out
