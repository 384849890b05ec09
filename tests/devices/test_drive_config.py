"""`--drive` parsing, drives in VmConfig's JSON form, the initramfs that
carries the stock kernel's virtio modules, and the builder's PCI wiring."""

from __future__ import annotations

import gzip

import pytest

from pyvmm.config import DriveConfig, VmConfig, parse_drive
from pyvmm.errors import ConfigError
from pyvmm.guest.initramfs import build_default_initramfs, module_closure


def test_parse_drive():
    d = parse_drive("file=/x/disk.img,format=qcow2,readonly=on,id=root")
    assert d == DriveConfig(file="/x/disk.img", format="qcow2", readonly=True, id="root")
    assert parse_drive("file=a.raw,if=virtio") == DriveConfig(file="a.raw")
    for bad in ("a.raw", "file=a,format=vdi", "file=a,readonly=yes", "file=a,if=ide", "format=raw",
                "file=a,cache=none,bogus=1", "file=a,file=b"):
        with pytest.raises(ConfigError):
            parse_drive(bad)


def test_drives_survive_the_json_config_round_trip(tmp_path):
    cfg = VmConfig(kernel="k", drives=[parse_drive("file=/d.raw,id=x"), parse_drive("file=/e,readonly=on")],
                   virtio_rng=True)
    path = tmp_path / "vm.json"
    path.write_text(cfg.to_json())
    back = VmConfig.load(str(path))
    assert back.drives == cfg.drives and back.virtio_rng
    with pytest.raises(ConfigError):
        VmConfig.from_dict({"drives": [{"file": "/d", "format": "vdi"}]})
    with pytest.raises(ConfigError):
        VmConfig.from_dict({"drives": [{"path": "/d"}]})


def test_cli_reports_a_missing_disk_in_one_line(tmp_path, capsys):
    from pyvmm.cli.main import main
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 4096)
    code = main(["run", "--engine", "bt", "--kernel", str(kernel), "--initrd", str(kernel),
                 "--drive", f"file={tmp_path}/none.raw"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_module_closure_orders_dependencies_first(tmp_path):
    rel = tmp_path / "9.9"
    rel.mkdir()
    (rel / "modules.dep").write_text("a/virtio_pci.ko: a/legacy.ko a/virtio.ko a/virtio_ring.ko\n"
                                     "a/virtio.ko: a/virtio_ring.ko\na/virtio_ring.ko:\na/legacy.ko:\n"
                                     "b/virtio-rng.ko: a/virtio.ko a/virtio_ring.ko\n")
    assert module_closure("9.9", ["virtio_pci", "virtio-rng"], str(tmp_path)) == [
        "a/virtio_ring.ko", "a/virtio.ko", "a/legacy.ko", "a/virtio_pci.ko", "b/virtio-rng.ko"]
    with pytest.raises(ConfigError):
        module_closure("9.9", ["virtio_blk"], str(tmp_path))


def test_initramfs_carries_and_loads_the_modules(tmp_path):
    rel = tmp_path / "9.9"
    (rel / "k").mkdir(parents=True)
    names = ("virtio_pci", "virtio_blk", "virtio-rng", "virtio_net", "virtio_console")
    (rel / "modules.dep").write_text("".join(f"k/{name}.ko:\n" for name in names))
    for name in names:
        (rel / "k" / f"{name}.ko").write_bytes(f"MODULE-{name}".encode())
    archive = gzip.decompress(build_default_initramfs(release="9.9", modules_root=str(tmp_path)))
    assert b"lib/modules/9.9/k/virtio_blk.ko" in archive and b"MODULE-virtio-rng" in archive
    assert b"/lib/modules/9.9/k/virtio_pci.ko\n/lib/modules/9.9/k/virtio_blk.ko\n" in archive
    assert b'insmod "$m"' in archive
    plain = gzip.decompress(build_default_initramfs())
    assert b"etc/pyvmm-modules\0" not in plain and b"virtio_pci.ko" not in plain   # no list, no modules


def test_builder_puts_the_disk_on_pci(tmp_path):
    from pyvmm.boot.result import BootResult
    from pyvmm.builder import build_machine, destroy_machine
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    cfg = VmConfig(engine="bt", drives=[parse_drive(f"file={disk}")], virtio_rng=True, mem_mib=32)

    def boot(memory):
        from pyvmm.cpu import CpuState
        return BootResult(cpu=CpuState(), protocol="test")

    machine = build_machine(cfg, lambda b: None, boot=boot)
    try:
        names = [name for _, _, name in machine.io_bus.devices()]
        assert "pci-config" in names
        mmio = [name for _, _, name in machine.mmio_bus.devices()]
        assert "virtio-blk0-bar4" in mmio and "virtio-rng-bar4" in mmio
        assert machine.devices["virtio_blk0"].device.image.size == 1 << 20
        for dev in machine.devices.values():
            dev.restore(dev.save())
    finally:
        destroy_machine(machine)
