"""The on-disk block store (engines/bt/blockstore.py): a second run loads
the blocks the first compiled and computes the same; keys follow the guest
bytes and the mode; a broken store only turns itself off."""

from __future__ import annotations

import sqlite3

from pyvmm.config import VmConfig
from pyvmm.engines.bt.blockstore import BlockStore, block_key

from tests.modeguests import boot_for, expected_user_result, user_result, user_guest
from tests.rawguest import run_machine

PAGE = bytes(range(256)) * 16


def _run(tmp_path, code: bytes):
    cfg = VmConfig(mem_mib=64, engine="bt", irqchip=False, no_reboot=True, block_store=str(tmp_path))
    m, state = run_machine(cfg, boot_for(code), timeout=120)
    return state, m.engine.stats()


def test_second_run_loads_every_block_and_computes_the_same(tmp_path):
    code = user_guest(outer=6, user_work=40, kernel_work=3)
    want = expected_user_result(6, 40, 3)
    first, cold = _run(tmp_path, code)
    second, warm = _run(tmp_path, code)
    assert user_result(first.regs) == want and user_result(second.regs) == want
    assert cold["blocks_loaded"] == 0 and cold["block_store"]["written"] == cold["blocks_compiled"] > 10
    assert warm["blocks_compiled"] == 0
    assert warm["blocks_loaded"] == cold["blocks_compiled"]
    assert first.rip == second.rip and first.regs == second.regs


def test_changed_guest_code_misses(tmp_path):
    _run(tmp_path, user_guest(outer=2, user_work=5))
    state, stats = _run(tmp_path, user_guest(outer=2, user_work=7))   # one immediate differs
    assert user_result(state.regs) == expected_user_result(2, 7)
    assert stats["blocks_compiled"] > 0        # blocks on the changed page were compiled again


def test_keys_depend_on_address_mode_and_page_bytes():
    base = block_key(0x1000, (64, 64, 0), False, PAGE)
    assert block_key(0x1000, (64, 64, 0), False, PAGE) == base
    changed = PAGE[:100] + b"\x90" + PAGE[101:]
    others = [block_key(0x2000, (64, 64, 0), False, PAGE), block_key(0x1000, (64, 64, 3), False, PAGE),
              block_key(0x1000, (32, 32, 0), False, PAGE), block_key(0x1000, (64, 64, 0), True, PAGE),
              block_key(0x1000, (64, 64, 0), False, changed)]
    assert len({base, *others}) == 6


def test_round_trip_and_versions_kept_apart(tmp_path):
    code = compile("x = 41 + 1", "<t>", "exec")
    key = block_key(0x1000, (64, 64, 0), False, PAGE)
    store = BlockStore(tmp_path, tag="a")
    store.put(key, b"\x0f\x0b", True, code)
    store.close()
    again = BlockStore(tmp_path, tag="a")
    ext, crosses, loaded = again.get(key)
    ns: dict = {}
    exec(loaded, ns)
    assert (ext, crosses, ns["x"]) == (b"\x0f\x0b", True, 42)
    assert again.get(block_key(0x1000, (64, 64, 3), False, PAGE)) is None
    assert BlockStore(tmp_path, tag="b").get(key) is None     # another translator version


def test_a_broken_store_is_turned_off_not_raised(tmp_path):
    store = BlockStore(tmp_path, tag="c")
    store.close()
    store.path.write_bytes(b"this is not an SQLite database" * 100)
    broken = BlockStore(tmp_path, tag="c")
    key = block_key(0, (64, 64, 0), False, PAGE)
    assert broken.get(key) is None
    broken.put(key, None, False, compile("pass", "<t>", "exec"))
    broken.close()
    assert not broken.enabled


def test_a_store_that_cannot_be_created_is_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert not BlockStore(blocker / "sub", tag="d").enabled


def test_rows_hold_the_whole_key(tmp_path):
    store = BlockStore(tmp_path, tag="e")
    key = block_key(0x5000, (64, 64, 0), False, PAGE)
    store.put(key, None, False, compile("pass", "<t>", "exec"))
    store.close()
    with sqlite3.connect(store.path) as db:
        (stored,), = db.execute("SELECT k FROM blocks").fetchall()
    assert stored == key
