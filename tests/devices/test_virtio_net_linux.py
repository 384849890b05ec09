"""The stock Debian kernel under bt loads virtio_net from the initramfs
pyvmm builds for it, gets the MAC given with --net, and talks to the host
through a TAP device: the guest pings the host, the host pings the guest,
and a file goes each way over TCP with busybox nc.

pyvmm creates the TAP (down, without an address) in the host's namespace;
the test then moves it into a network namespace of its own, where the
host side gets 10.0.2.2/24, so the guest's frames reach nothing else.
The namespace is removed at the end.  Needs root and /dev/net/tun (host
facts, as in test_virtio_net_tap.py).  PYVMM_BT_BOOT_TIMEOUT bounds the
boot as in tests/test_linux_bt.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from pyvmm.guest.initramfs import DEFAULT_BUSYBOX as BUSYBOX

from ..guest_session import GuestSession
from ..hostfacts import require_debian_cloud_kernel
from .test_virtio_net_tap import ip, netns  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1"
MAC = "52:54:00:12:34:57"
DOWNLOAD, UPLOAD = 5001, 5002

# Host side, run inside the namespace: serves `path` on DOWNLOAD and
# stores what arrives on UPLOAD in `path`.up.
SERVER = """
import socket, sys, threading
path = sys.argv[1]
def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.0.2.2", port)); s.listen(1); return s
down, up = listen(%d), listen(%d)
print("LISTENING", flush=True)
def give():
    c, _ = down.accept(); c.sendall(open(path, "rb").read()); c.close()
threading.Thread(target=give, daemon=True).start()
c, _ = up.accept(); data = b""
while True:
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
open(path + ".up", "wb").write(data); c.close()
""" % (DOWNLOAD, UPLOAD)


def wait_for_link(ifname: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while ip("link", "show", ifname, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"pyvmm did not create TAP {ifname}"
        time.sleep(0.2)


def test_linux_guest_talks_to_the_host_over_tap_under_bt(tmp_path, netns):  # noqa: F811
    require_debian_cloud_kernel()
    ifname = f"pvg{os.getpid() % 100000}"
    payload = tmp_path / "down.bin"
    payload.write_bytes(os.urandom(96 * 1024))
    server = None
    with GuestSession("run", "--engine", "bt", "--no-reboot", "--mem", "256M", "--append", CMDLINE,
                      "--net", f"tap={ifname},mac={MAC},id=net0") as g:
        wait_for_link(ifname)
        ip("link", "set", "dev", ifname, "netns", netns)
        ip("-n", netns, "addr", "add", "10.0.2.2/24", "dev", ifname)
        ip("-n", netns, "link", "set", ifname, "up")
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, str(payload)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "LISTENING"
            g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
            assert "init: cannot load" not in g.output
            sent = g.send("cat /sys/class/net/eth0/address\n")
            g.expect(rf"\n{MAC}\r?\n", timeout=600, after=sent)
            sent = g.send("ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && echo NET-UP\n")
            g.expect(r"\nNET-UP\r?\n", timeout=600, after=sent)
            sent = g.send("ping -c 2 -W 60 10.0.2.2 >/dev/null && echo PING-OK\n")
            g.expect(r"\nPING-OK\r?\n", timeout=600, after=sent)
            pong = subprocess.run(["ip", "netns", "exec", netns, BUSYBOX, "ping", "-c", "2", "-w", "300",
                                   "10.0.2.15"],
                                  capture_output=True, text=True, timeout=400)
            assert pong.returncode == 0, pong.stdout + pong.stderr
            sent = g.send(f"nc 10.0.2.2 {DOWNLOAD} </dev/null >/tmp/down && md5sum /tmp/down\n")
            want = hashlib.md5(payload.read_bytes()).hexdigest()
            g.expect(rf"\n{want}\s+/tmp/down\r?\n", timeout=600, after=sent)
            sent = g.send(f"dd if=/dev/urandom of=/tmp/up bs=1024 count=80 2>/dev/null; md5sum /tmp/up;"
                          f" nc 10.0.2.2 {UPLOAD} </tmp/up && echo UP-DONE\n")
            m = g.expect(r"\n([0-9a-f]{32})\s+/tmp/up\r?\n", timeout=600, after=sent)
            g.expect(r"\nUP-DONE\r?\n", timeout=600, after=sent)
            assert server.wait(timeout=120) == 0
            got = (tmp_path / "down.bin.up").read_bytes()
            assert len(got) == 80 * 1024 and hashlib.md5(got).hexdigest() == m.group(1)
            g.send("poweroff -f\n")
            assert g.wait(timeout=600) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
