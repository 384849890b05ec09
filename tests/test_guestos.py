"""guestos (guestos/, docs/guestos.md): one binary, built here with gcc/ld,
boots under pyvmm bt and hw, each with and without pyvmm's paravirtual
interface, and under QEMU TCG as the bare-metal stand-in; its self-test
block (processes, fork/wait, copied address spaces, page faults, #UD/#PF
kills, #DE skipped, timer ticks) is the same everywhere.  Under PV the guest
reports the hypercalls it made, so the pv-ops really took the PV path.
A benchmark smoke run checks that every nano-benchmark reports."""

from __future__ import annotations

import struct

import pytest

from pyvmm.guest import guestos

from .hostfacts import require_from_setup, require_kvm

TIMEOUT = 240
SELFTEST_LINES = [
    "selftest: init pid=1",
    "selftest: fork+wait child status=7",
    "selftest: five children reaped, status sum=15",
    "selftest: separate address spaces, parent sees 1",
    "selftest: grandchild status passed up=4",
    "selftest: frames leaked=0",
    "selftest: page faults handled=16",
    "selftest: child inherits touched page=2",
    "selftest: kernel page touched from user: killed, status=-14",
    "selftest: write to shared code: killed, status=-14",
    "selftest: invalid opcode: killed, status=-106",
    "selftest: divide errors trapped and skipped=1",
    "selftest: timer ticks while sleeping>=3",
    "selftest: null and unknown syscalls=2",
    "selftest: passed=13",
    "selftest: result ok",
]
# (engine, paravirt) -> the guest's boot line name of its pv-ops table
CONFIGS = [("bt", False), ("bt", True), ("hw", False), ("hw", True), ("qemu", False)]
KVM_CONFIGS = {("hw", False), ("hw", True)}
QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    require_from_setup(programs=guestos.missing_tools(), package="gcc, binutils")
    return guestos.build(tmp_path_factory.mktemp("guestos"))


_runs: dict = {}


def boot(image, engine: str, paravirt: bool, append: str = "bench=0"):
    """One boot per (engine, paravirt, append) in this module: (proc, GuestResult)."""
    key = (engine, paravirt, append)
    if key not in _runs:
        if engine == "hw":
            require_kvm()
        if engine == "qemu":
            require_from_setup(programs=[QEMU], package="qemu-system-x86")
            cmd = guestos.qemu_command(image, append)
        else:
            cmd = guestos.pyvmm_command(image, engine, paravirt, append)
        proc = guestos.run(cmd, TIMEOUT)
        _runs[key] = (proc, guestos.parse(proc.stdout))
    return _runs[key]


def test_image_is_a_flat_multiboot_kernel(image):
    data = image.read_bytes()
    off = data.find(struct.pack("<I", 0x1BADB002))
    assert 0 <= off < 8192 and off % 4 == 0
    magic, flags, checksum, header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<8I", data, off)
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & (1 << 16)                                    # a.out kludge: QEMU and pyvmm load it alike
    assert load_addr == 0x100000 and header_addr == load_addr + off
    assert load_end - load_addr == len(data) and bss_end > load_end
    assert load_addr <= entry < load_end


@pytest.mark.parametrize("engine,paravirt", [
    pytest.param(e, p, id=f"{e}{'+pv' if p else ''}", marks=[pytest.mark.kvm] if (e, p) in KVM_CONFIGS else [])
    for e, p in CONFIGS])
def test_selftest_identical_everywhere(image, engine, paravirt):
    proc, res = boot(image, engine, paravirt)
    why = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == guestos.EXIT_OK, why
    assert res.done and res.ok, why
    assert [line for line in res.selftest if line.startswith("selftest: ")] == SELFTEST_LINES, why
    ref_proc, ref = boot(image, "bt", False)
    assert res.selftest == ref.selftest, why                   # kill messages (rip, cr2) included
    if paravirt:
        assert res.paravirt.startswith("pyvmm"), why
        assert {"console", "set_shared", "timer", "read_time", "halt"} <= set(res.hypercalls), why
        if engine == "bt":                                      # page tables through mmu_update
            assert res.paravirt == "pyvmm"
            assert res.hypercalls["mmu_update"] > 0 and res.hypercalls["set_cr3"] > 0, why
    else:
        assert res.paravirt == "native" and not res.hypercalls, why


