"""What pyvmm changes in a Linux boot under the bt engine (bootprep.py):
the kernel parameters it appends and the host-side initrd inflate."""

from __future__ import annotations

import gzip
import os

from pyvmm.config import VmConfig
from pyvmm.engines.bt import bootprep


def test_kernel_args_are_added_once_and_the_users_values_win():
    extra = bootprep.kernel_args("console=ttyS0 mitigations=auto")
    words = extra.split()
    assert "mitigations=off" not in words           # the user named it
    assert "cryptomgr.notests" in words and "init_on_alloc=0" in words and "noreplace-smp" in words
    assert len(words) == len(set(words))
    again = bootprep.kernel_args("console=ttyS0 mitigations=auto", extra)
    assert again == extra                           # nothing added twice


def test_prepare_leaves_other_engines_and_non_linux_kernels_alone(tmp_path):
    cfg = VmConfig(engine="hw", kernel="/nonexistent")
    assert bootprep.prepare(cfg)[0] is cfg
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\xf4" * 64)
    cfg = VmConfig(engine="bt", kernel=str(raw), initrd=[str(raw)])
    assert bootprep.prepare(cfg)[0] is cfg


def _linux_kernel() -> str:
    from tests.hostfacts import require_debian_cloud_kernel
    return require_debian_cloud_kernel()


def test_prepare_inflates_a_gzip_initrd_and_cleans_up(tmp_path):
    kernel = _linux_kernel()
    data = b"070701" + os.urandom(4000)
    gz = tmp_path / "initrd.gz"
    gz.write_bytes(gzip.compress(data))
    cfg = VmConfig(engine="bt", kernel=kernel, initrd=[str(gz)], cmdline="console=ttyS0")
    new, cleanup = bootprep.prepare(cfg)
    try:
        assert new.initrd != cfg.initrd
        with open(new.initrd[0], "rb") as f:
            assert f.read() == data
        assert "cryptomgr.notests" in new.linux_cmdline_extra
        assert new.cmdline == cfg.cmdline and cfg.linux_cmdline_extra == ""
    finally:
        cleanup()
    assert not os.path.exists(new.initrd[0])


def test_prepare_keeps_an_uncompressed_initrd(tmp_path):
    kernel = _linux_kernel()
    plain = tmp_path / "initrd.cpio"
    plain.write_bytes(b"070701" + b"0" * 100)
    cfg = VmConfig(engine="bt", kernel=kernel, initrd=[str(plain)], host_decompress=True)
    new, cleanup = bootprep.prepare(cfg)
    cleanup()
    assert new.initrd == cfg.initrd
