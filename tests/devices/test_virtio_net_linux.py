"""The stock Debian kernel under bt loads virtio_net from the initramfs
pyvmm builds for it, gets the MAC given with --net, and talks to the host
through a TAP device: the guest pings the host, the host pings the guest,
and a file goes each way over TCP with busybox nc, with the TCP/UDP
checksums offloaded to pyvmm both ways (CSUM, GUEST_CSUM).  QMP
announce-self makes the guest's driver (GUEST_ANNOUNCE) send a gratuitous
ARP, which a packet socket on the host side of the TAP sees.

The guest's console is hvc0 (console=hvc0 last on the command line, the
virtio-console on pyvmm's stdio): the kernel starts on ttyS0, init's
cttyhack then gives the shell /dev/hvc0, the console the kernel prefers
once virtio_console is loaded, so every command below is typed into and
answered through virtio-console.  /dev/hwrng (virtio-rng) gives bytes.

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
from ..test_linux_bt import check_acpi_poweroff, check_stock_kernel_shell
from ..linux_pauses import QmpLine, pause_qmp_args
from .test_virtio_net_tap import ip, netns  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 console=hvc0"
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


# Host side, in the namespace: prints GARP once a gratuitous ARP (sender IP =
# target IP = the guest's) from the guest's MAC arrives on the TAP, NO-GARP
# after 300 s without one.
GARP_WATCH = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((sys.argv[1], 0)); s.settimeout(300); print("WATCHING", flush=True)
mac = bytes.fromhex(sys.argv[2].replace(":", ""))
while True:
    try:
        f = s.recv(2048)
    except socket.timeout:
        print("NO-GARP", flush=True); break
    if f[6:12] == mac and f[20:22] == b"\\0\\1" and f[28:32] == f[38:42] == bytes([10, 0, 2, 15]):
        print("GARP", flush=True); break
"""


def wait_for_link(ifname: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while ip("link", "show", ifname, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"pyvmm did not create TAP {ifname}"
        time.sleep(0.2)


def test_linux_guest_talks_to_the_host_over_tap_under_bt(tmp_path, netns):  # noqa: F811
    kernel = require_debian_cloud_kernel()
    ifname = f"pvg{os.getpid() % 100000}"
    payload = tmp_path / "down.bin"
    payload.write_bytes(os.urandom(96 * 1024))
    server = None
    with GuestSession("run", "--engine", "bt", "--no-reboot", "--mem", "256M", "--verbose", "--append", CMDLINE,
                      "--net", f"tap={ifname},mac={MAC},id=net0",
                      "--virtio-console", "stdio", "--virtio-rng",
                      *pause_qmp_args(str(tmp_path / "qmp.sock"))) as g:
        wait_for_link(ifname)
        ip("link", "set", "dev", ifname, "netns", netns)
        ip("-n", netns, "addr", "add", "10.0.2.2/24", "dev", ifname)
        ip("-n", netns, "link", "set", ifname, "up")
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, str(payload)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "LISTENING"
            # The stock kernel's checks of tests/test_linux_bt.py ride on this boot.
            check_stock_kernel_shell(g, kernel, cpus=1)
            assert "init: cannot load" not in g.output
            # The shell's terminal is hvc0, the kernel's preferred console.
            sent = g.send("echo \"tty=$(readlink /proc/$$/fd/0) active=$(cat /sys/class/tty/console/active)\"\n")
            g.expect(r"\ntty=/dev/hvc0 active=.*\bhvc0\r?\n", timeout=600, after=sent)
            # 256 bytes of /dev/hwrng: all there, and not all alike.
            sent = g.send("head -c 256 /dev/hwrng > /tmp/r && wc -c < /tmp/r && od -An -tx1 /tmp/r | "
                          "tr -s ' ' '\\n' | sort -u | wc -l\n")
            m = g.expect(r"\n\s*256\r?\n\s*(\d+)\r?\n", timeout=600, after=sent)
            assert int(m.group(1)) > 100, "256 bytes from /dev/hwrng with few distinct values"
            # The driver took checksum offload both ways, TCP segmentation offload (v4, v6),
            # mergeable RX buffers, the control queue and GUEST_ANNOUNCE (bits 0, 1, 11, 12,
            # 15, 17, 21 of the negotiated features); the TCP exchange below then carries
            # checksums that pyvmm completed, which the host's stack verifies, in segments
            # pyvmm cut from the driver's super-frames and in frames the driver reassembles
            # from several RX buffers.
            sent = g.send("cat /sys/class/net/eth0/device/features\n")
            bits = g.expect(r"\n([01]{64})\r?\n", timeout=600, after=sent).group(1)
            assert [bits[i] for i in (0, 1, 11, 12, 15, 17, 21)] == ["1"] * 7, bits
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
            # announce-self: the driver answers S_ANNOUNCE with a gratuitous ARP.
            watch = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", GARP_WATCH, ifname, MAC],
                                     stdout=subprocess.PIPE, text=True)
            try:
                assert watch.stdout.readline().strip() == "WATCHING"
                qmp = QmpLine(str(tmp_path / "qmp.sock"))
                try:
                    assert qmp.execute("announce-self") == {}
                finally:
                    qmp.close()
                assert watch.stdout.readline().strip() == "GARP"
            finally:
                watch.kill()
                watch.wait()
            check_acpi_poweroff(g)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
