"""The Python API (pyvmm/vm.py): `from pyvmm import VM`, a child `pyvmm run`
driven through its console and QMP socket, with no CLI parsing in the
script: start, expect, pause/resume with events, snapshot and restore to
the exact saved count, QMP errors as exceptions, and a clean stop."""

from __future__ import annotations

import re

import pytest

from pyvmm import VM
from pyvmm.errors import VmmError
from pyvmm.storage.create import create_image
from pyvmm.vm import QmpError

from .counterguest import COUNTER, counter_kernel, counts


def test_vm_api_round_trip(tmp_path):
    disk = tmp_path / "disk.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    with VM(kernel=str(counter_kernel()), engine="bt", mem=32, drives=[{"file": str(disk), "id": "disk0"}],
            extra_args=["--no-reboot", "--no-bt-cache"]) as vm:
        vm.start()
        vm.console.expect(r"00000003\r?\n", timeout=30)
        assert vm.status() == "running"
        vm.pause()
        assert vm.status() == "paused" and vm.wait_event("STOP")["event"] == "STOP"
        saved = int(vm.hmp(f"xp /1xw {COUNTER:#x}").split()[1], 16)
        vm.snapshot(tag="t1")
        assert vm.status() == "paused"
        vm.resume()
        vm.wait_event("RESUME")
        vm.console.expect(rf"{saved + 4:08X}\r?\n", timeout=30)
        vm.pause()
        mark = vm.console.mark()
        vm.restore(tag="t1")                                   # paused it stays paused
        assert vm.status() == "paused"
        vm.resume()
        vm.console.expect(r"([0-9A-F]{8}\r?\n){3}", timeout=30, after=mark)
        after = counts(vm.console.output.encode()[mark:])
        assert after[:3] == [saved + 1, saved + 2, saved + 3], (saved, after)   # on from the saved count
        with pytest.raises(QmpError) as err:
            vm.qmp("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(QmpError, match="already exists"):
            vm.snapshot(tag="t1")
        assert re.search(r"\bt1\b", vm.hmp("info snapshots"))
        # The file form: vm.snapshot(path) and vm.restore(path) on the same VM.
        path = str(tmp_path / "vm.snap")
        vm.pause()
        saved = int(vm.hmp(f"xp /1xw {COUNTER:#x}").split()[1], 16)
        assert vm.snapshot(path)["kind"] == "full"
        vm.resume()
        vm.console.expect(rf"{saved + 3:08X}\r?\n", timeout=30)
        vm.pause()
        mark = vm.console.mark()
        vm.restore(path)
        vm.resume()
        vm.console.expect(r"([0-9A-F]{8}\r?\n){2}", timeout=30, after=mark)
        # (the first line after the mark may be the tail of one the save cut)
        got = counts(vm.console.output.encode()[mark:])
        assert got[0] in (saved + 1, saved + 2) and got == list(range(got[0], got[0] + len(got))), (saved, got)
        with pytest.raises(TypeError):
            vm.snapshot(path, tag="t2")
        assert vm.stop() == 0
    from pyvmm.snapshot.file import read_header
    assert [d["id"] for d in read_header(path).meta["disks"]] == ["disk0"]      # the disk went with it
    assert vm.proc.returncode == 0


def test_vm_that_cannot_start_says_why(tmp_path):
    vm = VM(kernel=str(tmp_path / "missing"), engine="bt")
    with pytest.raises(VmmError, match="did not start .*no such file"):
        vm.start()


def test_guest_session_reads_through_the_api_console():
    """tests/guest_session.py is a thin layer over pyvmm.vm.Console: a pyvmm
    run and any other console program, with failures as AssertionErrors
    that carry what was printed."""
    import sys
    import time

    from tests.guest_session import GuestSession
    with GuestSession("run", "--kernel", str(counter_kernel()), "--engine", "bt", "--mem", "32",
                      "--no-reboot", "--no-bt-cache") as g:
        g.expect(r"00000002\r?\n", timeout=30)
        mark = g.mark()
        g.expect(r"([0-9A-F]{8}\r?\n){2}", timeout=30, after=mark)
        assert counts(g.output.encode()[mark:])[0] > 2
        t = time.monotonic()
        with pytest.raises(AssertionError, match=r"'NEVER' not seen \(exit=None\)\n--- stdout tail:\n.*0000"):
            g.expect("NEVER", timeout=0.5)
        assert time.monotonic() - t < 5
    other = GuestSession(argv=[sys.executable, "-c", "import sys; print(input()[::-1]); "
                                                     "print('bye', file=sys.stderr); sys.exit(3)"])
    other.send("olleh\n")
    other.expect(r"hello\r?\n", timeout=30)
    assert other.wait(30) == 3 and other.errors == "bye\n"
    with pytest.raises(AssertionError, match=r"exit=3\)[\s\S]*--- stderr:\nbye"):
        other.expect("more", timeout=30)                 # ended: fails at once, not after 30 s
