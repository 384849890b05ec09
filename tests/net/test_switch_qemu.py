"""A QEMU VM joins the switch with its own `-netdev stream` client: the
RARP frames QEMU's announce-self sends from its virtio-net NIC cross the
switch to a test client, byte for byte what QEMU framed. (No guest runs:
SeaBIOS spins without a boot device, which is enough for the NIC.)"""

from __future__ import annotations

import json
import socket
import subprocess
import time

from tests import hostfacts
from tests.net.switch_helpers import SwitchProcess

QEMU_MAC = bytes.fromhex("525400123456")


def qmp_command(f, cmd: dict) -> dict:
    f.write(json.dumps(cmd) + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "return" in reply or "error" in reply:       # skip events
            return reply


@hostfacts.from_setup(programs=("qemu-system-x86_64",), package="qemu-system-x86")
def test_qemu_vm_joins_and_its_frames_cross_the_switch():
    sw = SwitchProcess(None, name="q")
    watch = sw.client()
    qmp = str(sw.dir / "qmp.sock")
    ports_before = {p["name"] for p in sw.status()["ports"]}
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "accel=tcg", "-m", "64",
         "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sw.socket_path()}",
         "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
         "-qmp", f"unix:{qmp},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 20
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(qmp)
                break
            except OSError:
                s.close()
                assert qemu.poll() is None and time.monotonic() < end, "QEMU did not start"
                time.sleep(0.05)
        f = s.makefile("rw")
        json.loads(f.readline())
        assert "return" in qmp_command(f, {"execute": "qmp_capabilities"})
        assert "return" in qmp_command(f, {"execute": "announce-self", "arguments":
                                           {"initial": 50, "max": 100, "rounds": 2, "step": 50}})
        frame = watch.recv_until(lambda fr: fr[6:12] == QEMU_MAC, timeout=10)
        assert frame is not None, "no frame from QEMU crossed the switch"
        assert frame[0:6] == b"\xff" * 6 and frame[12:14] == b"\x80\x35"        # RARP, broadcast
        st = sw.status()
        qemu_port = [p for p in st["ports"] if p["name"] not in ports_before and p["counters"]["rx_frames"]]
        assert len(qemu_port) == 1
        assert any(e["mac"] == "52:54:00:12:34:56" and e["port"] == qemu_port[0]["name"]
                   for e in st["mac_table"]["entries"])
        s.close()
    finally:
        qemu.kill()
        qemu.wait()
        watch.close()
        assert sw.stop() == 0
