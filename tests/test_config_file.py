"""Config as data: `pyvmm run --print-config` writes the VM a command line
describes as JSON, `pyvmm run --config FILE` boots it, and a bad file is a
one-line error."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError

from .asm import multiboot_kernel
from .guest_session import REPO

# A Multiboot kernel that writes 21 to the isa-debug-exit port at once.
EXIT_KERNEL = """
    mov $21, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
"""


def _pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_round_trip_keeps_every_field():
    cfg = VmConfig(kernel="/k", initrd=["/a", "/b"], cmdline="x=1", mem_mib=256, cpus=2, engine="bt",
                   debug_exit=(0x501, 2), fw_cfg_files=[("opt/x", "/f")], guestinfo={"k": "v"},
                   cpuid_hide=["cx16"], deterministic=True)
    assert VmConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("data,message", [
    ([], "a JSON object is needed"),
    ({"mem": 5}, "unknown key 'mem'"),
    ({"cpus": "2"}, 'cpus: "2" is not a valid value'),
    ({"no_reboot": 1}, "no_reboot: 1 is not a valid value"),
    ({"debug_exit": [244]}, "debug_exit: [244] is not a valid value"),
    ({"fw_cfg_files": [["a"]]}, "fw_cfg_files"),
    ({"guestinfo": {"k": 1}}, "guestinfo"),
    ({"engine": "qemu"}, "unknown engine"),
])
def test_bad_config_values_are_refused(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        VmConfig.from_dict(data)


def test_print_config_then_boot_from_it(tmp_path):
    kernel = multiboot_kernel(EXIT_KERNEL)
    printed = _pyvmm("run", "--kernel", str(kernel), "--engine", "bt", "--mem", "32M", "--debug-exit",
                     "--no-reboot", "--no-bt-cache", "--print-config")
    assert printed.returncode == 0, printed.stderr
    data = json.loads(printed.stdout)
    assert (data["kernel"], data["mem_mib"], data["engine"], data["debug_exit"]) == (str(kernel), 32, "bt", [0xF4, 4])
    path = tmp_path / "vm.json"
    path.write_text(printed.stdout)
    ran = _pyvmm("run", "--config", str(path))
    assert ran.returncode == (21 << 1) | 1, ran.stderr


@pytest.mark.parametrize("content,args,message", [
    ("{not json", [], "not JSON"),
    ('{"cpus": 99}', [], "cpus must be 1..64"),
    ("{}", ["--mem", "1G"], "--config describes the whole VM: drop --mem"),
    ('{"kernel": "/nonexistent/k"}', [], "/nonexistent/k: no such file"),
])
def test_bad_config_file_is_one_line_and_nonzero(tmp_path, content, args, message):
    path = tmp_path / "vm.json"
    path.write_text(content)
    proc = _pyvmm("run", "--config", str(path), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("pyvmm: error:"), proc.stderr
    assert message in lines[0]
