"""`make run` itself, as a new user runs it: the default `pyvmm run`
(engine auto, the default kernel and pyvmm's initramfs, 1 vCPU) reaches the
shell, answers a command and powers off.  On a host whose KVM emulates
kernel mode, auto runs hybrid: that run is then also the `--engine hybrid`
stock-kernel run (the module boots each engine once); `--engine bt` with
the stock kernel is tests/devices/test_virtio_net_linux.py (the checks of
tests/test_linux_bt.py ride on that boot)."""

from __future__ import annotations

import glob
import os
import re

import pytest

from pyvmm import autoselect
from pyvmm.cli.main import default_kernel

from .guest_session import GuestSession

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
_RUNS: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def stock_kernel():
    if not glob.glob("/boot/vmlinuz-*-cloud-amd64"):
        pytest.fail("linux-image-cloud-amd64 is not installed: scripts/setup.sh installs it")


def _shell_round(*args: str) -> tuple[str, str]:
    """Boots `pyvmm run ARGS`, runs a command at the shell, powers off;
    returns (the engine auto picked or "", what the command printed)."""
    with GuestSession("run", *args) as g:
        g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
        where = g.send("echo $((6*7))-ANSWER; uname -m\n")
        m = g.expect(r"\n42-ANSWER\r?\n(\S+)\r?\n", timeout=600, after=where)
        g.send("poweroff -f\n")
        assert g.wait(timeout=600) == 0, g.errors[-2000:]
        picked = re.search(r"engine auto -> (\w+)", g.errors)
        return (picked.group(1) if picked else ""), m.group(1)


def _run(engine: str) -> tuple[str, str]:
    if engine not in _RUNS:
        _RUNS[engine] = _shell_round() if engine == "auto" else _shell_round("--engine", engine)
        if engine == "auto" and _RUNS[engine][0]:
            _RUNS.setdefault(_RUNS[engine][0], _RUNS[engine])
    return _RUNS[engine]


def test_default_pyvmm_run_reaches_the_shell_and_powers_off():
    picked, machine = _run("auto")
    assert machine == "x86_64"
    assert picked == autoselect.choose(default_kernel()).engine


def test_stock_kernel_shell_under_hybrid():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent on this host: hybrid needs KVM")
    _picked, machine = _run("hybrid")
    assert machine == "x86_64"
