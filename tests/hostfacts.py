"""The host facts a test may depend on, each checked once per session.

A test may skip only for a fact about the host that no setup can change:
no usable /dev/kvm, or whether KVM has VT-x/AMD-V (runs guest kernel code
natively) or emulates guest kernel mode (kvm_pvm).  What `scripts/setup.sh`
installs (Debian packages, the Python test extras) is never skipped over:
when it is missing, setup did not run, and the test fails saying so.

    from tests.hostfacts import from_setup, require_from_setup
    @pytest.mark.kvm            # tests/conftest.py skips it, with the fact, where KVM is missing
    @from_setup(programs=["cpio"], package="cpio")     # fails it when setup did not run
    def test_x():
        require_from_setup(programs=["as", "ld"])      # the same, from inside a test or fixture
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
from collections.abc import Sequence
from typing import NoReturn

import pytest

KVM_DEVICE = "/dev/kvm"
SETUP = "scripts/setup.sh"

# The item now running (tests/conftest.py sets it), so that require_kvm()
# can mark a test that asks for KVM without carrying the `kvm` marker.
current_item: pytest.Item | None = None
# Skip reasons given here for how KVM runs guest kernel code: on a host with
# a usable /dev/kvm these are the only skips a `kvm` test may end in.
KERNEL_MODE_FACTS: set[str] = set()


@functools.cache
def kvm_missing() -> str | None:
    """None when /dev/kvm is usable here, else the host fact that stops it."""
    if not os.path.exists(KVM_DEVICE):
        return f"host fact: {KVM_DEVICE} is absent"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"host fact: {KVM_DEVICE} is not accessible (not root, not in the kvm group)"
    return None


@functools.cache
def hardware_assist() -> bool:
    """True when KVM runs guest kernel code natively (VT-x/AMD-V, no kvm_pvm)."""
    from pyvmm.engines.kvm import hostfit
    return not hostfit.kernel_mode_emulated()


def _skip_for_kernel_mode(fact: str) -> NoReturn:
    reason = f"host fact: {fact}"
    KERNEL_MODE_FACTS.add(reason)
    pytest.skip(reason)


def require_hardware_assist(what: str) -> None:
    """Skips the calling test where KVM emulates guest kernel mode (kvm_pvm,
    no VT-x/AMD-V); `what` says what cannot run there."""
    require_kvm()
    if not hardware_assist():
        _skip_for_kernel_mode(f"KVM emulates guest kernel mode here (kvm_pvm, no VT-x/AMD-V): {what}")


def require_kernel_mode_emulated(what: str) -> None:
    """Skips the calling test where KVM runs guest kernel code natively
    (VT-x/AMD-V); `what` says what only an emulating KVM shows."""
    require_kvm()
    if hardware_assist():
        _skip_for_kernel_mode(f"KVM runs guest kernel code natively here (VT-x/AMD-V): {what}")


def require_kvm() -> None:
    """Skips the calling test, naming the host fact, when /dev/kvm is not
    usable.  A test that gets here counts as a `kvm` test from now on, so
    that CI (PYVMM_CI_KVM_REQUIRED) notices its skip even if it is unmarked."""
    if current_item is not None and current_item.get_closest_marker("kvm") is None:
        current_item.add_marker(pytest.mark.kvm)
    why = kvm_missing()
    if why:
        pytest.skip(why)


def missing_from_setup(what: str) -> NoReturn:
    """Fails the calling test: `what` is something scripts/setup.sh installs."""
    pytest.fail(f"{what} is missing: {SETUP} installs it (run `make test`, or `bash {SETUP}`)",
                pytrace=False)


def require_from_setup(programs: Sequence[str] = (), modules: Sequence[str] = (),
                       paths: Sequence[str] = (), package: str = "") -> None:
    """Fails the calling test when a program on PATH, a Python module or a
    file (glob) that scripts/setup.sh provides is absent; `package` names
    what provides them (a Debian package, the .[test] extras) in the message."""
    import importlib.util
    missing = [p for p in programs if shutil.which(p) is None]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    missing += [p for p in paths if not glob.glob(p)]
    if missing:
        missing_from_setup(", ".join(missing) + (f" (package {package})" if package else ""))


def from_setup(programs: Sequence[str] = (), modules: Sequence[str] = (),
               paths: Sequence[str] = (), package: str = "") -> pytest.MarkDecorator:
    """A marker for tests that need what scripts/setup.sh installs:
    tests/conftest.py runs require_from_setup() with these arguments first."""
    return pytest.mark.from_setup(programs=tuple(programs), modules=tuple(modules),
                                  paths=tuple(paths), package=package)


def debian_cloud_kernels() -> list[str]:
    """The installed Debian cloud kernels (linux-image-cloud-amd64), newest last."""
    return sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))


def require_debian_cloud_kernel() -> str:
    """The newest Debian cloud kernel; fails the test when none is installed."""
    kernels = debian_cloud_kernels()
    if not kernels:
        missing_from_setup("the Debian cloud kernel /boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)")
    return kernels[-1]
