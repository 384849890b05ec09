"""`pyvmm kernel config`: the fitted fragment, .config generation on a real
Linux tree (Debian's linux-source, unpacked into the cache), user edits,
and the one-line errors for bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pyvmm.errors import VmmError
from pyvmm.kernel import build as kbuild
from pyvmm.kernel.cli import add_kernel_parser
from pyvmm.kernel.config import (KernelBuildError, KernelConfigError, ToolchainError, check_config,
                                 generate_config, read_config, require_tools, run_logged)
from pyvmm.kernel.fragment import FITTED, FORBIDDEN, FragmentRequest, normalize_symbol, render
from pyvmm.kernel.source import KernelSourceError, check_tree, resolve_source
from tests.hostfacts import from_setup, require_from_setup

needs_source = from_setup(paths=["/usr/src/linux-source-*.tar.*"], package="linux-source")


needs_tools = from_setup(programs=["make", "gcc", "flex", "bison"], package="make, gcc, flex, bison")


# ---- the fragment as data -------------------------------------------------

def test_normalize_symbol():
    assert normalize_symbol("CONFIG_virtio_blk") == "VIRTIO_BLK"
    assert normalize_symbol(" SMP ") == "SMP"
    with pytest.raises(ValueError):
        normalize_symbol("FOO=y")
    with pytest.raises(ValueError):
        normalize_symbol("CONFIG_")


def test_request_edits_and_forbidden():
    req = FragmentRequest(enable=["CONFIG_PCI"], disable=["virtio_net"], module=["EXT4_FS"])
    want = req.symbols()
    assert want["PCI"] == "y" and want["VIRTIO_NET"] == "n"
    assert want["EXT4_FS"] == "m" and want["MODULES"] == "y"
    assert "PCI" not in req.forbidden() and "MODULES" not in req.forbidden()
    assert set(FragmentRequest().forbidden()) == set(FORBIDDEN)


def test_render_is_config_syntax():
    text = render({"SMP": "y", "PCI": "n", "NR_CPUS": "8"})
    assert "CONFIG_SMP=y\n" in text
    assert "# CONFIG_PCI is not set\n" in text
    assert "CONFIG_NR_CPUS=8\n" in text


def test_fitted_fragment_covers_pyvmm_hardware():
    for sym in ("64BIT", "SMP", "SERIAL_8250_CONSOLE", "SERIO_I8042", "RTC_DRV_CMOS",
                "VIRTIO_MMIO_CMDLINE_DEVICES", "PCI_MSI", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET", "VIRTIO_CONSOLE",
                "HW_RANDOM_VIRTIO", "KVM_GUEST", "BLK_DEV_INITRD", "RD_GZIP", "KERNEL_LZ4",
                "BINFMT_SCRIPT", "DEVTMPFS_MOUNT", "PROC_SYSCTL", "POSIX_TIMERS"):
        assert FITTED[sym] == "y", sym
    assert not set(FITTED) & set(FORBIDDEN)


def test_read_and_check_config(tmp_path):
    cfg = tmp_path / ".config"
    cfg.write_text("CONFIG_SMP=y\n# CONFIG_PCI is not set\nCONFIG_NR_CPUS=64\nCONFIG_USB=m\n")
    values = read_config(cfg)
    assert values == {"SMP": "y", "PCI": "n", "NR_CPUS": "64", "USB": "m"}
    missing, present = check_config(values, {"SMP": "y", "PCI": "n", "TTY": "y"}, ("USB", "PCI"))
    assert missing == ["TTY (wanted y, got n)"]
    assert present == ["USB"]


# ---- bad input: one line, pointing at the log ------------------------------

def test_not_a_kernel_tree(tmp_path):
    (tmp_path / "Makefile").write_text("all:\n")
    with pytest.raises(KernelSourceError, match="not a Linux kernel source tree") as e:
        check_tree(tmp_path)
    assert "\n" not in str(e.value) and "Kconfig" in str(e.value)
    with pytest.raises(KernelSourceError, match="not a directory"):
        resolve_source(tmp_path / "nowhere")


def test_missing_toolchain(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match="make, gcc, flex, bison.*install-kernel-build-deps"):
        require_tools(("make", "gcc", "flex", "bison"))


def test_failed_step_names_log(tmp_path):
    log = tmp_path / "x.log"
    with pytest.raises(KernelBuildError) as e:
        run_logged(["sh", "-c", "echo ok; echo 'foo.c:3:1: error: expected ;' ; echo done; exit 2"],
                   log, "step")
    msg = str(e.value)
    assert "exit 2" in msg and "error: expected ;" in msg and str(log) in msg and "\n" not in msg
    assert "foo.c:3:1" in log.read_text()


@from_setup(programs=["make"], package="make")
def test_failed_build_counts_and_names_log(tmp_path):
    """run_make on a fake tree whose make fails like a compile error."""
    tree, build = tmp_path / "src", tmp_path / "build"
    tree.mkdir()
    build.mkdir()
    (tree / "Makefile").write_text(
        "bzImage:\n\t@echo '  CC      kernel/a.o'\n\t@echo '  CC      kernel/b.o'\n"
        "\t@echo 'kernel/c.c:9:2: error: boom'\n\t@exit 1\n")
    seen: list[str] = []
    with pytest.raises(KernelBuildError) as e:
        kbuild.run_make(tree, build, ["bzImage"], 1, seen.append)
    assert "error: boom" in str(e.value) and str(build / "build.log") in str(e.value)
    assert seen[-1].strip().startswith("[   2]") and seen[-1].endswith("CC kernel/b.o")


def test_check_image_rejects_non_bzimage(tmp_path):
    bad = tmp_path / "bzImage"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(KernelBuildError, match="unusable: not a bzImage"):
        kbuild.check_image(bad)
    with pytest.raises(KernelBuildError, match="no kernel image"):
        kbuild.check_image(tmp_path / "missing")


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """What pyvmm/cli/main.py does with a kernel subcommand."""
    parser = argparse.ArgumentParser(prog="pyvmm")
    add_kernel_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.kernel_handler(args), ""
    except VmmError as e:
        return e.exit_code, f"pyvmm: error: {e}"


def test_cli_bad_source_is_one_line(tmp_path, capsys):
    code, err = _run_cli(["kernel", "config", "--source", str(tmp_path)])
    assert code == 1 and err.count("\n") == 0 and "not a Linux kernel source tree" in err


def test_cli_list(capsys):
    code, _ = _run_cli(["kernel", "config", "--list"])
    out = capsys.readouterr().out
    assert code == 0 and "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y" in out


# ---- the real tree -------------------------------------------------------

@pytest.fixture(scope="module")
def tree() -> Path:
    require_from_setup(paths=["/usr/src/linux-source-*.tar.*"], package="linux-source")
    require_from_setup(programs=["make", "gcc", "flex", "bison"], package="make, gcc, flex, bison")
    return resolve_source()


@pytest.fixture(scope="module")
def fitted(tree, tmp_path_factory):
    return generate_config(tree, tmp_path_factory.mktemp("kbuild-fitted"))


def test_fitted_config_after_olddefconfig(fitted):
    values = fitted.values
    for sym, want in FITTED.items():
        assert values.get(sym) == want, f"{sym}: {values.get(sym)}"
    for sym in FORBIDDEN:
        assert values.get(sym, "n") == "n", sym
    # tinyconfig's defaults we replaced, and things implied by the fragment
    assert values.get("KERNEL_XZ", "n") == "n"
    assert values["X86_LOCAL_APIC"] == "y" and values["X86_IO_APIC"] == "y"
    assert values["PARAVIRT_CLOCK"] == "y"           # kvm-clock
    assert values.get("RD_XZ", "n") == "n"           # only the initramfs compression pyvmm uses
    # nothing else: the fitted kernel is small
    assert len(fitted.enabled()) < 700
    assert (fitted.build_dir / "config.log").read_text().count("$ make") == 3


def test_user_edits_take_effect(tree, tmp_path):
    req = FragmentRequest(enable=["UNIX"], disable=["VIRTIO_NET"], module=["VIRTIO_BLK"])
    result = generate_config(tree, tmp_path / "b", req)
    v = result.values
    assert v["UNIX"] == "y"
    assert v.get("VIRTIO_NET", "n") == "n"
    assert v["VIRTIO_BLK"] == "m" and v["MODULES"] == "y"
    assert v["VIRTIO_MMIO"] == "y"


def test_unmet_and_unknown_symbols_reported(tree, tmp_path):
    req = FragmentRequest(enable=["DRM_I915", "NOT_A_SYMBOL_PYVMM"])
    with pytest.raises(KernelConfigError) as e:
        generate_config(tree, tmp_path / "b", req)
    msg = str(e.value)
    assert "DRM_I915 (wanted y, got n)" in msg          # needs DRM, which stays off
    assert "NOT_A_SYMBOL_PYVMM (wanted y, got n) [no such symbol]" in msg
    assert "config.log" in msg and "\n" not in msg
    assert sorted(m.split()[0] for m in e.value.missing) == ["DRM_I915", "NOT_A_SYMBOL_PYVMM"]
