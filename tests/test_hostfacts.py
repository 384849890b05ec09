"""The skip rules of tests/conftest.py and tests/hostfacts.py, run on small
inner test files (pytester): a `kvm` test skips only for the host fact, and
under CI on a KVM host not at all; what setup installs is never skipped over."""

from __future__ import annotations

import pytest

from tests import conftest, hostfacts

pytest_plugins = ["pytester"]

INNER = '''
import pytest
from tests import hostfacts

@pytest.mark.kvm
def test_marked_skips_for_no_reason():
    pytest.skip("KVM oracle unavailable")

def test_unmarked_asks_for_kvm_then_skips():
    hostfacts.require_kvm()
    pytest.skip("guest did not boot")

def test_unmarked_skip():
    pytest.skip("not a KVM test")

@pytest.mark.kvm
def test_needs_vtx():
    hostfacts.require_hardware_assist("Linux user space under hw")
    assert False, "ran on a host that emulates kernel mode"

@pytest.mark.kvm
def test_marked_passes():
    pass
'''


@pytest.fixture
def host(pytester, monkeypatch, tmp_path):
    """Runs INNER as if on a host with or without KVM, inside or outside CI."""
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403\n")
    pytester.makepyfile(test_inner=INNER)
    device = tmp_path / "kvm"

    def run(kvm: bool, ci: bool):
        if kvm:
            device.touch()
        monkeypatch.setattr(hostfacts, "KVM_DEVICE", str(device))
        monkeypatch.setattr(hostfacts, "kvm_missing", lambda: None if kvm else "host fact: /dev/kvm is absent")
        monkeypatch.setattr(hostfacts, "hardware_assist", lambda: False)
        monkeypatch.setenv(conftest.CI_KVM_REQUIRED, "1" if ci else "0")
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rsf")
        return {r.nodeid.split("::")[-1]: r.outcome
                for r in result.reprec.getreports("pytest_runtest_logreport")
                if r.when == "call" or r.outcome != "passed"}, result.stdout.str()
    return run


def test_ci_on_a_kvm_host_fails_kvm_tests_that_skip(host):
    outcome, text = host(kvm=True, ci=True)
    assert outcome == {"test_marked_skips_for_no_reason": "failed",
                       "test_unmarked_asks_for_kvm_then_skips": "failed",
                       "test_unmarked_skip": "skipped",
                       "test_needs_vtx": "skipped",        # a host fact: no VT-x/AMD-V here
                       "test_marked_passes": "passed"}, text
    assert "a kvm test skipped where" in text and "KVM oracle unavailable" in text


def test_outside_ci_skips_stay_skips(host):
    outcome, text = host(kvm=True, ci=False)
    assert outcome["test_marked_skips_for_no_reason"] == "skipped", text
    assert outcome["test_unmarked_asks_for_kvm_then_skips"] == "skipped", text


def test_without_kvm_a_kvm_test_skips_before_it_runs_naming_the_fact(host):
    outcome, text = host(kvm=False, ci=True)
    assert outcome == {"test_marked_skips_for_no_reason": "skipped",
                       "test_unmarked_asks_for_kvm_then_skips": "skipped",
                       "test_unmarked_skip": "skipped",
                       "test_needs_vtx": "skipped",
                       "test_marked_passes": "skipped"}, text
    assert "host fact: /dev/kvm is absent" in text and "KVM oracle unavailable" not in text


def test_what_setup_installs_fails_naming_setup(pytester):
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403\n")
    pytester.makepyfile(test_inner='''
from tests.hostfacts import from_setup, require_from_setup

@from_setup(programs=["pyvmm-no-such-program"], package="pyvmm-nothing")
def test_marked():
    pass

def test_called():
    require_from_setup(paths=["/nonexistent/pyvmm-*"])
''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()      # a conftest-hook failure counts as an error
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 2 and "skipped" not in outcomes, outcomes
    text = result.stdout.str()
    assert "pyvmm-no-such-program (package pyvmm-nothing) is missing: scripts/setup.sh installs it" in text
    assert "/nonexistent/pyvmm-* is missing: scripts/setup.sh" in text


def test_engine_hw_or_hybrid_parameters_are_kvm_tests(pytester, monkeypatch):
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403\n")
    pytester.makepyfile(test_inner='''
import pytest

@pytest.mark.parametrize("engine", ["bt", "hw", "hybrid", "qemu"])
def test_engines(engine):
    pass
''')
    monkeypatch.setattr(hostfacts, "kvm_missing", lambda: "host fact: /dev/kvm is absent")
    monkeypatch.setenv(conftest.CI_KVM_REQUIRED, "0")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "kvm", "-rs")
    result.assert_outcomes(skipped=2, deselected=2)
    assert "host fact: /dev/kvm is absent" in result.stdout.str()


@pytest.mark.parametrize("value, outcomes", [("0", {"passed": 1, "deselected": 1}), ("1", {"passed": 2})])
def test_opt_in_tests_are_left_out_not_skipped(pytester, monkeypatch, value, outcomes):
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403\n")
    pytester.makepyfile(test_inner='''
import pytest

@pytest.mark.opt_in(env="PYVMM_TEST_OPT_IN")
def test_long():
    pass

def test_short():
    pass
''')
    monkeypatch.setenv("PYVMM_TEST_OPT_IN", value)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(**outcomes)


def test_the_slow_file_order_names_slow_files_that_exist():
    """tests/conftest.py's SLOW_FILE_ORDER: a renamed or no longer slow file
    would silently fall out of the order CI's schedule was measured with."""
    from pathlib import Path

    from tests.conftest import SLOW_FILE_ORDER
    repo = Path(__file__).resolve().parent.parent
    assert len(set(SLOW_FILE_ORDER)) == len(SLOW_FILE_ORDER)
    for name in SLOW_FILE_ORDER:
        text = (repo / name).read_text()
        assert "pytest.mark.slow" in text, f"{name} has no slow test"
