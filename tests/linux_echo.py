"""What the Linux migration and snapshot tests with a live TCP session
share (issues 19 and 20): a network namespace the test creates and
removes, a `pyvmm switch` running inside it whose TAP uplink is the
namespace's only link to the guests, a guest that serves TCP echo (busybox
`nc -l -e cat`) while a loop counts and writes one record per count to
its raw disk, and a client in the namespace that streams numbered lines
and checks every echoed byte.

The guest is 10.0.5.2 and the namespace's TAP 10.0.5.1; no frame leaves
the namespace and the switch's Unix sockets.  Creating them needs root and
/dev/net/tun (host facts: the tests skip without them)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pyvmm.guest.initramfs import ensure_default_initramfs

from .guest_session import GuestSession
from .fitted_kernel import fitted_kernel
from .devices.test_virtio_net_tap import host_fact
from .devices.test_virtio_net_tap import ip as _ip
from .net.switch_helpers import SwitchProcess

MAC = "52:54:00:20:19:01"
GUEST_IP, HOST_IP = "10.0.5.2", "10.0.5.1"
ECHO_PORT = 7000
ANSWER_S = 600.0          # a command's answer on a loaded host
PROGRESS_S = 240.0        # the echo stream must move on within this after a move
RECORD = 512              # the loop writes record i at sector i of the disk
DISK_BYTES = 4 << 20

# Host side, in the namespace: streams numbered lines of varying length to
# the guest's echo server, at most WINDOW lines ahead of what came back
# (at RATE lines a second: more starves a guest under bt on a loaded host),
# and compares every byte that comes back with what it sent.  Prints
# "ECHOED n" as lines come back; a line "stop" on stdin stops the sending,
# and once everything sent came back it prints "DONE n".  Any difference,
# a closed or reset connection, or silence for IDLE_S prints BAD and exits 1.
CLIENT = r"""
import select, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
RATE, WINDOW, IDLE_S = 4.0, 16, float(sys.argv[3])
def line(n):
    return b"%08d:" % n + b"abcdefghijklmnopqrstuvwxyz"[: n % 27] + b"\n"
s = socket.create_connection((host, port), timeout=60)
s.setblocking(False)
print("CONNECTED", flush=True)
sent = echoed = 0
pending = bytearray()         # sent, not yet echoed
stopping = False
last_send = 0.0
last_data = time.monotonic()
while True:
    now = time.monotonic()
    if not stopping and sent - echoed < WINDOW and now - last_send >= 1 / RATE:
        data = line(sent + 1)
        try:
            n = s.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            sent += 1; pending += data; last_send = now
        elif n:
            print("BAD partial send", flush=True); sys.exit(1)
    if stopping and echoed == sent:
        print("DONE", echoed, flush=True); sys.exit(0)
    if now - last_data > IDLE_S:
        print("BAD no echo for %.0f s: sent %d echoed %d" % (IDLE_S, sent, echoed), flush=True); sys.exit(1)
    readable, _, _ = select.select([s, sys.stdin], [], [], 0.02)
    if sys.stdin in readable:
        if sys.stdin.readline().strip() in ("stop", ""):
            stopping = True
    if s in readable:
        try:
            got = s.recv(65536)
        except OSError as e:
            print("BAD", e, flush=True); sys.exit(1)
        if not got:
            print("BAD connection closed: sent %d echoed %d" % (sent, echoed), flush=True); sys.exit(1)
        if bytes(pending[:len(got)]) != got:
            print("BAD echo after line %d: expected %r got %r" % (echoed, bytes(pending[:len(got)]), got),
                  flush=True); sys.exit(1)
        del pending[:len(got)]
        last_data = time.monotonic()
        before = echoed
        echoed = sent - pending.count(b"\n")
        if echoed != before:
            print("ECHOED", echoed, flush=True)
"""

# The guest's loop: record i (b"rec<i>\n", zero-padded to a sector) goes to
# sector i of the disk and is flushed before /tmp/count says i, so the disk
# always holds every record up to the count the guest's memory has.
LOOP = ("(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo rec$i | dd of=/dev/vda bs=512 seek=$i "
        "conv=sync,notrunc,fsync 2>/dev/null; echo $i > /tmp/count; sleep 0.2; done; touch /tmp/stopped) "
        ">/dev/null 2>&1 &")


class EchoNet:
    """The namespace and the switch with its TAP uplink in it.  Guests
    attach with guest_args(); close() removes everything."""

    def __init__(self):
        fact = host_fact()
        if fact:
            pytest.skip(fact)
        self.ns = f"pvecho-{uuid.uuid4().hex[:8]}"
        self.tap = f"pvet{uuid.uuid4().hex[:6]}"
        self.switch: SwitchProcess | None = None
        _ip("netns", "add", self.ns)
        try:
            _ip("-n", self.ns, "link", "set", "lo", "up")
            self.switch = SwitchProcess({"uplinks": [{"type": "tap", "ifname": self.tap}]},
                                        name="echo", netns=self.ns)
            _ip("-n", self.ns, "addr", "add", f"{HOST_IP}/24", "dev", self.tap)
            _ip("-n", self.ns, "link", "set", self.tap, "up")
        except BaseException:
            self.close()
            raise

    def guest_args(self) -> tuple[list[str], dict]:
        """The --net option and the environment a guest on this switch needs."""
        return ["--net", f"switch={self.switch.name},mac={MAC}"], {"PYVMM_SWITCH_DIR": str(self.switch.dir)}

    def mac_port(self) -> str | None:
        """The switch port the guest's MAC is learned on (None: not known)."""
        table = self.switch.status()["mac_table"]["entries"]
        return next((e["port"] for e in table if e["mac"] == MAC), None)

    def close(self) -> None:
        if self.switch is not None:
            self.switch.stop()
        _ip("netns", "del", self.ns, check=False)


