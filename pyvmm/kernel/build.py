"""Building a bzImage in an O= build directory, with a one-line progress
display and the full make output kept in <build>/build.log.

The build directory is reused, so a rebuild after a one-option change only
recompiles what the change touches.  The result is checked with pyvmm's own
bzImage parser before it is reported.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..boot.bzimage import parse_bzimage
from ..boot.decompress import detect_format
from ..errors import ImageError
from .config import (BUILD_TOOLS, KernelBuildError, fitted_fragment_changed, generate_config,
                     last_error_line, read_config, require_tools)
from .fragment import FragmentRequest

log = logging.getLogger(__name__)

BUILD_LOG = "build.log"
IMAGE_PATH = "arch/x86/boot/bzImage"
OBJECT_COUNT_FILE = ".pyvmm-objects"   # objects compiled by the last full build
# kbuild's quiet output: "  CC      kernel/fork.o", "  LD      vmlinux" ...
_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*(?: \[[A-Z]\])?)\s+(\S+)")

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    """A built and checked kernel image."""
    image: Path
    size: int
    compression: str
    payload_size: int
    seconds: float
    compiled: int          # objects compiled by this run (0: nothing to do)
    log_path: Path

    def summary(self) -> str:
        return (f"{self.image} ({self.size} bytes, {self.size / 2**20:.2f} MiB; "
                f"payload {self.compression}, {self.payload_size} bytes)")


def check_image(path: Path) -> tuple[int, str, int]:
    """(file size, payload compression, payload size) of the bzImage at
    `path`.  Raises KernelBuildError if it is missing or not a bzImage
    pyvmm can parse."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KernelBuildError(f"no kernel image at {path}: {e.strerror or e}") from None
    try:
        image = parse_bzimage(data)
        fmt = detect_format(image.payload)
    except ImageError as e:
        raise KernelBuildError(f"{path}: built image is unusable: {e}") from None
    return len(data), fmt, len(image.payload)


class ProgressCounter:
    """Counts compiled objects in kbuild's output and reports one line per
    step: "[ 123/560] CC kernel/fork.o"."""

    def __init__(self, expected: int, report: Progress | None):
        self.expected = expected
        self.compiled = 0
        self.report = report

    def feed(self, line: str) -> None:
        m = _STEP.match(line)
        if not m:
            return
        step, target = m.group(1), m.group(2)
        if step.startswith("CC") or step.startswith("AS"):
            self.compiled += 1
        if self.report:
            total = f"/{self.expected}" if self.expected >= self.compiled else ""
            self.report(f"[{self.compiled:4d}{total}] {step} {target}")


def terminal_progress(stream=None) -> Progress:
    """A progress sink rewriting one line of a terminal (stderr by default);
    on a non-terminal, nothing is shown (the log has everything)."""
    import sys
    out = stream or sys.stderr
    if not out.isatty():
        return lambda text: None
    width = 79

    def show(text: str) -> None:
        out.write("\r" + text[:width].ljust(width))
        out.flush()
    return show


def _expected_objects(build_dir: Path) -> int:
    try:
        return int((build_dir / OBJECT_COUNT_FILE).read_text())
    except (OSError, ValueError):
        return 0


def run_make(tree: Path, build_dir: Path, targets: list[str], jobs: int,
             progress: Progress | None = None) -> int:
    """Runs make for `targets` in `build_dir`, output to <build>/build.log.
    Returns the number of objects compiled.  Raises KernelBuildError
    naming the log when make fails."""
    log_path = build_dir / BUILD_LOG
    argv = ["make", "-C", str(tree), f"O={build_dir}", "ARCH=x86_64", f"-j{jobs}", *targets]
    counter = ProgressCounter(_expected_objects(build_dir), progress)
    with open(log_path, "w") as logf:
        logf.write(f"$ {' '.join(argv)}\n")
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, errors="replace")
        except OSError as e:
            raise KernelBuildError(f"cannot run make: {e.strerror or e}; log: {log_path}") from None
        try:
            for line in proc.stdout:
                logf.write(line)
                counter.feed(line)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        raise KernelBuildError(f"kernel build failed (make exit {code}): {last_error_line(log_path)}; "
                               f"log: {log_path}")
    if counter.compiled > counter.expected:
        (build_dir / OBJECT_COUNT_FILE).write_text(str(counter.compiled))
    return counter.compiled


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_kernel(tree: Path, build_dir: Path, jobs: int | None = None, progress: Progress | None = None,
                 request: FragmentRequest | None = None) -> BuildResult:
    """Builds <build_dir>/arch/x86/boot/bzImage (and the modules, if the
    config has CONFIG_MODULES) from `tree`, configuring it
    first (generate_config) if the build directory has no .config,
    `request` is given, or pyvmm's fitted fragment changed since the
    directory was configured (then earlier --enable/--disable edits are
    dropped: give them again).  Raises ToolchainError, KernelBuildError,
    KernelConfigError."""
    config = build_dir / ".config"
    if request is None and config.exists() and fitted_fragment_changed(build_dir):
        log.warning("%s: pyvmm's fitted kernel config changed; reconfiguring", build_dir)
        request = FragmentRequest()
    if request is not None or not config.exists():
        generate_config(tree, build_dir, request)
    values = read_config(config)
    require_tools(tuple(t for t in BUILD_TOOLS if t != "lz4" or values.get("KERNEL_LZ4") == "y"))
    start = time.monotonic()
    targets = ["bzImage"] + (["modules"] if values.get("MODULES") == "y" else [])
    compiled = run_make(tree, build_dir, targets, jobs or default_jobs(), progress)
    seconds = time.monotonic() - start
    image = build_dir / IMAGE_PATH
    size, fmt, payload = check_image(image)
    log.info("built %s in %.1f s (%d objects compiled)", image, seconds, compiled)
    return BuildResult(image, size, fmt, payload, seconds, compiled, build_dir / BUILD_LOG)

