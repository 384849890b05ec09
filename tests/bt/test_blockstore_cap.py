"""The block store's cap and memory (engines/bt/blockstore.py): past its cap
the least recently used groups of blocks go first and the file shrinks
back under it; lookups do not write; a big store is neither mapped nor read
whole, so opening it and loading from it leaves the RSS nearly where it
was; `pyvmm cache` shows and clears it."""

from __future__ import annotations

import json
import re
import sqlite3

from pyvmm.cli.main import main
from pyvmm.engines.bt.blockstore import BlockStore, block_key

MIB = 1 << 20
BODY = compile("x = " + repr(bytes(range(256)) * 4), "<block>", "exec")   # ~1 KiB marshalled


def _page(n: int) -> bytes:
    return n.to_bytes(4, "little") * 1024


def _key(page_no: int, block: int) -> bytes:
    """Block `block` of code page `page_no` (its own linear page too)."""
    return block_key(0x40_0000 + (page_no << 12) + block * 4, (64, 64, 0), False, _page(page_no))


def _put_page(store: BlockStore, page_no: int, blocks: int) -> None:
    for b in range(blocks):
        store.put(_key(page_no, b), None, False, BODY)


def _status_mib(field: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def test_cap_holds_and_least_recently_used_goes_first(tmp_path):
    store = BlockStore(tmp_path, tag="cap", max_bytes=MIB)
    _put_page(store, 1, 20)            # A: written first ...
    _put_page(store, 2, 600)           # B: ... then B
    store.close()
    store = BlockStore(tmp_path, tag="cap", max_bytes=MIB)
    assert store.get(_key(1, 0)) is not None      # ... but A is used again after B
    for page_no in range(3, 13):                  # C: 500 new blocks push the store past its cap
        _put_page(store, page_no, 50)
    store.close()
    assert store.stats()["evicted"] >= 600
    assert store.path.stat().st_size <= MIB
    again = BlockStore(tmp_path, tag="cap", max_bytes=MIB)
    assert all(again.get(_key(2, b)) is None for b in range(0, 600, 50))    # B evicted
    assert again.get(_key(1, 5)) is not None                                 # A kept
    assert again.get(_key(12, 49)) is not None                               # the newest kept
    again.close()


def test_a_store_over_a_lowered_cap_shrinks_on_open(tmp_path):
    store = BlockStore(tmp_path, tag="low", max_bytes=64 * MIB)
    for page_no in range(8):
        _put_page(store, page_no, 300)
    store.close()
    assert store.path.stat().st_size > 2 * MIB
    small = BlockStore(tmp_path, tag="low", max_bytes=2 * MIB)
    small.close()
    assert small.path.stat().st_size <= 2 * MIB
    assert small.stats()["evicted"] > 0


def test_lookups_do_not_write_per_block(tmp_path):
    store = BlockStore(tmp_path, tag="hot", max_bytes=64 * MIB)
    _put_page(store, 1, 100)
    store.close()
    store = BlockStore(tmp_path, tag="hot", max_bytes=64 * MIB)
    assert all(store.get(_key(1, b)) is not None for b in range(100))
    assert store._writer.queue.empty()            # nothing written on the way
    assert len(store._uses) == 1                  # one use noted for the whole page
    store.close()
    with sqlite3.connect(store.path) as db:
        (used,), = db.execute("SELECT used FROM groups").fetchall()
    assert used > 0


def test_a_large_store_costs_little_rss(tmp_path):
    store = BlockStore(tmp_path, tag="big", max_bytes=1 << 30)
    big = compile("x = " + repr(bytes(range(256)) * 15), "<block>", "exec")    # ~4 KiB marshalled
    for page_no in range(3200):                      # 51200 blocks, 200 MiB
        for b in range(16):
            store.put(_key(page_no, b), None, False, big)
    store.close()
    assert store.path.stat().st_size > 200 * MIB
    before, before_file = _status_mib("VmRSS"), _status_mib("RssFile")
    store = BlockStore(tmp_path, tag="big", max_bytes=1 << 30)
    hits = sum(store.get(_key(page_no, b)) is not None for page_no in range(0, 3200, 16) for b in range(16))
    grown, grown_file = _status_mib("VmRSS") - before, _status_mib("RssFile") - before_file
    store.close()
    assert hits == 200 * 16
    assert grown < 40, f"RSS grew {grown:.0f} MiB opening a 200 MiB store and loading 13 MiB of it"
    assert grown_file < 8, f"{grown_file:.0f} MiB of the store file mapped"


def test_cache_show_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYVMM_BT_CACHE", str(tmp_path))
    monkeypatch.setenv("PYVMM_BT_CACHE_MAX", "64M")
    store = BlockStore(tmp_path)                  # this translator version's file
    _put_page(store, 1, 30)
    store.close()
    assert main(["cache", "show", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["location"] == str(tmp_path) and info["rows"] == 30 and info["max_bytes"] == 64 * MIB
    assert info["bytes"] == store.path.stat().st_size and info["files"][0]["current"]
    assert main(["cache"]) == 0
    text = capsys.readouterr().out
    assert "rows:     30" in text and "64.0 MiB" in text
    assert main(["cache", "clear"]) == 0
    assert "cleared" in capsys.readouterr().out and not store.path.exists()
    assert main(["cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 0


def test_cache_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYVMM_BT_CACHE", str(tmp_path))
    monkeypatch.setenv("PYVMM_BT_CACHE_MAX", "lots")
    assert main(["cache"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad cache size 'lots'" in err
    assert main(["cache", "frob"]) == 2
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("PYVMM_BT_CACHE_MAX", "1G")
    assert main(["cache", "--bt-cache", str(tmp_path / "f")]) == 1
    assert capsys.readouterr().err.strip().endswith("not a directory")


def test_run_option_sets_the_cap(tmp_path, monkeypatch, capsys):
    from pyvmm.cli.main import build_parser, config_from_args
    monkeypatch.delenv("PYVMM_BT_CACHE_MAX", raising=False)     # restored after the test
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 4096)
    common = ["run", "--engine", "bt", "--kernel", str(kernel), "--initrd", str(kernel), "--bt-cache", str(tmp_path)]
    assert main([*common, "--bt-cache-max", "bogus"]) == 1
    assert capsys.readouterr().err.strip() == "pyvmm: error: bad cache size 'bogus' (e.g. 256M, 1G)"
    config_from_args(build_parser().parse_args([*common, "--bt-cache-max", "96M"]))
    store = BlockStore(tmp_path, tag="opt")
    store.close()
    assert store.max_bytes == 96 * MIB


def test_other_versions_go_first_when_the_directory_is_over_the_cap(tmp_path):
    old = BlockStore(tmp_path, tag="older", max_bytes=64 * MIB)
    for page_no in range(3):
        _put_page(old, page_no, 300)
    old.close()
    assert old.path.stat().st_size > MIB
    small = BlockStore(tmp_path, tag="newer", max_bytes=4 * MIB)     # room for both: both kept
    small.close()
    assert old.path.exists()
    tiny = BlockStore(tmp_path, tag="newest", max_bytes=MIB)         # not: the oldest other goes,
    tiny.close()                                                     # and no more than that
    assert not old.path.exists() and small.path.exists() and tiny.path.exists()
