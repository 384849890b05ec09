"""`--cpu-model baseline|v2|v3|host`: the CPUID bits each model gives the
bt virtual CPU (engines/bt/cpumodel.py), its place in the VM config (JSON
too), and the one-line error for an unknown model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyvmm.config import VmConfig
from pyvmm.engines.bt import cpumodel, features
from pyvmm.engines.bt.cpuid import FEATURES, CpuidTable
from pyvmm.engines.bt.sem import EMITTERS
from pyvmm.errors import ConfigError

from .asm import multiboot_kernel
from .guest_session import REPO

# (leaf, register index eax=0, bit) of the x86-64 level features, spelled out
# from the psABI list rather than taken from cpumodel, so the table is checked.
V2_BITS = {"cx16": (1, 2, 13), "lahf_lm": (0x80000001, 2, 0), "popcnt": (1, 2, 23), "pni": (1, 2, 0),
           "sse4_1": (1, 2, 19), "sse4_2": (1, 2, 20), "ssse3": (1, 2, 9)}
V3_BITS = {"avx": (1, 2, 28), "avx2": (7, 1, 5), "bmi1": (7, 1, 3), "bmi2": (7, 1, 8), "f16c": (1, 2, 29),
           "fma": (1, 2, 12), "abm": (0x80000001, 2, 5), "movbe": (1, 2, 22), "xsave": (1, 2, 26)}
BASELINE_BITS = {"sse": (1, 3, 25), "sse2": (1, 3, 26), "cmov": (1, 3, 15), "cx8": (1, 3, 8),
                 "fxsr": (1, 3, 24), "syscall": (0x80000001, 3, 11), "lm": (0x80000001, 3, 29)}
IMPLEMENTED = features.implemented(EMITTERS)


def _bit(table: CpuidTable, where: tuple[int, int, int]) -> bool:
    leaf, reg, bit = where
    return bool(table.lookup(leaf, 0)[reg] >> bit & 1)


@pytest.mark.parametrize("model, levels", [("baseline", ()), ("v2", (V2_BITS,)), ("v3", (V2_BITS, V3_BITS))])
def test_each_level_offers_its_features_as_far_as_implemented(model, levels):
    t = CpuidTable(model=model)
    for name, where in BASELINE_BITS.items():
        assert _bit(t, where), (model, name)
    offered = {k: v for level in levels for k, v in level.items()}
    for name, where in {**V2_BITS, **V3_BITS}.items():
        want = name in offered and name in IMPLEMENTED
        assert _bit(t, where) == want, (model, name)
    assert FEATURES["xsave"] == (1, 2, 26)


def test_v3_is_the_default_and_offers_xsave_with_leaf_0xd():
    assert VmConfig().cpu_model == "v3"
    t = CpuidTable()
    assert t.model == "v3" and _bit(t, V3_BITS["xsave"])
    assert t.lookup(0xD, 0)[0] & 3 == 3
    base = CpuidTable(model="baseline")
    assert base.lookup(0xD, 0) == (0, 0, 0, 0) and not _bit(base, V3_BITS["xsave"])


def test_host_model_is_what_the_host_has_and_bt_implements():
    t = CpuidTable(model="host")
    host = cpumodel.host_features()
    assert {"sse2", "lm"} <= host                         # the real CPUID instruction answered
    for name in features.INSTRUCTIONS:
        if name in FEATURES:
            assert _bit(t, FEATURES[name]) == (name in host and name in IMPLEMENTED), name
    # the host's leaf 1 as the CPU reports it, read by the CPUID instruction itself
    _, _, ecx, edx = cpumodel.host_cpuid(1)
    assert edx >> 26 & 1                                   # sse2: every x86-64 CPU
    assert bool(ecx >> 23 & 1) == ("popcnt" in host)


def test_hidden_features_take_their_dependents():
    t = CpuidTable(hide=["xsave"])
    assert not _bit(t, V3_BITS["xsave"]) and not _bit(t, V3_BITS["avx"]) and t.lookup(0xD, 0) == (0, 0, 0, 0)


def test_config_json_round_trip_and_bad_model():
    for model in ("baseline", "v2", "v3", "host"):
        cfg = VmConfig(kernel="/k", engine="bt", cpu_model=model)
        assert VmConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="unknown cpu model 'v4'"):
        VmConfig.from_dict({"cpu_model": "v4"})
    with pytest.raises(ConfigError):
        CpuidTable(model="pentium")


def _pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], check=False, cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_cli_option():
    kernel = str(multiboot_kernel("1: hlt\n jmp 1b\n"))
    printed = _pyvmm("run", "--kernel", kernel, "--engine", "bt", "--cpu-model", "v2", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["cpu_model"] == "v2"
    bad = _pyvmm("run", "--kernel", kernel, "--engine", "bt", "--cpu-model", "v9", "--print-config")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("pyvmm: error:") and "unknown cpu model 'v9'" in lines[0]


# A Multiboot guest that exits with 2 + CPUID.1:ECX.XSAVE (bit 26) as its
# status (never 1, pyvmm's own error code).
XSAVE_BIT_KERNEL = """
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    shr $26, %ecx
    and $1, %ecx
    add $2, %ecx
    mov %cl, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
"""


@pytest.mark.parametrize("model, xsave", [("baseline", 0), ("v3", 1)])
def test_the_guest_sees_the_model(model, xsave):
    kernel = str(multiboot_kernel(XSAVE_BIT_KERNEL))
    ran = _pyvmm("run", "--kernel", kernel, "--engine", "bt", "--mem", "32M", "--debug-exit", "--no-reboot",
                 "--no-bt-cache", "--cpu-model", model)
    assert ran.returncode == ((2 + xsave) << 1) | 1, ran.stderr
