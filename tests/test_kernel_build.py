"""`pyvmm kernel build`: builds the fitted kernel from Debian's linux-source
(cached in ~/.cache/pyvmm/kernel between runs: a cold build is a few
minutes on 2 cores, a warm one seconds), checks it with pyvmm's bzImage
parser, and boots it to PYVMM-INIT-READY on each engine that can run it
here.  A boot that times out, crashes or stops early fails, with what the
guest and pyvmm printed; only a host fact (no /dev/kvm; hw on a KVM that
emulates guest kernel mode, where Linux user space cannot run) skips.
"""

from __future__ import annotations

import json

import pytest

from pyvmm.boot.bzimage import parse_bzimage
from pyvmm.guest.initramfs import READY_MARKER, ensure_default_initramfs
from pyvmm.kernel.build import IMAGE_PATH
from pyvmm.kernel.config import read_config
from pyvmm.kernel.fragment import FITTED
from pyvmm.kernel.pretranslate import pretranslate
from tests.guest_session import GuestSession
from tests.fitted_kernel import build_fitted
from tests.hostfacts import require_hardware_assist

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = {"hw": 180.0, "bt": 300.0}


@pytest.fixture(scope="module")
def built():
    lines: list[str] = []
    result, build_dir = build_fitted(progress=lines.append)    # tests/fitted_kernel.py: one build at a time
    return result, build_dir, lines


def test_build_produces_checked_bzimage(built):
    result, build_dir, _ = built
    assert result.image == build_dir / IMAGE_PATH
    image = parse_bzimage(result.image.read_bytes())
    assert image.header.is_64bit
    assert result.compression == "lz4"
    assert result.size == result.image.stat().st_size
    # fitted: far smaller than a distribution kernel (Debian's cloud bzImage: 13.5 MiB)
    assert result.size < 3 * 2**20
    values = read_config(build_dir / ".config")
    assert all(values.get(k) == v for k, v in FITTED.items())
    assert "bzImage is ready" in result.log_path.read_text()


def test_progress_lines_are_single_steps(built):
    result, _, lines = built
    # a cold build reports every object; a warm one may have nothing to do
    assert len(lines) >= result.compiled
    assert all("\n" not in l and l.startswith("[") for l in lines)


def _why_no_marker(s: GuestSession, engine: str) -> str:
    """What a boot that did not reach the marker showed: still running (a
    timeout), the guest's last words before it reset, or pyvmm's error."""
    code = s.proc.poll()
    if code is None:
        return (f"--engine {engine} did not reach {READY_MARKER} in {BOOT_TIMEOUT[engine]:.0f} s; "
                f"console tail:\n{s.output[-2000:]}\nstderr tail:\n{s.errors[-2000:]}")
    s.wait(10)
    last = [l for l in s.output.splitlines() if "Kernel panic" in l or "segfault" in l or "traps:" in l]
    return (f"--engine {engine} exited {code} before {READY_MARKER}: {' / '.join(last[:3])}\n"
            f"console tail:\n{s.output[-2000:]}\nstderr tail:\n{s.errors[-3000:]}")


@pytest.mark.parametrize("engine", [pytest.param("hw", marks=pytest.mark.kvm), "bt"])
def test_boot_fitted_kernel(built, engine):
    if engine == "hw":
        require_hardware_assist("Linux user space cannot run under --engine hw (README; hybrid is tested below)")
    result, _, _ = built
    initrd = str(ensure_default_initramfs())
    with GuestSession("run", "--engine", engine, "--kernel", str(result.image), "--initrd", initrd,
                      "--append", "console=ttyS0 reboot=k panic=-1 pyvmm.poweroff",
                      "--mem", "256M", "--no-reboot") as s:
        try:
            s.expect(READY_MARKER, BOOT_TIMEOUT[engine])
        except AssertionError:
            pytest.fail(_why_no_marker(s, engine), pytrace=False)
        # ACPI power off (pyvmm's PM1a control port) ends the VM cleanly
        assert s.wait(60) == 0, s.errors[-2000:]
        assert "Traceback" not in s.errors, s.errors[-3000:]


@pytest.mark.kvm
def test_fitted_kernel_shell_under_hybrid(built, tmp_path):
    """--engine hybrid: the kernel in bt, busybox's user code under KVM. The
    shell answers, and the stats show user code left KVM by system calls and
    traps (so it really ran there)."""
    result, _, _ = built
    stats = tmp_path / "stats.json"
    with GuestSession("run", "--engine", "hybrid", "--kernel", str(result.image),
                      "--initrd", str(ensure_default_initramfs()), "--append", "console=ttyS0 reboot=k panic=-1",
                      "--mem", "256M", "--no-reboot", "--stats-json", str(stats)) as s:
        s.expect(READY_MARKER, BOOT_TIMEOUT["bt"])
        sent = s.send("uname -s; echo HYBRID-$((40+2))\n")
        s.expect(r"\bLinux\b", 120, after=sent)      # uname's answer, not the boot banner
        s.expect(r"HYBRID-42", 120, after=sent)
        s.send("poweroff -f\n")
        assert s.wait(120) == 0, s.errors[-2000:]
    exits = json.loads(stats.read_text())["costs"]["exits"]
    assert exits.get("user_syscall", 0) > 100 and exits.get("user_trap", 0) > 10, exits


def test_pretranslation_fills_the_store_the_first_run_loads(built, tmp_path):
    """`pyvmm kernel build` boots the new image once under bt (pretranslate.py):
    a run after it loads its blocks from the store instead of compiling them."""
    result, _, _ = built
    first = pretranslate(result.image, str(tmp_path))
    assert first.ok, first.failure
    # An empty store: everything translated.  Only blocks this run stored,
    # then dropped (translator.MAX_BLOCKS) and wanted again, come back from it.
    assert first.blocks - first.loaded > 5000 and first.loaded < 0.25 * first.blocks, first
    again = pretranslate(result.image, str(tmp_path))
    assert again.ok, again.failure
    assert again.loaded >= 0.95 * again.blocks, again
