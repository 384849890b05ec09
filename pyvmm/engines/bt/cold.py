"""The cold path: runs a block without compiling it (Translator.hot_after).

Most blocks of a boot run only a few times, and compiling each one's
generated Python costs more than running it.  A cold block is a list
of per-instruction functions, each the translator's own single-instruction
translation (the same emitters, so the same semantics), run in trace order
by a small loop; after `hot_after` runs the block is translated whole.

Single-instruction translations are cheap to make because they are built
from shared templates: the source with every number literal replaced by a
placeholder constant is compiled once per distinct shape ("mov r64,
[r64+disp8]" at any address is one template) and each instruction gets a
copy of that code object with its own literals put in the placeholders'
places in co_consts (no per-call cost: they are plain constants).

Most instructions also skip generating their source: the same bytes in
the same mode generate the same template wherever they sit, with literals
that are either constants or the address plus a constant (next ip, branch
targets, RIP-relative addresses).  After two sightings at different
addresses have shown which literals move with the address (and that they
move by exactly the distance), further copies are made by relocating the
first one's literals, without running the emitters.

Measured (translator.HOT_AFTER): cheaper than compiling per block, not yet
cheap enough to pay for the blocks that get hot and are compiled as well,
so the engine compiles at once by default."""

from __future__ import annotations

import logging
import re
import types

log = logging.getLogger(__name__)

# Decimal and hex integer literals standing alone (not inside identifiers
# such as r10 or P64).
_NUM = re.compile(r"\b(0[xX][0-9a-fA-F]+|[0-9]+)\b")
# Sources where a bare-literal substitution could change meaning: string
# literals (digits inside them, checked apart) and floats (1.5 -> K0.K1).
_FLOAT = re.compile(r"\.[0-9]")

_CODES: dict[str, object] = {}     # source with literals cut out -> _Template (False: none)
# (instruction bytes, mode) -> [_Template, ip, literals, which literals move with ip
# (None: not learnt yet, False: not relocatable)]
_BY_BYTES: dict[tuple, list] = {}
_NEAR = 1 << 31     # a literal that moves with ip lies within this of it
stats = {"templates": 0, "instances": 0, "untemplated": 0, "relocated": 0}


def _code_of(src: str, ns: dict) -> types.CodeType:
    scratch = dict(ns)
    exec(compile(src, "<bt>", "exec"), scratch)
    return scratch["blk"].__code__


class _Template:
    """The code of one source shape with its literals as placeholder string
    constants '#Ki', and where in co_consts each placeholder sits."""
    __slots__ = ("code", "consts", "fill")

    def __init__(self, code: types.CodeType, fill: list):
        self.code, self.consts, self.fill = code, code.co_consts, fill

    def make(self, vals: tuple) -> types.CodeType:
        consts = list(self.consts)
        for pos, recipe in self.fill:
            consts[pos] = _put(recipe, vals)
        return self.code.replace(co_consts=tuple(consts))


def _put(recipe, vals: tuple):
    if type(recipe) is int:
        return vals[recipe]
    return tuple(_put(r, vals) if r is not None else c for r, c in recipe)


def _recipe(const, seen: set):
    """None for a constant without placeholders, the placeholder's index,
    or ((recipe or None, const), ...) for a tuple; raises ValueError for a
    constant the compiler made from placeholders (folded strings)."""
    if type(const) is str:
        if const.startswith("#K") and const[2:].isdigit():
            seen.add(int(const[2:]))
            return int(const[2:])
        raise ValueError(const)
    if type(const) is tuple:
        parts = [(_recipe(x, seen), x) for x in const]
        return tuple(parts) if any(r is not None for r, _ in parts) else None
    if isinstance(const, (frozenset, types.CodeType)):
        raise ValueError("nested constant")
    return None


# A placeholder where the compiler would fold or drop code for a constant.
_FOLDS = re.compile(r"(\bnot|\bif|\bwhile|\band|\bor|\belse)[\s(]*'#K")


