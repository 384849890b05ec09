"""Guests on one `pyvmm switch`, booted once for the module: a pyvmm
guest under bt and one under hybrid boot at once with `--net switch=NAME`
and no MAC; the first one's NIC starts the switch (a detached process in
a private run directory), each gets its own derived MAC, they ping each
other both ways, and a file crosses over TCP (busybox nc) with its md5
checked on both ends. A QEMU TCG guest (same kernel and initramfs, QEMU's
own `-netdev stream` client) joins the same switch and pings a pyvmm
guest both ways; killed without warning, its port and address leave the
switch, and the restarted VM reattaches with its MAC on a new port.

The hybrid guest has a second NIC on another switch, run by the test
inside a network namespace with a team of three veth uplinks into the
namespace's bridge (tests/net/team_ns.py). A continuous TCP stream from
the guest to the bridge (tests/net/team_stream.py) runs while the active
uplink's link goes down (failover), comes back (failback) and then breaks
silently (only beacons see it); every byte must arrive in order, the
stream must move on within a minute of each event, and each gap is
measured and printed.

This is the one module that boots Linux guests on the switch; it boots all
three concurrently to keep its cost to one bt boot's wall time (QEMU's
boot takes seconds).  They boot the fitted kernel (tests/fitted_kernel.py,
virtio-net over PCI built in) with pyvmm's default initramfs: the subject
here is the switch, and the fitted kernel reaches the shell under bt in
about a sixth of the stock kernel's time.  The stock kernel's virtio-net
module is tested in tests/devices/test_virtio_net_linux.py.  No traffic
leaves the switch's Unix sockets and the test's namespace. PYVMM_BT_BOOT_TIMEOUT bounds the boot as in
tests/test_linux_bt.py."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import pytest

from pyvmm.errors import VmmError
from pyvmm.guest.initramfs import ensure_default_initramfs
from pyvmm.net.switchd import SwitchError, query_status

from ..guest_session import GuestSession
from ..fitted_kernel import fitted_kernel
from ..hostfacts import require_from_setup
from .team_ns import BRIDGE_ADDR, TeamNamespace
from .team_stream import stream_across_failovers

pytestmark = [pytest.mark.slow]

TIMEOUT = float(os.environ.get("PYVMM_BT_BOOT_TIMEOUT", "5400"))
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
SWITCH = "vms"
TEAM_SWITCH = "vmteam"
TEAM_MAC = "52:54:00:77:00:01"
BEACON = (0.2, 3)           # interval (s), misses: a silent break is found in ~0.6 s
STREAM_PORT = 5005
PORT = 5003
MAC_RE = r"\n((?:[0-9a-f]{2}:){5}[0-9a-f]{2})\r?\n"
QEMU = "qemu-system-x86_64"
QEMU_MAC = "52:54:00:99:00:01"


class QemuGuest(GuestSession):
    """A QEMU process driven at its serial console like a pyvmm one."""

    def __init__(self, argv: list[str]):
        super().__init__(argv=argv)


def qemu_guest(kernel: str, socket_path: Path) -> QemuGuest:
    initrd = ensure_default_initramfs()
    return QemuGuest([QEMU, "-accel", "tcg", "-m", "192", "-nographic", "-no-reboot", "-nodefaults",
                      "-serial", "stdio", "-kernel", kernel, "-initrd", str(initrd),
                      # no_timer_check: on a loaded host TCG's PIT can miss Linux's IO-APIC timer check
                      "-append", f"{CMDLINE} no_timer_check pyvmm.test=qemu",
                      "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={socket_path}",
                      "-device", f"virtio-net-pci,netdev=n0,mac={QEMU_MAC}"])


def guest(rundir: Path, which: str, engine: str, *nets: str) -> GuestSession:
    # The command lines differ, so the two VMs' derived MACs do too.
    return GuestSession("run", "--engine", engine, "--no-reboot", "--mem", "192M",
                        "--kernel", fitted_kernel(), "--initrd", str(ensure_default_initramfs()),
                        "--append", f"{CMDLINE} pyvmm.test={which}", "--net", f"switch={SWITCH}",
                        *[a for n in nets for a in ("--net", n)], env={"PYVMM_SWITCH_DIR": str(rundir)})


def run(g: GuestSession, command: str, pattern: str, timeout: float = 600) -> re.Match:
    sent = g.send(command + "\n")
    return g.expect(pattern, timeout=timeout, after=sent)


def stop_switch(name: str, rundir: Path) -> None:
    """Stop switch `name` (if still up), wait briefly for its control
    socket to go, and remove its private run directory."""
    try:
        query_status(name, rundir, request=b"stop")
    except SwitchError:
        pass
    end = time.monotonic() + 10
    while (rundir / f"{name}.ctl").exists() and time.monotonic() < end:
        time.sleep(0.1)
    for p in rundir.iterdir():
        p.unlink()
    rundir.rmdir()


class Guests:
    """What the module's tests share: the booted guests and the switches."""

    def __init__(self, rundir: Path, a: GuestSession, b: GuestSession, q: QemuGuest, macs: list[str],
                 team: TeamNamespace | None):
        self.rundir, self.a, self.b, self.q, self.macs, self.team = rundir, a, b, q, macs, team
        self.kernel = fitted_kernel()


