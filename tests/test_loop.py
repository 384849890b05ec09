"""The machine's event loop (pyvmm/loop.py): readers, timers and posted
callbacks run on one thread under the machine's lock."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyvmm.loop import EventLoop


@pytest.fixture
def loop():
    lp = EventLoop(threading.RLock())
    lp.start()
    yield lp
    lp.close()


def _wait(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_timers_run_in_deadline_order_and_cancel(loop):
    seen = []
    loop.call_later(0.06, lambda: seen.append("c"))
    loop.call_later(0.02, lambda: seen.append("a"))
    loop.call_later(0.04, lambda: seen.append("b"))
    loop.call_later(0.03, lambda: seen.append("cancelled")).cancel()
    assert _wait(lambda: len(seen) == 3)
    time.sleep(0.05)
    assert seen == ["a", "b", "c"]


def test_callbacks_hold_the_machine_lock_on_the_loop_thread(loop):
    where = []
    done = threading.Event()

    def cb():
        # another thread cannot take the lock while the callback runs
        other = threading.Thread(target=lambda: where.append(loop.lock.acquire(timeout=0.05)))
        other.start()
        other.join()
        where.append(threading.current_thread().name)
        done.set()
    loop.call_soon_threadsafe(cb)
    assert done.wait(5)
    assert where == [False, "pyvmm-events"]


def test_a_reader_runs_when_its_fd_is_readable_until_removed(loop):
    r, w = os.pipe()
    got = []
    try:
        loop.add_reader(r, lambda: got.append(os.read(r, 100)))
        os.write(w, b"one")
        assert _wait(lambda: got == [b"one"])
        assert loop.remove_reader(r)
        assert not loop.remove_reader(r)
        os.write(w, b"two")
        time.sleep(0.1)
        assert got == [b"one"]
    finally:
        os.close(r)
        os.close(w)


def test_a_failing_callback_is_logged_and_the_loop_goes_on(loop, caplog):
    seen = []
    loop.call_soon_threadsafe(lambda: 1 / 0)
    loop.call_soon_threadsafe(lambda: seen.append("after"))
    assert _wait(lambda: seen == ["after"])
    assert loop.errors == 1 and "ZeroDivisionError" in caplog.text


def test_stop_from_a_callback_and_nothing_runs_after_close():
    lp = EventLoop()
    lp.start()
    seen = []
    lp.call_soon_threadsafe(lp.stop)
    assert _wait(lambda: not lp.running)
    lp.call_soon_threadsafe(lambda: seen.append("late"))
    lp.close()
    time.sleep(0.05)
    assert seen == [] and not lp.running
