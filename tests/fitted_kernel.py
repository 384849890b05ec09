"""The fitted kernel (`pyvmm kernel build`) for tests whose subject is not
the stock kernel: it boots to a shell under bt in about 30 s where the
stock Debian kernel takes about 3 minutes, and under hybrid in about 10 s
(CI, 2 workers).  Built once per machine into pyvmm's kernel cache; a warm
build only runs make over the tree.

One build directory serves every caller, so a build holds a lock on it:
two pytest workers that want the kernel at once compile it once, the
second waiting for the first instead of writing the same objects (and
unpacking the same source)."""

from __future__ import annotations

import fcntl
import functools
import os
from contextlib import contextmanager
from pathlib import Path

from pyvmm.kernel.build import BuildResult, build_kernel
from pyvmm.kernel.config import ToolchainError, require_tools
from pyvmm.kernel.fragment import FragmentRequest
from pyvmm.kernel.source import cache_dir, default_build_dir, resolve_source

from .hostfacts import missing_from_setup, require_from_setup


@contextmanager
def _held():
    """The kernel cache to this process alone (the unpacked source and the build)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "tests-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_fitted(progress=None) -> tuple[BuildResult, Path]:
    """Builds (or brings up to date) the fitted kernel under the lock;
    returns the build's result and its directory.  What it needs missing
    fails the test, naming scripts/setup.sh."""
    require_from_setup(paths=["/usr/src/linux-source-*.tar.*"], package="linux-source")
    try:
        require_tools()
    except ToolchainError as e:
        missing_from_setup(str(e))
    with _held():
        tree = resolve_source()
        build_dir = default_build_dir(tree)
        # FragmentRequest(): always the fitted config, even if a user reconfigured
        # the cached build directory; unchanged options rebuild nothing.
        result = build_kernel(tree, build_dir, jobs=os.cpu_count() or 2, progress=progress,
                              request=FragmentRequest())
    return result, build_dir


@functools.cache
def fitted_kernel() -> str:
    """The fitted bzImage's path, built first when needed (once per process:
    even a build with nothing to do runs make over the whole tree, ~20 s)."""
    return str(build_fitted()[0].image)
