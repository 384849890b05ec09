"""Snapshot files (snapshot/file.py, QMP x-snapshot-file-save/-load):
full and diff files of the counter guest load back to the exact saved
count under each engine, guest RAM is mapped from the file rather than
read in, bad files are refused in one line with the running VM untouched,
and a hundred save/load cycles leak no descriptors, threads or memory."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from pyvmm.api.commands import CommandError
from pyvmm.snapshot import file as snapfile
from pyvmm.snapshot import lazymap

from tests.api.counterguest import CounterVm
from tests.procself import mapping_count, open_fds, rss_kib

ENGINES = ["bt", "hw", "hybrid"]
FILL_GPA = 0x1000000
FILL = 8 << 20


def _paused_counter(vm: CounterVm) -> int:
    vm.qmp("stop")
    return vm.counter()


def _runs_on(vm: CounterVm) -> list[int]:
    """The next two counts once the paused guest goes on."""
    mark = len(vm.output)
    vm.qmp("cont")
    return vm.wait_counts(2, after=mark)[:2]


@pytest.fixture
def counter_vm(request):
    vms: list[CounterVm] = []

    def make(engine: str = "bt", mem_mib: int = 32) -> CounterVm:
        vms.append(CounterVm(engine, [], mem_mib=mem_mib))
        return vms[-1]
    yield make
    for vm in vms:
        vm.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_full_and_diff_files_load_back_to_the_saved_count(tmp_path, counter_vm, engine):
    vm = counter_vm(engine)
    full, diff = str(tmp_path / "full.snap"), str(tmp_path / "diff.snap")
    vm.wait_counts(2)
    c_full = _paused_counter(vm)
    vm.machine.memory.fill(FILL_GPA, FILL, 0x5A)          # RAM the guest does not print
    assert vm.qmp("x-snapshot-file-save", path=full)["kind"] == "full"
    vm.qmp("cont")
    vm.wait_counts(3, after=len(vm.output))
    c_diff = _paused_counter(vm)
    vm.machine.memory.fill(FILL_GPA, 4096, 0xA5)           # one page changed since the full file
    info = vm.qmp("x-snapshot-file-save", path=diff, type="diff")
    assert info["kind"] == "diff" and info["size"] < os.path.getsize(full) // 8, info
    vm.qmp("cont")
    vm.wait_counts(3, after=len(vm.output))
    vm.qmp("stop")
    vm.machine.memory.fill(FILL_GPA, FILL, 0x11)

    assert "load-ms" in vm.qmp("x-snapshot-file-load", path=full)
    assert vm.counter() == c_full
    mem = vm.machine.memory
    assert mem.read(FILL_GPA, 4096) == b"\x5a" * 4096 and mem.read(FILL_GPA + FILL - 1, 1) == b"\x5a"
    assert mem.read(FILL_GPA + FILL, 4) == bytes(4)        # zero RAM stays zero
    assert full in open("/proc/self/maps").read()          # mapped from the file, not read in
    assert _runs_on(vm) == [c_full + 1, c_full + 2]

    vm.qmp("stop")
    vm.qmp("x-snapshot-file-load", path=diff)               # the chain: full file, then the diff
    assert vm.counter() == c_diff
    assert mem.read(FILL_GPA, 4096) == b"\xa5" * 4096 and mem.read(FILL_GPA + 4096, 1) == b"\x5a"
    assert _runs_on(vm) == [c_diff + 1, c_diff + 2]
    vm.qmp("stop")
    mem.fill(FILL_GPA + 4096, 4096, 0x77)                   # RAM writes never reach the file
    gpa, _, off = next(r for r in snapfile.read_header(full).runs if r[0] <= FILL_GPA + 4096 < r[0] + r[1])
    with open(full, "rb") as f:
        f.seek(off + FILL_GPA + 4096 - gpa)
        assert f.read(4096) == b"\x5a" * 4096
    assert snapfile.check_file(diff)[-1].meta["kind"] == "diff"


def _corrupt(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_bad_files_are_refused_in_one_line_and_the_vm_runs_on(tmp_path, counter_vm):
    vm = counter_vm("bt")
    good = str(tmp_path / "good.snap")
    vm.wait_counts(2)
    vm.qmp("x-snapshot-file-save", path=good)
    data = open(good, "rb").read()
    cases = {}

    def case(name: str, content: bytes) -> str:
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            f.write(content)
        cases[name] = p
        return p

    case("truncated", data[: len(data) - 4096])
    case("header-only", data[:10])
    case("not-ours", b"\x7fELF" + bytes(100))
    case("version", data[:8] + struct.pack(">I", 1) + data[12:])
    p = case("corrupt-cpus", data)
    _corrupt(p, data.index(b"CPUS") + 16 + 20)
    big = counter_vm("bt", mem_mib=64)
    big.wait_counts(1)
    big.qmp("x-snapshot-file-save", path=str(tmp_path / "other-ram.snap"))
    cases["other-ram"] = str(tmp_path / "other-ram.snap")
    cases["missing"] = str(tmp_path / "missing.snap")
    expect = {"truncated": "truncated", "header-only": "truncated", "not-ours": "not a pyvmm snapshot",
              "version": "format version 1 is not supported", "corrupt-cpus": "CPUS is corrupt",
              "other-ram": "saved with 64 MiB of RAM", "missing": "No such file"}
    vm.qmp("stop")
    before = vm.counter()
    for name, path in cases.items():
        with pytest.raises(CommandError) as err:
            vm.qmp("x-snapshot-file-load", path=path)
        assert expect[name] in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
        assert vm.counter() == before
    assert _runs_on(vm) == [before + 1, before + 2]

    # A corrupt page is found by a verifying load (a lazy one does not read RAM).
    p = case("corrupt-ram", data)
    _corrupt(p, snapfile.read_header(p).runs[0][2] + 5)
    with pytest.raises(CommandError, match="RAMD is corrupt"):
        vm.qmp("x-snapshot-file-load", path=p, verify=True)

    # A diff whose parent was replaced by another full snapshot.
    vm.qmp("x-snapshot-file-save", path=str(tmp_path / "d.snap"), type="diff")
    vm.qmp("x-snapshot-file-save", path=good)
    with pytest.raises(CommandError, match="was replaced by another snapshot"):
        vm.qmp("x-snapshot-file-load", path=str(tmp_path / "d.snap"))
    with pytest.raises(CommandError, match="type"):
        vm.qmp("x-snapshot-file-save", path=good, type="half")
    fresh = counter_vm("bt")
    with pytest.raises(CommandError, match="needs a full one"):
        fresh.qmp("x-snapshot-file-save", path=str(tmp_path / "x.snap"), type="diff")
    assert not os.path.exists(tmp_path / "x.snap")


def test_a_hundred_save_load_cycles_leak_nothing(tmp_path, counter_vm):
    vm = counter_vm("bt")
    full, diff = str(tmp_path / "full.snap"), str(tmp_path / "diff.snap")
    vm.wait_counts(1)
    vm.qmp("stop")
    vm.machine.memory.fill(FILL_GPA, FILL, 0x5A)

    def cycle(i: int) -> None:
        vm.machine.memory.write_u32(FILL_GPA, 1000 + i)
        vm.qmp("x-snapshot-file-save", path=full)
        vm.machine.memory.write_u32(FILL_GPA, i)
        vm.qmp("x-snapshot-file-save", path=diff, type="diff")
        vm.qmp("cont")                                     # the guest runs between cycles
        vm.qmp("stop")
        vm.qmp("x-snapshot-file-load", path=full if i % 2 else diff)
        assert vm.machine.memory.read_u32(FILL_GPA) == (1000 + i if i % 2 else i)

    for i in range(5):                                     # warm up: imports, caches, the freer thread
        cycle(i)
    lazymap.wait_freed()
    fds, threads, maps, rss = open_fds(), threading.active_count(), mapping_count(), rss_kib()
    for i in range(100):
        cycle(i)
    lazymap.wait_freed()
    assert open_fds() == fds
    assert threading.active_count() == threads
    assert mapping_count() <= maps + 4
    assert rss_kib() - rss < 16 << 10, (rss, rss_kib())  # KiB: far below a hundred copies of 8 MiB
    c = vm.counter()
    assert _runs_on(vm) == [c + 1, c + 2]


CROSS = [("bt", "hw"), ("hw", "bt"), ("hybrid", "hw"), ("hw", "hybrid"), ("bt", "hybrid"), ("hybrid", "bt")]


@pytest.mark.kvm
@pytest.mark.parametrize("saved_under,loaded_under", CROSS)
def test_a_file_loads_under_another_engine(tmp_path, counter_vm, saved_under, loaded_under):
    """The interrupt platform crosses the hw line through the file's PLAT
    section (crossengine.py): the count goes on from the saved one."""
    from tests.rawguest import require_kvm
    require_kvm()
    path = str(tmp_path / "x.snap")
    src = counter_vm(saved_under)
    src.wait_counts(2)
    saved = _paused_counter(src)
    src.qmp("x-snapshot-file-save", path=path)
    src.close()
    dst = counter_vm(loaded_under)
    dst.wait_counts(1)
    dst.qmp("stop")
    dst.qmp("x-snapshot-file-load", path=path)
    assert dst.counter() == saved
    assert _runs_on(dst) == [saved + 1, saved + 2]


@pytest.mark.parametrize("engine", ["bt", "hybrid"])
def test_pyvmm_run_restore_starts_from_the_file(tmp_path, engine):
    """`pyvmm run --restore FILE` (VM.from_snapshot) under the saving engine
    and under another; a file of another machine ends the start in one line."""
    from pyvmm import VM
    from pyvmm.errors import VmmError
    from tests.api.counterguest import COUNTER, counter_kernel, counts
    kernel, path = str(counter_kernel()), str(tmp_path / "run.snap")
    with VM(kernel=kernel, engine="bt", mem=32, extra_args=["--no-reboot", "--no-bt-cache"]) as vm:
        vm.start()
        vm.console.expect(r"00000003\r?\n", timeout=30)
        vm.pause()
        saved = int(vm.hmp(f"xp /1xw {COUNTER:#x}").split()[1], 16)
        assert vm.save(path)["kind"] == "full"
    with VM.from_snapshot(path, kernel=kernel, engine=engine, mem=32, extra_args=["--no-reboot", "-v"]) as vm:
        vm.start()
        vm.console.expect(r"([0-9A-F]{8}\r?\n){2}", timeout=30)
        assert counts(vm.console.output.encode())[:2] == [saved + 1, saved + 2]
        assert "pyvmm: restored in" in vm.errors
    with pytest.raises(VmmError, match=r"did not start .*saved with 32 MiB of RAM, this machine has 64 MiB"):
        VM.from_snapshot(path, kernel=kernel, engine="bt", mem=64, extra_args=["--no-reboot"]).start()


def test_written_pages_are_the_ones_copied_on_write(tmp_path):
    """lazymap.written_pages: after map_file and map_zero nothing counts as
    written; a write to a file page or to a zero page does, reads do not."""
    import ctypes
    import mmap

    page = lazymap.PAGE
    mm = mmap.mmap(-1, 64 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    try:
        mm[3 * page] = 1
        assert lazymap.written_pages(base, 64 * page) == [(3 * page, page)]
        backing = tmp_path / "pages"
        backing.write_bytes(b"\x77" * 16 * page)
        fd = os.open(backing, os.O_RDONLY)
        lazymap.map_file(base, 16 * page, fd, 0)
        os.close(fd)
        lazymap.map_zero(base + 16 * page, 48 * page)
        assert mm[5 * page] == 0x77 and mm[20 * page] == 0      # reads: still the file's, still zero
        assert lazymap.written_pages(base, 64 * page) == []
        mm[5 * page] = 1
        mm[6 * page] = 1
        mm[40 * page] = 1
        assert lazymap.written_pages(base, 64 * page) == [(5 * page, 2 * page), (40 * page, page)]
        assert backing.read_bytes()[5 * page] == 0x77                 # private: the file keeps its bytes
    finally:
        del base
        mm.close()


def test_qcow2_loadvm_after_a_file_load_gives_zero_pages_back(tmp_path):
    """RAM mapped from a snapshot file must not show the file again when a
    qcow2 snapshot's state (vmstate.py) zeroes it."""
    from pyvmm.config import DriveConfig
    from pyvmm.storage.create import create_image
    disk = tmp_path / "d.qcow2"
    create_image(str(disk), "qcow2", 1 << 20)
    vm = CounterVm("bt", [DriveConfig(file=str(disk), id="disk0")])
    try:
        vm.wait_counts(1)
        vm.qmp("stop")
        vm.hmp("savevm q")                                 # FILL_GPA.. is zero in this state
        vm.machine.memory.fill(FILL_GPA, FILL, 0x5A)
        vm.qmp("x-snapshot-file-save", path=str(tmp_path / "f.snap"))
        vm.qmp("x-snapshot-file-load", path=str(tmp_path / "f.snap"))
        assert vm.machine.memory.read(FILL_GPA, 4) == b"\x5a" * 4
        vm.hmp("loadvm q")
        assert vm.machine.memory.read(FILL_GPA, 4) == bytes(4)
        assert vm.machine.memory.read(FILL_GPA + FILL - 4, 4) == bytes(4)
        with pytest.raises(CommandError, match="needs a full one"):   # RAM no longer mirrors the file
            vm.qmp("x-snapshot-file-save", path=str(tmp_path / "d.snap"), type="diff")
    finally:
        vm.close()


