"""The VMware backdoor: an I/O port through which a guest talks to its
hypervisor by register convention.

The guest loads EAX with the magic 0x564D5868 ("VMXh"), CX with a command
number and EBX with a parameter, then runs `in eax, dx` with DX = 0x5658.
The hypervisor answers in EAX, EBX, ECX, EDX, ESI and EDI.  Commands:

  10 GETVERSION    EAX = 6 (protocol version), EBX = magic, ECX = product type
  23 GETTIME       EAX = host time (s), EBX = microseconds, ECX = max lag (us)
  30 MESSAGE       the GuestRPC channels (devices/guestrpc.py): ECX bits
                   16..31 the message type in, the status out
  45 GETHZ         EAX:EBX (low, high) = TSC Hz, ECX = APIC bus Hz
  46 GETTIMEFULL   EAX = magic, ESI:EDX (high, low) = s, EBX = us, ECX = max lag

Any other command, a wrong magic, or an access that is not a 32-bit `in`
leaves the registers alone and reads all-ones, as an unclaimed port would.
The device sits at offset 0 of a 2-port range (the low-bandwidth port);
offset 1 is the high-bandwidth port, which pyvmm does not offer (the
GuestRPC status never has the HB bit, so guests use the 4-byte path) and
which reads all-ones.

The registers of the vCPU that ran `in` come from `regs()`, a callable the
wiring (devices/vmware_install.py) gives per engine; the device knows
neither engines nor where it sits."""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from ..device import as_dict, as_int, restore_state, saved
from .guestrpc import GuestRpc, RpcRequest

log = logging.getLogger(__name__)

MAGIC = 0x564D5868
PORT = 0x5658               # low bandwidth: `in eax, dx`
HB_PORT = 0x5659            # high bandwidth: `rep insb/outsb` (not offered)
LENGTH = 2
VERSION = 6                 # the protocol version guests check for
PRODUCT_WORKSTATION = 4     # product types: 1 Express, 2 ESX, 3 GSX, 4 Workstation

CMD_GETVERSION = 10
CMD_GETTIME = 23
CMD_MESSAGE = 30
CMD_GETHZ = 45
CMD_GETTIMEFULL = 46
COMMAND_NAMES = {CMD_GETVERSION: "getversion", CMD_GETTIME: "gettime", CMD_MESSAGE: "message",
                 CMD_GETHZ: "gethz", CMD_GETTIMEFULL: "gettimefull"}

M32 = 0xFFFFFFFF
ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
MAX_LAG_US = 0              # pyvmm hands out the host clock directly: no lag


class BackdoorRegs(Protocol):
    """The registers of the vCPU doing the access (32-bit names)."""

    def get(self, name: str) -> int: ...
    def set(self, name: str, value: int) -> None: ...
    def commit(self) -> None: ...


class VmwareBackdoor:
    """`regs()` gives the accessing vCPU's registers; `tsc_hz` / `bus_hz`
    are what GETHZ reports (0: unknown, reported as unsupported);
    `wall_ns()` is the host time for GETTIME."""

    STATE_VERSION = 1

    def __init__(self, regs: Callable[[], BackdoorRegs], rpc: GuestRpc, tsc_hz: int = 0,
                 bus_hz: int = 0, wall_ns: Callable[[], int] = time.time_ns):
        self.regs = regs
        self.rpc = rpc
        self.tsc_hz = tsc_hz
        self.bus_hz = bus_hz
        self.wall_ns = wall_ns
        self.counts: dict[str, int] = {}
        self.ignored = 0

    def __repr__(self) -> str:
        return f"VmwareBackdoor(counts={self.counts}, ignored={self.ignored}, {self.rpc!r})"

    # -- bus interface ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 4:
            self.ignored += 1
            return ALL_ONES[size]
        r = self.regs()
        if r.get("rax") & M32 != MAGIC:
            self.ignored += 1
            return ALL_ONES[size]
        cmd = r.get("rcx") & 0xFFFF
        handler = _COMMANDS.get(cmd)
        if handler is None:
            self.ignored += 1
            log.debug("vmware backdoor: unknown command %d", cmd)
            return ALL_ONES[size]
        name = COMMAND_NAMES[cmd]
        self.counts[name] = self.counts.get(name, 0) + 1
        eax = handler(self, r) & M32
        # EAX both ways: the engine completes `in` with the value returned,
        # but KVM's emulated-I/O path may keep the EAX written with the rest
        r.set("rax", eax)
        r.commit()
        return eax

    def write(self, offset: int, size: int, value: int) -> None:
        self.ignored += 1       # the backdoor is driven by `in` only

    def reset(self) -> None:
        self.rpc.reset()

    def save(self) -> dict:
        return saved(self, {"counts": dict(self.counts), "rpc": self.rpc.save()})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        self.counts = {str(k): as_int(v) for k, v in as_dict(state["counts"]).items()}
        self.rpc.restore(state["rpc"])

    # -- commands: each sets the other registers and returns the new EAX ------
    def _getversion(self, r: BackdoorRegs) -> int:
        r.set("rbx", MAGIC)
        r.set("rcx", PRODUCT_WORKSTATION)
        return VERSION

    def _gethz(self, r: BackdoorRegs) -> int:
        if not self.tsc_hz:
            r.set("rbx", M32)   # "not supported"
            return M32
        r.set("rbx", self.tsc_hz >> 32)
        r.set("rcx", self.bus_hz & M32 if self.bus_hz else M32)
        return self.tsc_hz & M32

    def _now(self) -> tuple[int, int]:
        ns = self.wall_ns()
        return ns // 1_000_000_000, ns // 1000 % 1_000_000

    def _gettime(self, r: BackdoorRegs) -> int:
        secs, usecs = self._now()
        r.set("rbx", usecs)
        r.set("rcx", MAX_LAG_US)
        return secs & M32

    def _gettimefull(self, r: BackdoorRegs) -> int:
        secs, usecs = self._now()
        r.set("rsi", secs >> 32 & M32)
        r.set("rdx", secs & M32)
        r.set("rbx", usecs)
        r.set("rcx", MAX_LAG_US)
        return MAGIC

    def _message(self, r: BackdoorRegs) -> int:
        edx = r.get("rdx") & M32
        req = RpcRequest(kind=r.get("rcx") >> 16 & 0xFFFF, param=r.get("rbx") & M32,
                         channel=edx >> 16, cookie=(r.get("rsi") & M32, r.get("rdi") & M32))
        res = self.rpc.handle(req)
        r.set("rcx", res.status << 16)
        if res.param is not None:
            r.set("rbx", res.param & M32)
        if res.edx_high is not None:
            r.set("rdx", (res.edx_high << 16) | (edx & 0xFFFF))
        if res.cookie is not None:
            r.set("rsi", res.cookie[0])
            r.set("rdi", res.cookie[1])
        return MAGIC


_COMMANDS: dict[int, Callable[[VmwareBackdoor, BackdoorRegs], int]] = {
    CMD_GETVERSION: VmwareBackdoor._getversion,
    CMD_GETTIME: VmwareBackdoor._gettime,
    CMD_MESSAGE: VmwareBackdoor._message,
    CMD_GETHZ: VmwareBackdoor._gethz,
    CMD_GETTIMEFULL: VmwareBackdoor._gettimefull,
}
