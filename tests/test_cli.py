"""The command line: option parsing and one-line errors, no guest needed."""

import subprocess
import sys

import pytest

from pyvmm.cli.main import build_parser, config_from_args, parse_debug_exit, parse_fw_cfg
from pyvmm.errors import ConfigError

from .guest_session import REPO


def test_debug_exit_defaults_and_values():
    assert parse_debug_exit("") == (0xF4, 4)
    assert parse_debug_exit("iobase=0x501,iosize=2") == (0x501, 2)
    for bad in ("iobase=", "port=5", "iosize=3", "iobase=0xffff,iosize=4"):
        with pytest.raises(ConfigError):
            parse_debug_exit(bad)


def test_fw_cfg_option():
    assert parse_fw_cfg("name=opt/pyvmm/x,file=/tmp/x") == ("opt/pyvmm/x", "/tmp/x")
    for bad in ("name=a", "file=b", "name=a,file=b,extra=c", "name=" + "n" * 56 + ",file=b"):
        with pytest.raises(ConfigError):
            parse_fw_cfg(bad)


def test_qemu_style_aliases(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    args = build_parser().parse_args(["run", "-kernel", str(kernel), "-initrd", str(kernel), "-m", "1G",
                                      "-smp", "2", "--engine", "bt", "--debug-exit"])
    cfg = config_from_args(args)
    assert (cfg.mem_mib, cfg.cpus, cfg.debug_exit) == (1024, 2, (0xF4, 4))


@pytest.mark.parametrize("args,message", [
    (["run", "--kernel", "/nonexistent/kernel", "--engine", "bt"], "no such file"),
    (["run", "--kernel", "/etc/hostname", "--engine", "bt"], "not a bzImage"),
    (["run", "--kernel", "/etc/hostname", "-m", "lots", "--engine", "bt"], "bad memory size"),
    (["run", "--kernel", "/etc/hostname", "--cpus", "0", "--engine", "bt"], "cpus"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    proc = subprocess.run([sys.executable, "-m", "pyvmm", *args], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error:"), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
