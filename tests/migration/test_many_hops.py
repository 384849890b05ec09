"""The counter guest migrated 20 times in a row between pyvmm processes,
bt and hybrid taking turns: each destination is the next hop's source,
and the console output of all of them together counts 1, 2, 3... with
no count lost or repeated, while the count keeps rising on every hop."""

from __future__ import annotations

import os

import pytest

from pyvmm.api.client import QmpClient

from tests.api.counterguest import counts
from tests.migration.test_live import Vm, _wait_done

HOPS = 20

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="hybrid needs /dev/kvm")]


def test_twenty_hops_across_engines(tmp_path):
    engines = ["bt", "hybrid"]
    made: list[Vm] = []
    try:
        qsock = str(tmp_path / "q0.sock")
        src = Vm(True, "--qmp", f"unix:{qsock},server,wait=off", engine=engines[0])
        made.append(src)
        src.wait_counts(2)
        for hop in range(1, HOPS + 1):
            uri, next_q = f"unix:{tmp_path}/m{hop}.sock", str(tmp_path / f"q{hop}.sock")
            dst = Vm(True, "--incoming", uri, "--qmp", f"unix:{next_q},server,wait=off",
                     engine=engines[hop % 2])
            made.append(dst)
            dst.wait_stderr(b"waiting for an incoming migration")
            qmp = QmpClient(qsock)
            qmp.execute("migrate", {"uri": uri})
            info = _wait_done(qmp)
            assert info["status"] == "completed", (hop, info)
            qmp.execute("quit")
            qmp.close()
            assert src.proc.wait(30) == 0, bytes(src.err)
            before = len(counts(dst.out))
            dst.wait_counts(before + 2)         # it counts on here before moving again
            src, qsock = dst, next_q
        joined = counts(b"".join(bytes(vm.out) for vm in made))
        assert joined == list(range(1, len(joined) + 1)), joined[-10:]
        assert all(b"Traceback" not in vm.err for vm in made)
    finally:
        for vm in made:
            vm.close()