def _compile_template(texts: list, ns: dict) -> _Template | None:
    n = len(texts) - 1
    body = [texts[0]]
    for i in range(n):
        body.append(f"'#K{i}'")
        body.append(texts[i + 1])
    tsrc = "".join(body)
    if _FOLDS.search(tsrc):
        return None
    code = _code_of(tsrc, ns)
    seen: set = set()
    fill = []
    try:
        for pos, const in enumerate(code.co_consts):
            r = _recipe(const, seen)
            if r is not None:
                fill.append((pos, r))
    except ValueError:
        return None
    if len(seen) != n:
        return None
    return _Template(code, fill)


def step_function(code_bytes: bytes, mode: tuple, ip: int, generate, ns: dict):
    """The function of one instruction (`code_bytes` at `ip` in `mode`);
    generate() returns its single-instruction source when it has to be
    generated (see the module docstring)."""
    key = (code_bytes, mode)
    e = _BY_BYTES.get(key)
    if e is not None and e[3]:
        t, ip0, vals0, moves = e
        d = ip - ip0
        top = 0xFFFFFFFFFFFFFFFF if mode[0] == 64 else 0xFFFFFFFF
        vals = tuple(v + d if m else v for v, m in zip(vals0, moves))
        if all(0 <= v <= top for v, m in zip(vals, moves) if m):
            stats["relocated"] += 1
            stats["instances"] += 1
            return types.FunctionType(t.make(vals), ns, "blk")
    code, vals, t = _template(generate(), ns)
    if t is None or mode[0] == 16:
        pass
    elif e is None:
        _BY_BYTES[key] = [t, ip, vals, None]
    elif e[3] is None and e[1] != ip:
        e[3] = _moves(e, t, ip, vals)
    return types.FunctionType(code, ns, "blk")


def _moves(e: list, t, ip: int, vals: tuple):
    """Which literals of the first sighting e move with the address, from
    a second sighting at ip (False: they do not all behave)."""
    t0, ip0, vals0, _ = e
    if t is not t0 or len(vals) != len(vals0):
        return False
    d = ip - ip0
    moves = []
    for a, b in zip(vals0, vals):
        if a == b:
            moves.append(False)
        elif b - a == d and abs(a - ip0) < _NEAR:
            moves.append(True)
        else:
            return False
    return tuple(moves)


def _template(src: str, ns: dict) -> tuple:
    """(code, literal values, template) of a source through the template
    cache; values and template are None for a source compiled whole
    (string or float literals, or a shape whose placeholders the compiler
    would fold)."""
    stats["instances"] += 1
    if "'" in src or '"' in src or _FLOAT.search(src):
        return _whole(src, ns), None, None
    parts = _NUM.split(src)
    texts = parts[0::2]
    key = "\0".join(texts)
    t = _CODES.get(key)
    if t is None:
        stats["templates"] += 1
        t = _CODES[key] = _compile_template(texts, ns) or False
    if t is False:
        return _whole(src, ns), None, None
    vals = tuple([int(v, 0) for v in parts[1::2]])
    return t.make(vals), vals, t


def _whole(src: str, ns: dict) -> types.CodeType:
    stats["untemplated"] += 1
    return _code_of(src, ns)


def cold_block(steps: list, start_la: int, hot_after: int, promote):
    """The runner of a cold block.

    steps: (function, rip expected after it or None to stop) in trace
    order.  The loop leaves after a step that went elsewhere (a taken
    branch, a fault raised through), asked the dispatcher for attention
    (pending) or changed what translations depend on (the vCPU's block
    lookup cache was cleared or swapped: mode, address space, code writes).  After
    `hot_after` runs, promote(runner) returns the compiled block, which
    runs from then on."""
    left = hot_after

    def run(c) -> None:
        nonlocal left
        if left <= 0:
            promote(run)(c)
            return
        left -= 1
        jmp = c.jmp
        for f, nxt in steps:
            f(c)
            if c.rip != nxt or c.pending or jmp is not c.jmp or not jmp:
                return
    run.cold = True
    return run
