"""Session-wide rules for skips (tests/hostfacts.py says which are allowed).

- A test marked `kvm` skips, naming the host fact, where /dev/kvm is not
  usable; the fact is checked once.  A test parametrized with engine hw or
  hybrid is marked `kvm` here.
- A test marked `from_setup` fails, naming scripts/setup.sh, where what
  setup installs is missing.
- A test marked `opt_in(env=NAME)` is deselected unless NAME=1.
- With PYVMM_CI_KVM_REQUIRED=1 (.ci/run sets it where /dev/kvm exists) and
  /dev/kvm present, a `kvm` test that skips anyway fails: on such a host a
  KVM test must run, unless it skipped for how KVM runs kernel code
  (hostfacts.require_hardware_assist / require_kernel_mode_emulated)."""

from __future__ import annotations

import os

import pytest

from tests import hostfacts

CI_KVM_REQUIRED = "PYVMM_CI_KVM_REQUIRED"


def _kvm_required() -> bool:
    # present is enough: a CI host whose /dev/kvm the tests may not open is misconfigured
    return os.environ.get(CI_KVM_REQUIRED) == "1" and os.path.exists(hostfacts.KVM_DEVICE)


# Engines that run the guest through /dev/kvm: a test parametrized by one of
# them needs KVM, whatever else it does (the one rule exact enough to apply
# by itself; every other KVM test carries the marker or calls require_kvm).
KVM_ENGINES = ("hw", "hybrid")


@pytest.hookimpl(tryfirst=True)     # before `-m` selects on the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("engine") in KVM_ENGINES:
            item.add_marker(pytest.mark.kvm)
    # Opt-in tests (more than CI's time budget) are left out, not skipped:
    # a skip would claim a host fact that is not there.
    left_out = [item for item in items
                if any(os.environ.get(m.kwargs["env"]) != "1" for m in item.iter_markers("opt_in"))]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]
    _slow_files_first(items)


def _slow_files_first(items: list[pytest.Item]) -> None:
    """Files with a `slow` test (a Linux boot: minutes each) go first, whole,
    the rest keeping their order.  `make test` hands out whole files to
    the workers in this order (--dist loadfile --no-loadscope-reorder), so
    the long files start at once and the many short ones fill in after;
    xdist's own order (files with the most tests first) left the boots for
    last, one worker running them alone at the end."""
    def file_of(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]
    slow = {file_of(item) for item in items if item.get_closest_marker("slow") is not None}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(file_of(item), i)

    def rank(item: pytest.Item) -> tuple:
        name = file_of(item)
        listed = SLOW_FILE_ORDER.index(name) if name in SLOW_FILE_ORDER else len(SLOW_FILE_ORDER)
        return (name not in slow, listed, first_seen[name])
    # Whole files move, so a module-scoped fixture (one boot) is still set up once.
    items.sort(key=rank)


# The slow files, longest first (CI durations on a cold cache, 2 workers),
# so that no long file starts last.  The second is the fitted kernel's
# build: it compiles for minutes without bt while the first file's boots
# fill the block store with the stock kernel, which every later stock boot
# then loads instead of translating; two stock boots starting together
# from an empty store would each translate it.  The files that boot the
# fitted kernel (tests/fitted_kernel.py) come after the build, so they
# find it built instead of waiting on its lock.  Files not listed follow.
SLOW_FILE_ORDER = [
    "tests/devices/test_virtio_linux.py",       # stock kernel under bt, then hybrid
    "tests/test_kernel_build.py",               # compile, then the fitted kernel under bt and hybrid
    "tests/firmware/test_disk_boot.py",
    "tests/test_linux_hw.py",                   # kvm_pvm emulates the stock kernel's boot: minutes
    "tests/devices/test_virtio_net_linux.py",
    "tests/test_make_run.py",
    "tests/migration/test_linux_tcp_session.py",
    "tests/net/test_switch_vms.py",
    "tests/test_vmware_backdoor.py",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "from_setup: needs what scripts/setup.sh installs (tests/hostfacts.py)")
    config.addinivalue_line("markers", "opt_in(env): runs only with the environment variable env=1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    hostfacts.current_item = item
    why = hostfacts.kvm_missing()
    if why and item.get_closest_marker("kvm") is not None:
        pytest.skip(why)
    for mark in item.iter_markers("from_setup"):
        hostfacts.require_from_setup(**mark.kwargs)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    hostfacts.current_item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("kvm") is not None and _kvm_required()):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.removeprefix("Skipped: ") in hostfacts.KERNEL_MODE_FACTS:
            return
        report.outcome = "failed"
        report.longrepr = (f"a kvm test skipped where {hostfacts.KVM_DEVICE} is present "
                           f"({CI_KVM_REQUIRED}=1): {reason}")