@pytest.fixture(scope="module")
def guests():
    kernel = fitted_kernel()
    require_from_setup(programs=[QEMU], package="qemu-system-x86")
    rundir = Path(tempfile.mkdtemp(prefix="pvsv", dir="/tmp"))
    team = q = shared = None
    try:
        extra = []
        if os.geteuid() == 0:       # namespaces need root; test_tcp_stream... says so when it skips
            team = TeamNamespace(TEAM_SWITCH, rundir, members=3, failback=True, beacon=BEACON)
            extra = [f"switch={TEAM_SWITCH},mac={TEAM_MAC}"]
        with guest(rundir, "a", "bt") as a, guest(rundir, "b", "hybrid", *extra) as b:
            sock = rundir / f"{SWITCH}.sock"
            end = time.monotonic() + 120
            while not sock.exists():        # the pyvmm guests start the switch
                assert time.monotonic() < end and a.proc.poll() is None, a.errors
                time.sleep(0.2)
            q = qemu_guest(kernel, sock)
            q.expect("PYVMM-INIT-READY", timeout=600)
            run(q, "cat /sys/class/net/eth0/address", rf"\n{QEMU_MAC}\r?\n")
            run(q, "ip addr add 10.0.3.3/24 dev eth0 && ip link set eth0 up && echo NET-UP", r"\nNET-UP\r?\n")
            try:
                for g in (a, b):
                    g.expect("PYVMM-INIT-READY", timeout=TIMEOUT)
                macs = [run(g, "cat /sys/class/net/eth0/address", MAC_RE).group(1) for g in (a, b)]
                for g, addr in ((a, "10.0.3.1"), (b, "10.0.3.2")):
                    run(g, f"ip addr add {addr}/24 dev eth0 && ip link set eth0 up && echo NET-UP", r"\nNET-UP\r?\n")
            except (AssertionError, VmmError) as e:
                # Which guest ended, and what pyvmm said on the way out.
                raise AssertionError(f"{e}\n--- bt guest (exit {a.proc.poll()}) stderr tail:\n{a.errors[-2000:]}"
                                     f"\n--- hybrid guest (exit {b.proc.poll()}) stderr tail:\n{b.errors[-2000:]}") from None
            shared = Guests(rundir, a, b, q, macs, team)
            yield shared
            for g in (a, b):
                g.send("poweroff -f\n")
            assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0
    finally:
        if q is not None:
            q.kill()
        if shared is not None and shared.q is not q:
            shared.q.kill()
        if team is not None:
            team.close()
        stop_switch(SWITCH, rundir)


