"""What pyvmm changes in a Linux boot under `--engine bt` to save emulated
time, none of which changes what the guest ends up doing:

* kernel parameters (`KERNEL_ARGS`), appended through
  config.linux_cmdline_extra, each only when the command line does not
  already name that parameter, so a user's own value wins;
* a gzip-compressed initramfs is decompressed on the host (as the bzImage
  already is, config.host_decompress), so the guest copies the cpio
  instead of inflating it instruction by instruction.

`prepare(config)` returns the config to boot from and a cleanup callable
(removes the temporary initrd).  Raises ConfigError when an initrd cannot
be read or written."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import tempfile
import zlib
from typing import Callable

from ...config import VmConfig
from ...errors import ConfigError

log = logging.getLogger(__name__)

# Each entry: (parameter, why).  Measured with --deterministic (guest
# instructions, which do not depend on host load), stock Debian 6.1 cloud
# kernel, 1 vCPU, 512 MiB, pyvmm's busybox initramfs:
#   the first five only:                1253 M instructions to "Run /init"
#   + cryptomgr.notests, init_on_alloc=0
#     and the host-side initrd inflate:  338 M  (-915 M, -73 %)
# Of the 915 M, ~870 M are the crypto self-tests (RSA, DH and ECC private-key
# operations done instruction by instruction, after "evm:" and around
# "Loading compiled-in X.509 certificates") and ~30 M the in-guest gunzip
# of the initramfs ("Trying to unpack rootfs image").  The first five
# were on in every measured boot (not measured one by one): they skip work
# a virtual CPU never needs (speculation workarounds, TSC watchdog and
# timer-through-IOAPIC checks, PS/2 AUX probe, waiting for entropy).
# noreplace-smp, fitted kernel, 1 vCPU, 256 MiB, warm block store: 36.7 M
# -> 35.6 M instructions to the marker and 6.7 k -> 5.1 k translation
# invalidations (a LOCK prefix patched out is a code write).
KERNEL_ARGS: tuple[tuple[str, str], ...] = (
    ("mitigations=off", "no speculative-execution workarounds to patch in or run on every entry"),
    ("tsc=reliable", "no TSC watchdog against other clocksources"),
    ("no_timer_check", "no check that the timer interrupt works through the IOAPIC"),
    ("i8042.noaux", "no probing for a PS/2 mouse pyvmm does not have"),
    ("random.trust_cpu=on", "the CRNG may be seeded without waiting for entropy"),
    ("cryptomgr.notests", "no self-tests of every crypto algorithm at registration (~870 M instructions)"),
    ("init_on_alloc=0", "no zeroing of every allocated page (Debian turns it on)"),
    ("noreplace-smp", "no rewriting of every LOCK prefix on a one-vCPU boot: the translator ignores LOCK, "
                      "and each patch is a text_poke (temporary mm, TLB flush) that also drops translations"),
    ("initcall_blacklist=trace_eval_init,blake2s_mod_init",
     "no rewriting of every built-in trace event's format with enum values (a kworker's string "
     "search over all events at boot) and no BLAKE2s self-test: 362 M -> 325 M instructions to the "
     "stock kernel's shell (--deterministic, 256 MiB); tracefs formats then name those enums "
     "instead of giving their values"),
    ("nokaslr", "the kernel at its link address, where the block store keeps its translations: a bzImage "
                "decompressed in the guest (a BIOS boot, --no-host-decompress) otherwise picks a new random "
                "base each boot and translates the whole kernel afresh"),
)


def kernel_args(cmdline: str, extra: str = "") -> str:
    """`extra` plus each KERNEL_ARGS parameter whose name neither cmdline
    nor extra has (the words pyvmm appends to a Linux command line)."""
    have = {w.split("=", 1)[0] for w in f"{cmdline} {extra}".split()}
    add = [a for a, _ in KERNEL_ARGS if a.split("=", 1)[0] not in have]
    return " ".join([extra.strip(), *add]).strip()


def _is_linux(path: str) -> bool:
    from ...boot.bzimage import looks_like_bzimage
    from ...boot.elf import is_linux_elf
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return looks_like_bzimage(data) or is_linux_elf(data)


def _inflate_initrd(path: str) -> str | None:
    """A temporary file holding the decompressed initrd, or None when it is
    not a (whole) gzip file. Raises ConfigError on I/O errors."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if data[:2] != b"\x1f\x8b":
        return None
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return None          # not all gzip (e.g. concatenated archives): leave it to the guest
    try:
        fd, tmp = tempfile.mkstemp(prefix="pyvmm-bt-initrd-", suffix=".cpio")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
    except OSError as e:
        raise ConfigError(f"temporary initrd: {e.strerror}") from None
    log.debug("bt: initrd %s decompressed on the host (%d -> %d bytes)", path, len(data), len(raw))
    return tmp


# Under --engine hybrid, user code runs under KVM and its rdtsc reads the
# host's TSC where KVM ignores CR4.TSD (kvm_pvm, measured; engines/hybrid/
# switch.py), while the kernel's TSC is bt's: a TSC clocksource would hand
# user space (the vDSO) a clock from the wrong counter.  Without it, Linux
# picks the ACPI PM timer and the vDSO falls back to system calls.
HYBRID_ARGS = "tsc=unstable"


def prepare(config: VmConfig) -> tuple[VmConfig, Callable[[], None]]:
    """The config a bt (or hybrid) Linux boot uses, and a cleanup to call once loaded."""
    if config.engine not in ("bt", "hybrid") or not config.kernel or not _is_linux(os.fspath(config.kernel)):
        return config, lambda: None
    extra = config.linux_cmdline_extra
    if config.engine == "hybrid" and "tsc=" not in f"{config.cmdline} {extra}":
        extra = f"{extra} {HYBRID_ARGS}".strip()
    changes: dict = {"linux_cmdline_extra": kernel_args(config.cmdline, extra)}
    temps: list[str] = []
    if config.host_decompress and len(config.initrd) == 1:
        tmp = _inflate_initrd(config.initrd[0])
        if tmp is not None:
            temps.append(tmp)
            changes["initrd"] = [tmp]

    def cleanup() -> None:
        for t in temps:
            try:
                os.unlink(t)
            except OSError:
                pass

    return dataclasses.replace(config, **changes), cleanup