class EchoClient:
    """CLIENT running in the namespace; its progress read on a thread."""

    def __init__(self, net: EchoNet):
        self.proc = subprocess.Popen(["ip", "netns", "exec", net.ns, sys.executable, "-u", "-c", CLIENT,
                                      GUEST_IP, str(ECHO_PORT), str(PROGRESS_S)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.echoed = 0
        self._thread = threading.Thread(target=self._pump, name="echo-client", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for text in self.proc.stdout:
            self.lines.append(text.rstrip())
            if text.startswith("ECHOED "):
                self.echoed = int(text.split()[1])

    def bad(self) -> str | None:
        return next((ln for ln in self.lines if ln.startswith("BAD") or "Traceback" in ln), None)

    def wait_echoed(self, at_least: int, timeout: float = PROGRESS_S) -> int:
        """Waits until `at_least` lines came back intact; AssertionError
        when the client saw a bad byte, the session ended, or no progress."""
        deadline = time.monotonic() + timeout
        while self.echoed < at_least:
            assert self.bad() is None, self.lines[-5:]
            assert self.proc.poll() is None, f"echo client exited {self.proc.returncode}: {self.lines[-5:]}"
            assert time.monotonic() < deadline, f"echo stream stalled at {self.echoed} < {at_least}"
            time.sleep(0.1)
        return self.echoed

    def finish(self, timeout: float = PROGRESS_S) -> int:
        """Stops sending; returns the line count once every byte came back."""
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout)
        self._thread.join(5)
        done = [ln for ln in self.lines if ln.startswith("DONE ")]
        assert self.proc.returncode == 0 and done, self.lines[-5:]
        return int(done[0].split()[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(g: GuestSession, command: str, pattern: str, timeout: float = ANSWER_S) -> re.Match:
    sent = g.send(command + "\n")
    return g.expect(pattern, timeout=timeout, after=sent)


def kernel_args() -> list[str]:
    """--kernel and --initrd for the fitted kernel (virtio built in; a
    sixth of the stock kernel's boot under bt: tests/fitted_kernel.py) and
    pyvmm's default initramfs (a --drive without --kernel would boot
    through the BIOS)."""
    return ["--kernel", fitted_kernel(), "--initrd", str(ensure_default_initramfs())]


def make_disk(path: Path) -> str:
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    return str(path)


def start_workload(g: GuestSession, net: EchoNet) -> EchoClient:
    """At the guest's shell: brings eth0 up, starts the echo server and the
    counting loop, and connects a client that has had 20 lines back."""
    run(g, f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && echo NET-UP", r"\nNET-UP\r?\n")
    run(g, f"nc -l -p {ECHO_PORT} -e cat & echo ECHO-UP", r"\nECHO-UP\r?\n")
    run(g, LOOP + " echo LOOP-UP", r"\nLOOP-UP\r?\n")
    client = EchoClient(net)
    try:
        client.wait_echoed(20)
    except BaseException:
        client.kill()
        raise
    return client


def count(g: GuestSession) -> int:
    """The loop's count (read again when caught between truncate and write)."""
    for _ in range(20):
        found = run(g, "echo C=$(cat /tmp/count)", r"\nC=(\d*)\r?\n").group(1)
        if found:
            return int(found)
        time.sleep(0.5)
    raise AssertionError("/tmp/count stayed empty")


def clocks(g: GuestSession) -> tuple[float, int]:
    """(uptime, wall-clock seconds) as the guest reads them: the wall clock
    through the vDSO, which under hybrid must not read the host's TSC."""
    m = run(g, "echo T=$(cut -d' ' -f1 /proc/uptime)/$(date +%s)", r"\nT=(\d+\.\d+)/(\d+)\r?\n")
    return float(m.group(1)), int(m.group(2))


def disk_matches_count(g: GuestSession) -> int:
    """The count the guest's memory holds, checked against the disk read
    past the guest's page cache (dropped first): its record must be there."""
    for _ in range(20):
        m = run(g, "c=$(cat /tmp/count); sync; echo 3 > /proc/sys/vm/drop_caches; "
                   "echo D=$c/$(dd if=/dev/vda bs=512 skip=$c count=1 2>/dev/null | tr -d '\\000')",
                r"\nD=(\d*)/(\S*)\r?\n")
        if m.group(1):         # else caught between the loop's truncate and write
            assert m.group(2) == f"rec{m.group(1)}", m.group(0)
            return int(m.group(1))
        time.sleep(0.5)
    raise AssertionError("/tmp/count stayed empty")


def check_image(path: str, final: int) -> None:
    """After the guest stopped: records 1..final are each on the disk image."""
    data = Path(path).read_bytes()
    wrong = [i for i in range(1, final + 1)
             if data[i * RECORD:(i + 1) * RECORD].rstrip(b"\0") != b"rec%d\n" % i]
    assert not wrong, f"{len(wrong)} of {final} records missing or wrong, first {wrong[:5]}"


def stop_loop_and_count(g: GuestSession) -> int:
    """Stops the counting loop and returns its last count."""
    run(g, "touch /tmp/stop; while [ ! -e /tmp/stopped ]; do sleep 0.2; done; echo LOOP-STOPPED",
        r"\nLOOP-STOPPED\r?\n")
    return count(g)