def test_bt_and_hybrid_guests_ping_and_transfer_a_file(guests):
    a, b, macs = guests.a, guests.b, guests.macs
    assert macs[0] != macs[1] and all(m.startswith("52:54:00:") for m in macs)
    run(a, "ping -c 2 -W 60 10.0.3.2 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    run(b, "ping -c 2 -W 60 10.0.3.1 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    # the switch learned both guests' MACs, each on its own port
    table = {e["mac"]: e["port"] for e in query_status(SWITCH, guests.rundir)["mac_table"]["entries"]}
    assert set(macs) <= set(table) and table[macs[0]] != table[macs[1]]

    received = b.send(f"(nc -l -p {PORT} >/tmp/got; md5sum /tmp/got) &\n")
    time.sleep(1)
    mark = a.send(f"dd if=/dev/urandom of=/tmp/f bs=1024 count=96 2>/dev/null; md5sum /tmp/f; "
                  f"sleep 1; nc 10.0.3.2 {PORT} </tmp/f && echo SENT\n")
    sent = a.expect(r"\n([0-9a-f]{32})\s+/tmp/f\r?\n", timeout=600, after=mark)
    a.expect(r"\nSENT\r?\n", timeout=600, after=mark)
    got = b.expect(r"([0-9a-f]{32})\s+/tmp/got\r?\n", timeout=600, after=received)
    assert got.group(1) == sent.group(1)


def test_qemu_guest_and_pyvmm_guests_ping_each_other(guests):
    run(guests.q, "ping -c 2 -W 60 10.0.3.1 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    run(guests.a, "ping -c 2 -W 60 10.0.3.3 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    run(guests.q, "ping -c 2 -W 60 10.0.3.2 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")


def test_tcp_stream_survives_team_failover_failback_and_a_silent_break(guests):
    if guests.team is None:
        pytest.skip("network namespaces need root")
    b = guests.b
    dev = run(b, f"grep -l {TEAM_MAC} /sys/class/net/*/address | cut -d/ -f5", r"\n(eth\d)\r?\n").group(1)
    run(b, f"ip addr add 10.79.0.2/24 dev {dev} && ip link set {dev} up && echo NET-UP", r"\nNET-UP\r?\n")
    # the guest's ARP teaches the switch its address: the failover announce is a gratuitous ARP
    run(b, f"ping -c 2 -W 60 {BRIDGE_ADDR} >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    f = stream_across_failovers(b, run, guests.team, dev, STREAM_PORT, BEACON, guests.rundir / "stream.json")
    print(f"\nstream {f['bytes']} bytes in {f['seconds']:.1f} s; longest pause before the events "
          f"{f['pause_before_ms']:.0f} ms")
    for name, gap in f["gap_ms"].items():
        print(f"{name}: the switch moved traffic in {f['switch_ms'][name]:.0f} ms; longest pause in the "
              f"TCP stream {gap:.0f} ms")
        # TCP resends what the dead member swallowed after its RTO (>= 200 ms, doubling while the
        # resends are lost too); a stream that paused far longer did not move to the standby
        # (tests/net/test_switch_failover_gap.py holds the switch's own gap to tighter bounds)
        bound = 10.0 + (BEACON[0] * BEACON[1] if name == "beacon" else 0.0)
        assert gap < bound * 1000, f"{name}: the stream paused {gap / 1000:.2f} s"


def test_a_killed_qemu_guest_is_removed_and_its_restart_reattaches(guests):
    def ports() -> dict[str, str]:
        st = query_status(SWITCH, guests.rundir)
        return {e["mac"]: e["port"] for e in st["mac_table"]["entries"]}
    run(guests.a, "ping -c 1 -W 60 10.0.3.3 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    old_port = ports()[QEMU_MAC]
    guests.q.proc.kill()                      # the VM dies mid-session: no goodbye on its socket
    guests.q.wait(timeout=60)
    end = time.monotonic() + 10
    while QEMU_MAC in ports():
        assert time.monotonic() < end, "the dead VM's port and address stayed"
        time.sleep(0.1)
    guests.q = q = qemu_guest(guests.kernel, guests.rundir / f"{SWITCH}.sock")
    q.expect("PYVMM-INIT-READY", timeout=600)
    run(q, "ip addr add 10.0.3.3/24 dev eth0 && ip link set eth0 up && echo NET-UP", r"\nNET-UP\r?\n")
    run(q, "ping -c 2 -W 60 10.0.3.1 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    run(guests.b, "ping -c 1 -W 60 10.0.3.3 >/dev/null && echo PING-OK", r"\nPING-OK\r?\n")
    assert ports()[QEMU_MAC] != old_port          # learned again, on the new VM's port
