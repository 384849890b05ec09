"""VM.restore(path, engine=...) in the Python API (pyvmm/vm.py): a snapshot
file saved from a running counter guest (tests/api/counterguest.py) becomes
a new VM that counts on from the very character the saved one stopped at,
under bt and under hybrid; cpus, mem and the default engine come from the
file. A bad file is a one-line error before anything starts, and
vm.restore(path) and vm.restore(tag=...) on a running VM
(tests/api/test_vm_api.py covers that)."""

from __future__ import annotations

import os

import pytest

from pyvmm import VM
from pyvmm.errors import VmmError

from .counterguest import counter_kernel, counts

EXTRA = ["--no-reboot", "--no-bt-cache"]
HAS_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, bytes]:
    """A snapshot file of the counter guest under bt, and what it had printed."""
    path = str(tmp_path_factory.mktemp("restore") / "counter.snap")
    with VM(kernel=str(counter_kernel()), engine="bt", mem=32, extra_args=EXTRA) as vm:
        vm.start()
        vm.console.expect(r"00000004\r?\n", timeout=60)
        vm.pause()
        vm.save(path)
        printed = vm.console.output.encode()
        assert vm.stop() == 0
    return path, printed


@pytest.mark.parametrize("engine", ["bt", pytest.param("hybrid", marks=pytest.mark.skipif(
    not HAS_KVM, reason="hybrid needs /dev/kvm"))])
def test_restore_makes_a_vm_from_a_snapshot_file(saved, engine):
    path, printed = saved
    vm = VM.restore(path, engine=engine, kernel=str(counter_kernel()), extra_args=EXTRA)
    assert isinstance(vm, VM) and vm.proc is None, "a VM to start, like VM(...)"
    with vm:
        vm.start()
        assert vm.qmp("query-kvm")["enabled"] is (engine == "hybrid")
        vm.console.expect(r"([0-9A-F]{8}\r?\n){4}", timeout=60)
        # Together with what the saved VM printed: 1, 2, 3... with nothing
        # lost or repeated, so the guest went on from the file, not from boot.
        joined = counts(printed + vm.console.output.encode())
        assert joined == list(range(1, len(joined) + 1)), (counts(printed), counts(vm.console.output.encode()))
        assert len(joined) >= counts(printed)[-1] + 3
        assert vm.stop() == 0


def test_restore_takes_cpus_mem_and_engine_from_the_file(saved):
    path, _ = saved
    args = VM.restore(path, kernel="k").args
    assert args[args.index("--engine") + 1] == "bt"
    assert args[args.index("--mem") + 1] == "32" and args[args.index("--cpus") + 1] == "1"
    assert args[args.index("--restore") + 1] == path
    args = VM.restore(path, engine="hybrid", mem="32M", kernel="k").args
    assert args[args.index("--engine") + 1] == "hybrid" and args[args.index("--mem") + 1] == "32M"


def test_restore_of_a_bad_file_is_one_line(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.snap"
    cut.write_bytes(open(path, "rb").read()[:100])
    for bad, why in [(cut, "truncated"), (tmp_path / "none.snap", "No such file")]:
        with pytest.raises(VmmError, match=why) as err:
            VM.restore(str(bad), engine="bt", kernel=str(counter_kernel()))
        assert "\n" not in str(err.value)
