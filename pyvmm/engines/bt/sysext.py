"""Small integer/system instructions Linux and static glibc use: clac/stac,
endbr, prefetch/clflush hints, ud0/ud1/ud2 (#UD without a warning),
rd/wr fs/gs base, BMI2 shlx/shrx/sarx, movbe, rdpid.

Generated code raises GuestFault: #UD (ud*, clac/stac at CPL > 0,
*fsbase with CR4.FSGSBASE clear), #GP(0) for a non-canonical base."""

from __future__ import annotations

import iced_x86 as X

from . import flags as F
from .faults import GP, UD
from .gen import MASK, Gen

M = X.Mnemonic
CR4_FSGSBASE = 1 << 16


def _nop(g: Gen) -> None:
    pass


def _ud(g: Gen) -> None:
    g.fault()
    g.emit(f"raise GuestFault({UD})")


def _ac(g: Gen) -> None:
    if g.cpl > 0:
        _ud(g)
        return
    g.bind("c")
    if g.ins.mnemonic == M.STAC:
        g.emit(f"c.rf |= {F.AC:#x}")
    else:
        g.emit(f"c.rf &= ~{F.AC:#x}")


def _fsgs(g: Gen) -> None:
    m = g.ins.mnemonic
    seg = 4 if m in (M.RDFSBASE, M.WRFSBASE) else 5
    g.fault()
    g.bind("c")
    g.emit(f"if not c.cr4 & {CR4_FSGSBASE:#x}: raise GuestFault({UD})")
    size = g.size(0)
    if m in (M.RDFSBASE, M.RDGSBASE):
        g.write(0, f"c.sb[{seg}] & {MASK[size]:#x}", size)
    else:
        g.emit(f"t = {g.read(0)}")
        g.emit(f"if not (t < 0x800000000000 or t >= 0xFFFF800000000000): raise GuestFault({GP}, 0)")
        g.emit(f"c.sb[{seg}] = t")


def _bmi2_shift(g: Gen) -> None:
    m = g.ins.mnemonic
    size = g.size(0)
    bits = size * 8
    g.emit(f"x = {g.read(1, size)}; k = {g.read(2, size)} & {bits - 1}")
    if m == M.SHLX:
        g.write(0, f"(x << k) & {MASK[size]:#x}")
    elif m == M.SHRX:
        g.write(0, "x >> k")
    else:
        g.write(0, f"(SX(x, {size}) >> k) & {MASK[size]:#x}")


def _movbe(g: Gen) -> None:
    size = g.size(0) if g.is_reg(0) else g.size(1)
    g.emit(f"t = int.from_bytes({g.read(1, size)}.to_bytes({size}, 'little'), 'big')")
    g.write(0, "t", size)


def _rdpid(g: Gen) -> None:
    g.bind("c")
    g.write(0, "c.msrs.get(0xC0000103, 0) & 0xFFFFFFFF", g.size(0))


PURE = frozenset({M.ENDBR64, M.ENDBR32, M.PREFETCHW, M.PREFETCHT1, M.PREFETCHT2, M.PREFETCHWT1,
                  M.CLFLUSH, M.CLFLUSHOPT, M.CLWB, M.SHLX, M.SHRX, M.SARX, M.MOVBE})
EMITTERS = {m: _nop for m in PURE - {M.SHLX, M.SHRX, M.SARX, M.MOVBE}}
EMITTERS.update({M.UD0: _ud, M.UD1: _ud, M.UD2: _ud, M.CLAC: _ac, M.STAC: _ac,
                 M.RDFSBASE: _fsgs, M.WRFSBASE: _fsgs, M.RDGSBASE: _fsgs, M.WRGSBASE: _fsgs,
                 M.SHLX: _bmi2_shift, M.SHRX: _bmi2_shift, M.SARX: _bmi2_shift, M.MOVBE: _movbe,
                 M.RDPID: _rdpid})
EXPORTS: dict = {}