@pytest.mark.parametrize("engine,paravirt", [("bt", True), ("qemu", False)], ids=["bt+pv", "qemu"])
def test_benchmarks_report(image, engine, paravirt):
    proc, res = boot(image, engine, paravirt, guestos.cmdline(iters=20, forks=3))
    why = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == guestos.EXIT_OK and res.ok, why
    assert set(res.bench) == set(guestos.BENCHES), why
    for name in guestos.BENCHES:
        ops, cycles = res.bench[name]
        assert ops == (3 if name == "forkwait" else 20) and cycles > 0, (name, why)
    assert res.tsc_khz > 0
    if paravirt:                    # ptemod: one update_va (ABI 1.1) per change; page faults: one each
        assert res.hypercalls["update_va"] >= 21 + 20, why


def test_abi_10_pyvmm_gets_the_mmu_update_fallback(image, monkeypatch, capfd):
    """A pyvmm without update_va (ABI 1.0: no feature bit 6): guestos keeps
    its ABI 1.0 path (mmu_update + flush_tlb) and gives the same results."""
    from pyvmm.cli.main import main
    from pyvmm.paravirt import abi, install
    monkeypatch.setattr(install, "features_for", lambda shadowed: abi.FEATURES & ~abi.FEAT_UPDATE_VA)
    code = main(guestos.pyvmm_command(image, "bt", True, guestos.cmdline(iters=20, forks=3))[3:])
    out = capfd.readouterr().out
    res = guestos.parse(out)
    assert code == guestos.EXIT_OK and res.ok and res.done, out[-3000:]
    assert [line for line in res.selftest if line.startswith("selftest: ")] == SELFTEST_LINES
    assert "update_va" not in res.hypercalls and res.hypercalls["flush_tlb"] >= 21, res.hypercalls
    assert set(res.bench) == set(guestos.BENCHES)


def test_cmdline_and_parse():
    assert guestos.cmdline(iters=5, forks=2) == "bench=1 iters=5 forks=2"
    assert guestos.cmdline(bench=False) == "bench=0"
    r = guestos.parse("guestos: boot magic=2badb002 paravirt=pyvmm\nguestos: tsc_khz=2000000\r\n"
                      "bench ptemod ops=10 cycles=5000 per_op=500\nselftest: result ok\n"
                      "guestos: hypercalls console=3 mmu_update=7\nguestos: done\n")
    assert r.paravirt == "pyvmm" and r.ok and r.done and r.hypercalls == {"console": 3, "mmu_update": 7}
    assert r.per_op("ptemod") == 500 and r.ns_per_op("ptemod") == 250


def test_mmu_feature_withheld_only_on_shadow_paging_hw_hosts():
    from pyvmm.engines.bt.engine import BtEngine
    from pyvmm.engines.kvm import hostfit
    from pyvmm.engines.kvm.engine import KvmEngine
    from pyvmm.paravirt import abi
    from pyvmm.paravirt.install import features_for
    # what each engine says of its host; attach() offers features_for(that)
    assert not BtEngine.shadows_guest_page_tables(None)
    assert KvmEngine.shadows_guest_page_tables(None) == hostfit.kernel_mode_emulated()
    assert features_for(False) == abi.FEATURES
    shadowed = features_for(True)
    assert shadowed | abi.FEAT_MMU | abi.FEAT_UPDATE_VA == abi.FEATURES     # update_va is an MMU call
    assert not shadowed & abi.FEAT_MMU and not shadowed & abi.FEAT_UPDATE_VA
    assert abi.cpuid_leaves(features=shadowed)[abi.CPUID_BASE + 1][1] == shadowed


def test_bench_paper_cli_prints_table_and_result(image):
    require_from_setup(programs=[QEMU], package="qemu-system-x86")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "bench", "paper", "--only", "qemu", "--iters-qemu", "50",
                           "--forks-qemu", "5"], cwd=guestos.SOURCE_DIR.parent, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("RESULT ") and "columns=qemu" in lines[-1]
    assert any(line.startswith("ptemod ") and "(1.0x)" in line for line in lines), proc.stdout
