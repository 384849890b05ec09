"""`pyvmm img` against `qemu-img` on the same files."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest

from pyvmm.cli.main import main

from .helpers import qemu_img, fill_raw

SIZE = 4 << 20


def img(capsys, *args) -> tuple[int, str, str]:
    rc = main(["img", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def qemu_io(path, *commands, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path):
    """base.raw <- mid.qcow2 (4K clusters) <- top.qcow2, each with some data of its own."""
    fill_raw(tmp_path / "base.raw", SIZE, seed=21)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4K", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qcow2")
    qemu_io(tmp_path / "mid.qcow2", "write -P 0x44 0 300k", "write -z 1M 512k")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", "write -P 0x55 128k 64k", "write -z 2M 128k")
    return tmp_path / "top.qcow2"


def test_create_and_info_agree_with_qemu(tmp_path, capsys):
    rc, out, _ = img(capsys, "create", "-f", "qcow2", "-o", "cluster_size=4K", tmp_path / "a.qcow2", "3M")
    assert rc == 0 and "fmt=qcow2" in out
    rc, _, _ = img(capsys, "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", tmp_path / "b.qcow2")
    assert rc == 0
    theirs = json.loads(qemu_img("info", "--output", "json", tmp_path / "b.qcow2").stdout)
    rc, out, _ = img(capsys, "info", "--output", "json", tmp_path / "b.qcow2")
    mine = json.loads(out)
    for key in ("virtual-size", "format", "cluster-size", "backing-filename", "backing-filename-format",
                "dirty-flag"):
        assert mine[key] == theirs[key], key
    assert json.loads(qemu_img("info", "--output", "json", tmp_path / "a.qcow2").stdout)["cluster-size"] == 4096


@pytest.mark.parametrize("out_fmt,opts", [("qcow2", ["-c"]), ("qcow2", ["-o", "cluster_size=2M"]), ("raw", []),
                                          ("vmdk", ["-o", "subformat=streamOptimized"]), ("vmdk", [])])
def test_convert_flattens_chain_and_qemu_agrees(chain, tmp_path, capsys, out_fmt, opts):
    dst = tmp_path / f"out.{out_fmt}"
    rc, _, err = img(capsys, "convert", "-p", "-O", out_fmt, *opts, chain, dst)
    assert rc == 0, err
    if out_fmt != "raw":
        assert qemu_img("check", dst).returncode == 0
    qemu_img("compare", chain, dst)
    if opts == ["-c"]:
        info = json.loads(qemu_img("check", "--output", "json", dst).stdout)
        assert info.get("compressed-clusters", 0) > 0
    if "streamOptimized" in opts[-1:] or opts == ["-o", "subformat=streamOptimized"]:
        qemu_img("convert", "-O", "raw", dst, tmp_path / "back.raw")
        qemu_img("compare", chain, tmp_path / "back.raw")


def _refblock_and_cluster(path) -> tuple[int, int]:
    """(refcount block offset, a data cluster index) of a qemu-made image with 64K clusters."""
    raw = open(path, "rb").read(1 << 20)
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    refblock = struct.unpack_from(">Q", raw, reftable)[0]
    mapped = json.loads(qemu_img("map", "--output", "json", path).stdout)
    data = next(e for e in mapped if e["data"] and "offset" in e)
    return refblock, data["offset"] // 65536


def test_check_finds_and_repairs_leaks_and_corruption_like_qemu(tmp_path, capsys):
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 0x1 0 256k")
    refblock, cluster = _refblock_and_cluster(path)
    with open(path, "r+b") as f:           # a leak: refcount 1 on an unused cluster past the data
        f.seek(refblock + 2 * 40)
        f.write(struct.pack(">H", 1))
        f.truncate(41 * 65536)
    assert qemu_img("check", path, check=False).returncode == 3
    rc, out, _ = img(capsys, "check", "--output", "json", path)
    assert rc == 3 and json.loads(out)["leaks"] == 1
    rc, out, _ = img(capsys, "check", "-r", "leaks", path)
    assert rc == 0 and "1 leaked clusters" in out
    assert qemu_img("check", path, check=False).returncode == 0
    with open(path, "r+b") as f:           # corruption: a used data cluster with refcount 0
        f.seek(refblock + 2 * cluster)
        f.write(struct.pack(">H", 0))
    assert qemu_img("check", path, check=False).returncode == 2
    rc, out, _ = img(capsys, "check", path)
    assert rc == 2 and "ERROR" in out
    rc, _, _ = img(capsys, "check", "-r", "leaks", path)
    assert rc == 2                          # leaks-only repair leaves corruption alone
    rc, out, _ = img(capsys, "check", "-r", "all", path)
    assert rc == 0, out
    assert qemu_img("check", path, check=False).returncode == 0


def test_compare_reports_the_offset_qemu_reports(tmp_path, capsys):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.raw"
    qemu_img("create", "-f", "qcow2", a, "2M")
    qemu_img("create", "-f", "raw", b, "2M")
    assert img(capsys, "compare", a, b)[0] == 0
    qemu_io(a, "write -P 0x9 1000k 1k")
    theirs = qemu_img("compare", a, b, check=False)
    rc, out, _ = img(capsys, "compare", a, b)
    assert rc == theirs.returncode == 1 and out.strip() == theirs.stdout.strip()
    rc, out, err = img(capsys, "compare", a, tmp_path / "none.raw")
    assert rc == 2 and err.count("\n") == 1


def _coverage(entries, granule=4096) -> list[tuple[bool, bool, int]]:
    cells = []
    for e in entries:
        cells += [(e["data"], e["zero"], e["depth"])] * (e["length"] // granule)
    return cells


def test_map_json_matches_qemu(chain, capsys):
    theirs = json.loads(qemu_img("map", "--output", "json", chain).stdout)
    rc, out, _ = img(capsys, "map", "--output", "json", chain)
    assert rc == 0
    assert _coverage(json.loads(out)) == _coverage(theirs)


def test_resize_snapshot_and_commit(chain, tmp_path, capsys):
    mid = tmp_path / "mid.qcow2"
    rc, _, _ = img(capsys, "resize", mid, "+1M")
    assert rc == 0
    assert json.loads(qemu_img("info", "--output", "json", mid).stdout)["virtual-size"] == SIZE + (1 << 20)
    assert img(capsys, "resize", mid, "1M")[0] == 1          # shrinking needs --shrink
    assert img(capsys, "snapshot", "-c", "before", chain)[0] == 0
    assert "before" in qemu_img("snapshot", "-l", chain).stdout
    qemu_io(chain, "write -P 0x66 0 4k")
    assert img(capsys, "snapshot", "-a", "before", chain)[0] == 0
    assert img(capsys, "snapshot", "-d", "before", chain)[0] == 0
    rc, out, _ = img(capsys, "snapshot", "-l", chain)
    assert rc == 0 and "before" not in out
    qemu_img("convert", "-O", "raw", chain, tmp_path / "expected.raw")
    base_before = (tmp_path / "base.raw").read_bytes()
    rc, out, _ = img(capsys, "commit", "-p", chain)
    assert rc == 0 and "mid.qcow2" in out
    assert (tmp_path / "base.raw").read_bytes() == base_before          # commit goes one level down
    assert qemu_img("check", mid).returncode == 0 and qemu_img("check", chain).returncode == 0
    qemu_img("compare", chain, tmp_path / "expected.raw")
    assert not [e for e in json.loads(qemu_img("map", "--output", "json", chain).stdout) if e["depth"] == 0
                and e["present"]]                                          # the overlay was emptied


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, capsys):
    corrupt = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", corrupt, "1M")
    with open(corrupt, "r+b") as f:
        f.seek(40)
        f.write(struct.pack(">Q", 1 << 40))
    cases = [("info", tmp_path / "missing.qcow2"), ("create", "-f", "qcow2", tmp_path / "x.qcow2", "12Q"),
             ("create", "-f", "qcow2", "-o", "nonsense=1", tmp_path / "y.qcow2", "1M"),
             ("create", "-f", "qcow2", "-o", "cluster_size=3000", tmp_path / "z.qcow2", "1M"),
             ("info", corrupt), ("check", corrupt), ("convert", "-O", "qcow2", corrupt, tmp_path / "o.qcow2"),
             ("create", "-f", "bogus", tmp_path / "w", "1M"), ("snapshot", "-a", "nope", corrupt),
             ("commit", tmp_path / "missing.qcow2")]
    for args in cases:
        rc, out, err = img(capsys, *args)
        assert rc != 0, args
        assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("pyvmm: error:"), (args, err)
    assert "offset 0x10000000000" in img(capsys, "info", corrupt)[2]
    rc, _, err = img(capsys, "frobnicate")
    assert rc == 2 and "Traceback" not in err


@pytest.mark.parametrize("convert_opts", [["-c"], ["-o", "cluster_size=4K"]])
def test_check_json_counts_match_qemu(tmp_path, capsys, convert_opts):
    fill_raw(tmp_path / "s.raw", SIZE, seed=31)
    path = tmp_path / "k.qcow2"
    qemu_img("convert", *convert_opts, "-O", "qcow2", tmp_path / "s.raw", path)
    theirs = json.loads(qemu_img("check", "--output", "json", path).stdout)
    rc, out, _ = img(capsys, "check", "--output", "json", path)
    mine = json.loads(out)
    assert rc == 0
    for key in ("image-end-offset", "total-clusters", "allocated-clusters", "compressed-clusters", "check-errors"):
        assert mine.get(key) == theirs.get(key), key