def _with_device_state(src: str, dst: str, name: str, edit) -> None:
    """A copy of snapshot file `src` whose DEVS section holds edit(state) for
    device `name`, padded to the same length (RAMT's file offsets stay
    right) and with its checksum redone."""
    import json
    import zlib
    from pyvmm.snapshot.vmstate import HEADER, SECTION
    data = bytearray(open(src, "rb").read())
    pos = HEADER.size
    while True:
        tag, length, _ = SECTION.unpack_from(data, pos)
        if tag == b"DEVS":
            break
        pos += SECTION.size + length
    devices = json.loads(data[pos + SECTION.size:pos + SECTION.size + length])
    devices[name] = edit(devices[name])
    payload = json.dumps(devices).encode()
    assert len(payload) <= length
    payload = payload.ljust(length)                        # JSON allows the trailing spaces
    data[pos:pos + SECTION.size + length] = SECTION.pack(b"DEVS", length, zlib.crc32(payload)) + payload
    with open(dst, "wb") as f:
        f.write(data)


def test_a_device_state_of_an_older_version_loads_and_an_unknown_one_changes_nothing(tmp_path, counter_vm):
    """A file whose acpi_pm section is version 1 (before the GPE0 block)
    loads with GPE0 at power-on; one of a version this pyvmm cannot
    upgrade from is refused in one line before RAM or any device changes."""
    vm = counter_vm("bt")
    good, old, new = (str(tmp_path / f"{n}.snap") for n in ("good", "old", "new"))
    vm.wait_counts(1)
    vm.qmp("stop")
    pm = vm.machine.devices["acpi_pm"]
    vm.machine.io_bus.write(0x60E, 1, 0x2)                 # GPE0_EN: saved as enabled in version 2
    vm.qmp("x-snapshot-file-save", path=good)
    saved_count = vm.counter()
    _with_device_state(good, old, "acpi_pm",
                       lambda s: {**{k: v for k, v in s.items() if not k.startswith("gpe")}, "version": 1})
    _with_device_state(good, new, "acpi_pm", lambda s: {**s, "version": 9})

    vm.qmp("cont")
    vm.wait_counts(2, after=len(vm.output))
    vm.qmp("stop")
    before = vm.counter()
    vm.machine.memory.fill(FILL_GPA, 4096, 0x3C)
    with pytest.raises(CommandError) as err:
        vm.qmp("x-snapshot-file-load", path=new)
    assert vm.counter() == before and vm.machine.memory.read(FILL_GPA, 4096) == b"\x3c" * 4096
    assert pm.gpe_en == 0x2
    assert str(err.value) == ("vmstate: AcpiPm state: version 9 is not supported "
                              "(this pyvmm restores versions 1 to 2)")

    vm.qmp("x-snapshot-file-load", path=old)
    assert vm.counter() == saved_count and (pm.gpe_en, pm.gpe_used) == (0, 0)
    assert pm.save()["version"] == 2
    assert _runs_on(vm) == [saved_count + 1, saved_count + 2]


