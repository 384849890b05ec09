"""virtio-net hotplug seen by a Linux guest (issue 19), for a guest some
other test boots anyway with a PCI bus and a QMP socket: netdev_add names
a stream backend (a socket of the test's own), device_add plugs a
virtio-net-pci NIC, the guest rescans its PCI bus (pyvmm has no ACPI
hotplug controller, so Linux is not told) and finds a new interface with
the NIC's MAC address; the guest then lets go of it and device_del takes
it off with DEVICE_DELETED, and the backend is closed."""

from __future__ import annotations

import os
import socket

from .linux_snapshot import QmpArgs

MAC = "52:54:00:19:19:19"


def check_net_hotplug(g, qmp_path: str, workdir: str, timeout: float = 600) -> None:
    """On GuestSession `g` at its shell; `workdir` holds the backend's socket."""
    path = os.path.join(workdir, "hotplug-net.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(60)
    qmp = QmpArgs(qmp_path)
    try:
        qmp.run("netdev_add", type="stream", id="hpnet", addr={"type": "unix", "path": path})
        qmp.run("device_add", driver="virtio-net-pci", netdev="hpnet", id="hpnic", mac=MAC)
        peer, _ = server.accept()
        slot = next(d["slot"] for d in qmp.run("query-pci")[0]["devices"] if d["qdev_id"] == "hpnic")
        pci = f"0000:00:{slot:02x}.0"
        sent = g.send(f"echo 1 > /sys/bus/pci/rescan; cat /sys/bus/pci/devices/{pci}/vendor; "
                      f"grep -l {MAC} /sys/class/net/*/address; echo HP-1\n")
        m = g.expect(r"\n(0x\w+)\r?\n(/sys/class/net/\w+/address)\r?\nHP-1\r?\n", timeout, after=sent)
        assert m.group(1) == "0x1af4", m.group(0)
        iface = m.group(2).split("/")[4]
        sent = g.send(f"ip link set {iface} up && echo HP-UP; echo 1 > /sys/bus/pci/devices/{pci}/remove; "
                      f"ls /sys/class/net | grep -c '^{iface}$'; echo HP-2\n")
        m = g.expect(r"\n(?:HP-UP\r?\n)?(\d+)\r?\nHP-2\r?\n", timeout, after=sent)
        assert m.group(1) == "0", m.group(0)                 # the guest let go of it
        assert qmp.run("device_del", id="hpnic") == {}
        peer.settimeout(30)
        while peer.recv(65536):                              # frames the guest sent while up, then EOF
            pass
        peer.close()
        qmp.run("netdev_del", id="hpnet")
        assert all(d["qdev_id"] != "hpnic" for d in qmp.run("query-pci")[0]["devices"])
        sent = g.send("echo HP-3\n")
        g.expect(r"\nHP-3\r?\n", timeout, after=sent)
    finally:
        qmp.sock.close()
        server.close()
