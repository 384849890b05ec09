"""virtio-net and virtio-blk hotplug seen by a Linux guest through ACPI PCI
hotplug (issue 19; pyvmm/devices/pcihotplug.py), for a guest at its shell
with a PCI bus and a QMP socket.  Nothing is done in the guest by hand:
device_add raises GPE 1 and the guest's acpiphp finds the new function by
itself (no /sys/bus/pci/rescan); device_del asks for it back, acpiphp lets
go of it and calls _EJ0, and only then does DEVICE_DELETED arrive.

Each check polls the guest from one shell loop (a bt guest answers a
command in seconds, not milliseconds)."""

from __future__ import annotations

import os
import socket
import time

from .linux_snapshot import QmpArgs

MAC = "52:54:00:19:19:19"
EVENT_TIMEOUT_S = 600


class QmpEvents(QmpArgs):
    """QmpArgs that keeps the events it reads past, for wait_event()."""

    def __init__(self, path: str):
        self.events: list[dict] = []
        super().__init__(path)

    def _next(self) -> dict:
        reply = super()._next()
        if "event" in reply:
            self.events.append(reply)
        return reply

    def wait_event(self, name: str, timeout: float = EVENT_TIMEOUT_S) -> dict:
        """The first `name` event, read or still to come; AssertionError after `timeout`."""
        deadline, before = time.monotonic() + timeout, self.sock.gettimeout()
        try:
            while True:
                found = [e for e in self.events if e["event"] == name]
                if found:
                    self.events.remove(found[0])
                    return found[0]
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {name} in {timeout:.0f} s (got {[e['event'] for e in self.events]})"
                self.sock.settimeout(remaining)
                try:
                    self._next()
                except TimeoutError:
                    pass
        finally:
            self.sock.settimeout(before)


def _slot(qmp: QmpArgs, ident: str) -> int:
    return next(d["slot"] for d in qmp.run("query-pci")[0]["devices"] if d["qdev_id"] == ident)


def _until(g, condition: str, tag: str, timeout: float) -> str:
    """Runs a shell loop in the guest until `condition` (a shell command) prints
    something; returns what it printed last."""
    sent = g.send(f"for i in $(seq 300); do o=$({condition}); [ -n \"$o\" ] && break; sleep 1; done; "
                  f"echo \"{tag}:$o:\"\n")
    return g.expect(rf"\n{tag}:(.*):\r?\n", timeout, after=sent).group(1)


def check_net_hotplug(g, qmp_path: str, workdir: str, timeout: float = 600) -> None:
    """On GuestSession `g` at its shell; `workdir` holds the backend's socket.
    A virtio-net NIC on a stream backend appears in `ip link` with its MAC
    and goes again, with DEVICE_DELETED, and the backend is closed."""
    path = os.path.join(workdir, "hotplug-net.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(60)
    qmp = QmpEvents(qmp_path)
    try:
        qmp.run("netdev_add", type="stream", id="hpnet", addr={"type": "unix", "path": path})
        qmp.run("device_add", driver="virtio-net-pci", netdev="hpnet", id="hpnic", mac=MAC)
        peer, _ = server.accept()
        pci = f"0000:00:{_slot(qmp, 'hpnic'):02x}.0"
        found = _until(g, f"grep -l {MAC} /sys/class/net/*/address 2>/dev/null", "HP-NET-IN", timeout)
        assert found.startswith("/sys/class/net/"), found
        iface = found.split("/")[4]
        sent = g.send(f"cat /sys/bus/pci/devices/{pci}/vendor; ip link show {iface} | grep -c {MAC}; "
                      f"ip link set {iface} up && echo HP-UP\n")
        m = g.expect(r"\n(0x\w+)\r?\n(\d+)\r?\nHP-UP\r?\n", timeout, after=sent)
        assert m.group(1) == "0x1af4" and m.group(2) == "1", m.group(0)
        assert not [e for e in qmp.events if e["event"] == "DEVICE_DELETED"]

        assert qmp.run("device_del", id="hpnic") == {}
        event = qmp.wait_event("DEVICE_DELETED", timeout)
        assert event["data"] == {"device": "hpnic", "path": "/machine/peripheral/hpnic"}, event
        gone = _until(g, f"[ -e /sys/class/net/{iface} ] || [ -e /sys/bus/pci/devices/{pci} ] || echo gone",
                      "HP-NET-OUT", timeout)
        assert gone == "gone"
        peer.settimeout(30)
        while peer.recv(65536):                              # frames the guest sent while up, then EOF
            pass
        peer.close()
        qmp.run("netdev_del", id="hpnet")
        assert all(d["qdev_id"] != "hpnic" for d in qmp.run("query-pci")[0]["devices"])
    finally:
        qmp.sock.close()
        server.close()


def check_blk_hotplug(g, qmp_path: str, image: str, sectors: int, timeout: float = 600) -> None:
    """A virtio-blk disk on block node `image` (qcow2 of `sectors` sectors)
    appears as a /sys/block/vd* of that size, and goes again, with
    DEVICE_DELETED; then blockdev-del frees the node."""
    qmp = QmpEvents(qmp_path)
    try:
        sent = g.send("ls /sys/block | grep -c ^vd; echo HP-BLK-0\n")
        before = int(g.expect(r"\n(\d+)\r?\nHP-BLK-0\r?\n", timeout, after=sent).group(1))
        qmp.run("blockdev-add", driver="qcow2", **{"node-name": "hpnode"},
                file={"driver": "file", "filename": image})
        qmp.run("device_add", driver="virtio-blk-pci", drive="hpnode", id="hpdisk")
        pci = f"0000:00:{_slot(qmp, 'hpdisk'):02x}.0"
        found = _until(g, f"ls /sys/bus/pci/devices/{pci}/virtio*/block 2>/dev/null", "HP-BLK-IN", timeout)
        assert found.startswith("vd"), found
        sent = g.send(f"cat /sys/block/{found}/size; ls /sys/block | grep -c ^vd; echo HP-BLK-1\n")
        m = g.expect(r"\n(\d+)\r?\n(\d+)\r?\nHP-BLK-1\r?\n", timeout, after=sent)
        assert (int(m.group(1)), int(m.group(2))) == (sectors, before + 1), m.group(0)

        assert qmp.run("device_del", id="hpdisk") == {}
        event = qmp.wait_event("DEVICE_DELETED", timeout)
        assert event["data"] == {"device": "hpdisk", "path": "/machine/peripheral/hpdisk"}, event
        gone = _until(g, f"[ -e /sys/block/{found} ] || [ -e /sys/bus/pci/devices/{pci} ] || echo gone",
                      "HP-BLK-OUT", timeout)
        assert gone == "gone"
        assert qmp.run("blockdev-del", **{"node-name": "hpnode"}) == {}
    finally:
        qmp.sock.close()


def check_acpiphp_slots(g, timeout: float = 600) -> None:
    """acpiphp took the DSDT's 31 slot objects as hotplug slots (slot 5 at
    device 5 of bus 0), and the kernel logged no ACPI error or exception."""
    sent = g.send("ls /sys/bus/pci/slots | wc -l; cat /sys/bus/pci/slots/5/address; "
                  "dmesg | grep -c -i -E 'ACPI (Error|Exception)'; echo SLOTS-1\n")
    m = g.expect(r"\n\s*(\d+)\r?\n(\S+)\r?\n(\d+)\r?\nSLOTS-1\r?\n", timeout, after=sent)
    assert (m.group(1), m.group(2), m.group(3)) == ("31", "0000:00:05", "0"), m.group(0)