def test_a_save_that_fails_half_way_leaves_the_old_file_and_no_other(tmp_path, counter_vm):
    """The host refuses the write half-way (a file size limit: the write
    fails with EFBIG as on a full disk): one-line error, the file saved
    before at that path is still whole and loads, and no temporary file
    is left behind."""
    import resource
    import signal
    vm = counter_vm("bt")
    good = str(tmp_path / "good.snap")
    vm.wait_counts(1)
    vm.qmp("stop")
    vm.machine.memory.fill(FILL_GPA, FILL, 0x5A)
    vm.qmp("x-snapshot-file-save", path=good)
    size, count = os.path.getsize(good), vm.counter()
    vm.machine.memory.fill(FILL_GPA, FILL, 0x11)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limit[1]))
    try:
        with pytest.raises(CommandError) as err:
            vm.qmp("x-snapshot-file-save", path=good)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path) == ["good.snap"] and os.path.getsize(good) == size
    assert str(err.value) == f"{good}: cannot write the snapshot: File too large"
    assert vm.machine.memory.read(FILL_GPA, 4) == b"\x11" * 4          # the VM's RAM as it was
    snapfile.check_file(good)
    vm.qmp("x-snapshot-file-load", path=good)
    assert vm.counter() == count and vm.machine.memory.read(FILL_GPA, 4) == b"\x5a" * 4
    assert _runs_on(vm) == [count + 1, count + 2]
