"""The VMware backdoor (devices/vmware_backdoor.py, devices/guestrpc.py,
docs/vmware-backdoor.md).

* the device and the GuestRPC channels through the I/O bus with a fake
  vCPU (every command, the whole RPC conversation, bad input);
* `pyvmm run` options (--vmware-backdoor, --guestinfo);
* assembled guests: a CPL0 guest runs GETVERSION, GETHZ and a GuestRPC
  "info-get" on both engines; a CPL3 guest with IOPL 0 reaches the
  backdoor under bt only when it is on (otherwise #GP, as for any port);
* a Linux guest under bt running Debian's vmware-rpctool from the
  open-vm-tools package (slow: one boot of the fitted kernel):
  log, info-get, info-set, poweroff."""

from __future__ import annotations

import pytest

from pyvmm.bus import Bus
from pyvmm.config import VmConfig
from pyvmm.devices import guestrpc as G
from pyvmm.devices.vmware_backdoor import MAGIC, PORT, VmwareBackdoor
from pyvmm.errors import ConfigError
from pyvmm.machine import StopReason

from .fitted_kernel import fitted_kernel
from .hostfacts import require_from_setup
from .modeguests import USTACK, boot_for
from .rawguest import build_guest, require_kvm, run_machine

M32 = 0xFFFFFFFF
RPCI_COOKIE = G.PROTO_RPCI | G.FLAG_COOKIE


class FakeRegs:
    """BackdoorRegs over a dict, recording commits."""

    def __init__(self, **regs):
        self.r = {n: 0 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")}
        self.r.update(regs)
        self.commits = 0

    def get(self, name): return self.r[name]
    def set(self, name, value): self.r[name] = value
    def commit(self): self.commits += 1


class Env:
    def __init__(self, values=None):
        self.logs: list[str] = []
        self.poweroffs = 0
        self.rpc = G.GuestRpc(values or {}, self.logs.append, self._off)
        self.regs = FakeRegs()
        self.dev = VmwareBackdoor(lambda: self.regs, self.rpc, tsc_hz=0x1_2345_6789,
                                  bus_hz=1_000_000_000, wall_ns=lambda: 1_700_000_000_123_456_789)
        self.bus = Bus("io")
        self.bus.insert(PORT, 2, self.dev, "vmware-backdoor")

    def _off(self):
        self.poweroffs += 1

    def call(self, cmd, **regs) -> FakeRegs:
        self.regs = FakeRegs(**{"rax": MAGIC, "rcx": cmd, "rdx": PORT, **regs})
        self.regs.r["rax"] = self.bus.read(PORT, 4)
        return self.regs

    def msg(self, kind, ch=0, param=0, cookie=(0, 0)) -> FakeRegs:
        return self.call((kind << 16) | 30, rbx=param, rdx=(ch << 16) | PORT, rsi=cookie[0], rdi=cookie[1])

    def rpc_call(self, text: str, cookie: bool = True) -> str:
        """One whole RPCI conversation, as vmware-rpctool has it."""
        r = self.msg(G.OPEN, param=RPCI_COOKIE if cookie else G.PROTO_RPCI)
        assert r.r["rcx"] >> 16 & G.STATUS_SUCCESS
        ch, ck = r.r["rdx"] >> 16, (r.r["rsi"], r.r["rdi"])
        data = text.encode()
        assert self.msg(G.SEND_SIZE, ch, len(data), ck).r["rcx"] >> 16 == G.STATUS_SUCCESS
        for i in range(0, len(data), 4):
            word = int.from_bytes(data[i:i + 4].ljust(4, b"\0"), "little")
            assert self.msg(G.SEND_PAYLOAD, ch, word, ck).r["rcx"] >> 16 == G.STATUS_SUCCESS
        r = self.msg(G.RECV_SIZE, ch, 0, ck)
        assert r.r["rcx"] >> 16 == G.STATUS_SUCCESS | G.STATUS_DORECV
        assert r.r["rdx"] >> 16 == G.SEND_SIZE and r.r["rdx"] & 0xFFFF == PORT
        size, reply = r.r["rbx"], b""
        while len(reply) < size:
            r = self.msg(G.RECV_PAYLOAD, ch, G.STATUS_SUCCESS, ck)
            assert r.r["rcx"] >> 16 == G.STATUS_SUCCESS and r.r["rdx"] >> 16 == G.SEND_PAYLOAD
            reply += r.r["rbx"].to_bytes(4, "little")
        assert self.msg(G.RECV_STATUS, ch, G.STATUS_SUCCESS, ck).r["rcx"] >> 16 == G.STATUS_SUCCESS
        assert self.msg(G.CLOSE, ch, 0, ck).r["rcx"] >> 16 == G.STATUS_SUCCESS
        return reply[:size].decode()


def test_getversion_gethz_gettime():
    e = Env()
    r = e.call(10)
    assert (r.r["rax"], r.r["rbx"], r.r["rcx"]) == (6, MAGIC, 4) and r.commits == 1
    r = e.call(45)
    assert (r.r["rax"], r.r["rbx"], r.r["rcx"]) == (0x2345_6789, 1, 1_000_000_000)
    r = e.call(23)
    assert (r.r["rax"], r.r["rbx"]) == (1_700_000_000, 123_456)
    r = e.call(46)
    assert (r.r["rax"], r.r["rsi"], r.r["rdx"], r.r["rbx"]) == (MAGIC, 0, 1_700_000_000, 123_456)
    assert e.dev.counts == {"getversion": 1, "gethz": 1, "gettime": 1, "gettimefull": 1}


def test_not_the_backdoor_reads_all_ones():
    e = Env()
    e.regs = FakeRegs(rax=0x1234, rcx=10)
    assert e.bus.read(PORT, 4) == M32 and e.regs.r["rbx"] == 0          # wrong magic
    e.regs = FakeRegs(rax=MAGIC, rcx=10)
    assert e.bus.read(PORT, 1) == 0xFF and e.regs.r["rbx"] == 0          # `in al, dx`
    assert e.bus.read(PORT + 1, 4) == M32                                # no high-bandwidth port
    e.regs = FakeRegs(rax=MAGIC, rcx=999)
    assert e.bus.read(PORT, 4) == M32 and e.regs.commits == 0           # unknown command
    e.bus.write(PORT, 4, 0)
    assert e.dev.ignored == 5 and not e.dev.counts


def test_gethz_unknown_rate_says_unsupported():
    e = Env()
    e.dev.tsc_hz = 0
    assert e.call(45).r["rbx"] == M32


def test_rpc_log_info_get_set_and_poweroff():
    e = Env({"color": "blue"})
    assert e.rpc_call("log hello from the guest") == "1 "
    assert e.logs == ["hello from the guest"]
    assert e.rpc_call("info-get guestinfo.color") == "1 blue"
    assert e.rpc_call("info-get guestinfo.nothing") == "0 No value found"
    assert e.rpc_call("info-set guestinfo.shape round and red") == "1 "
    assert e.rpc_call("info-get guestinfo.shape", cookie=False) == "1 round and red"
    assert e.rpc_call("info-set other.key 1").startswith("0 ")
    assert e.rpc_call("what is this").startswith("0 ")
    assert e.poweroffs == 0
    assert e.rpc_call("pyvmm.poweroff") == "1 " and e.poweroffs == 1
    assert all(c is None for c in e.rpc.channels)


def test_rpc_refuses_bad_channel_cookie_state_and_protocol():
    e = Env()
    assert e.msg(G.OPEN, param=0x12345678).r["rcx"] >> 16 == 0          # unknown protocol
    r = e.msg(G.OPEN, param=RPCI_COOKIE)
    ch, ck = r.r["rdx"] >> 16, (r.r["rsi"], r.r["rdi"])
    assert e.msg(G.SEND_SIZE, ch, 4, (ck[0] ^ 1, ck[1])).r["rcx"] >> 16 == 0   # wrong cookie
    assert e.msg(G.SEND_SIZE, ch + 1, 4, ck).r["rcx"] >> 16 == 0              # not open
    assert e.msg(G.SEND_PAYLOAD, ch, 0, ck).r["rcx"] >> 16 == 0               # no size sent
    assert e.msg(G.RECV_PAYLOAD, ch, 1, ck).r["rcx"] >> 16 == 0               # no reply
    assert e.msg(G.SEND_SIZE, ch, G.MAX_MESSAGE + 1, ck).r["rcx"] >> 16 == 0  # too long
    r = e.msg(G.RECV_SIZE, ch, 0, ck)                                         # nothing to receive
    assert r.r["rcx"] >> 16 == G.STATUS_SUCCESS and r.r["rbx"] == 0
    for _ in range(G.CHANNELS - 1):
        assert e.msg(G.OPEN, param=G.PROTO_RPCI).r["rcx"] >> 16 == G.STATUS_SUCCESS
    assert e.msg(G.OPEN, param=G.PROTO_RPCI).r["rcx"] >> 16 == 0              # all 8 in use
    e.dev.reset()
    assert e.msg(G.OPEN, param=G.PROTO_RPCI).r["rcx"] >> 16 == G.STATUS_SUCCESS


@pytest.mark.parametrize("text,expect", [("color=blue", ("color", "blue")),
                                         ("guestinfo.a.b=x=y", ("a.b", "x=y")), ("empty=", ("empty", ""))])
def test_parse_guestinfo(text, expect):
    assert G.parse_guestinfo(text) == expect


@pytest.mark.parametrize("text", ["novalue", "=v", "bad key=v", "guestinfo.=v"])
def test_parse_guestinfo_refuses(text):
    with pytest.raises(ConfigError):
        G.parse_guestinfo(text)


def test_cli_options():
    from pyvmm.cli.main import build_parser, config_from_args, main
    args = build_parser().parse_args(["run", "--engine", "bt", "--kernel", "/dev/null", "--initrd", "/dev/null",
                                      "--vmware-backdoor", "--guestinfo", "color=blue",
                                      "--guestinfo", "guestinfo.size=9"])
    cfg = config_from_args(args)
    assert cfg.vmware_backdoor and cfg.guestinfo == {"color": "blue", "size": "9"}
    assert not VmConfig().vmware_backdoor
    for bad in (["--vmware-backdoor", "--guestinfo", "nokey"], ["--guestinfo", "a=b"]):
        assert main(["run", "--engine", "bt", "--kernel", "/dev/null", *bad]) != 0


# -- assembled guests --------------------------------------------------------------

def _run(code: bytes, engine: str, backdoor: bool, guestinfo=None, timeout: float = 60.0):
    """Runs a boot_for guest to its final hlt; (UART output, final state, machine)."""
    out = bytearray()
    cfg = VmConfig(mem_mib=64, engine=engine, irqchip=False, no_reboot=True,
                   vmware_backdoor=backdoor, guestinfo=dict(guestinfo or {}))
    machine, state = run_machine(cfg, boot_for(code), out.extend, timeout)
    assert machine.stop_status.reason == StopReason.HALTED, machine.stop_status
    return bytes(out), state, machine


def _bd(ecx: str, ebx: str = "0", edx: str = "0x5658") -> str:
    return f"mov eax, 0x564D5868; mov ebx, {ebx}; mov ecx, {ecx}; mov edx, {edx}; in eax, dx"


MESSAGE = b"info-get guestinfo.color"
# GETVERSION -> r8..r10, GETHZ -> r11..r13, then one GuestRPC conversation
# whose reply goes out on the UART; r15 = 1 at the end, 0xbad on a failure.
CPL0_GUEST = f"""
.intel_syntax noprefix
    xor r15d, r15d
    {_bd("10")}
    mov r8d, eax; mov r9d, ebx; mov r10d, ecx
    {_bd("45")}
    mov r11d, eax; mov r12d, ebx; mov r13d, ecx
    {_bd("30", ebx=hex(RPCI_COOKIE))}
    test ecx, 0x10000; jz fail
    mov r14d, edx; and r14d, 0xFFFF0000; or r14d, 0x5658
    {_bd(hex(1 << 16 | 30), ebx=str(len(MESSAGE)), edx="r14d")}
    test ecx, 0x10000; jz fail
    lea rbp, [rip + msg]; mov r12d, {len(MESSAGE)}
1:  mov eax, 0x564D5868; mov ebx, [rbp]; mov ecx, {2 << 16 | 30}; mov edx, r14d; in eax, dx
    test ecx, 0x10000; jz fail
    add rbp, 4; sub r12d, 4; jg 1b
    {_bd(hex(3 << 16 | 30), edx="r14d")}
    test ecx, 0x20000; jz fail
    mov ebp, ebx
2:  test ebp, ebp; jz 4f
    {_bd(hex(4 << 16 | 30), ebx="1", edx="r14d")}
    test ecx, 0x10000; jz fail
    mov ecx, 4
3:  mov eax, ebx; mov edx, 0x3f8; out dx, al
    shr ebx, 8; dec ebp; jz 4f; dec ecx; jnz 3b
    jmp 2b
4:  {_bd(hex(5 << 16 | 30), ebx="1", edx="r14d")}
    test ecx, 0x10000; jz fail
    {_bd(hex(6 << 16 | 30), edx="r14d")}
    test ecx, 0x10000; jz fail
    mov r15d, 1
    hlt
fail:
    mov r15d, 0xbad
    hlt
msg: .ascii "{MESSAGE.decode()}"
.byte 0, 0, 0, 0
"""


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_cpl0_guest_version_hz_and_rpc(engine):
    out, st, m = _run(build_guest(CPL0_GUEST, "long"), engine, True, {"color": "blue"})
    r = st.regs
    assert r["r15"] == 1, hex(r["r15"])
    assert (r["r8"], r["r9"], r["r10"]) == (6, MAGIC, 4)
    assert r["r11"] != M32 and r["r13"] == 1_000_000_000   # TSC Hz (low half), APIC bus Hz
    assert out == b"1 blue"
    dev = m.devices["vmware_backdoor"]
    assert dev.counts["getversion"] == 1 and dev.counts["message"] >= 10
    assert dev.rpc.requests == 1


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
def test_off_by_default_port_is_unclaimed(engine):
    src = f".intel_syntax noprefix\n    {_bd('10')}\n    hlt\n"
    _, st, m = _run(build_guest(src, "long"), engine, False)
    assert st.regs["rax"] & M32 == M32 and st.regs["rbx"] & M32 == 0   # all-ones, EBX untouched
    assert "vmware_backdoor" not in m.devices


IDT = 0x112000
# CPL0 installs a #GP handler (r14 = faulting RIP) and irets to CPL3 with
# IOPL 0; CPL3 runs GETVERSION, sets r15 = 1 and ends with `hlt` (#GP).
CPL3_GUEST = f"""
.intel_syntax noprefix
    xor r15d, r15d
    xor r14d, r14d
    mov rdi, {IDT + 13 * 16}
    lea rax, [rip + gp]
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8E00
    shr eax, 16
    mov word ptr [rdi + 6], ax
    mov qword ptr [rdi + 8], 0
    lidt [rip + idtr]
    lea r12, [rip + user_in]
    lea r13, [rip + user_hlt]
    push 0x1b
    push {USTACK}
    push 0x2
    push 0x23
    lea rax, [rip + user]
    push rax
    iretq
user:
    mov eax, 0x564D5868; xor ebx, ebx; mov ecx, 10; mov edx, 0x5658
user_in:
    in eax, dx
    mov r15d, 1
user_hlt:
    hlt
gp:
    mov r14, [rsp + 8]
    hlt
idtr: .word 256 * 16 - 1
      .quad {IDT}
"""


@pytest.mark.parametrize("backdoor", [True, False])
def test_cpl3_backdoor_bypasses_iopl_under_bt(backdoor):
    _, st, _ = _run(build_guest(CPL3_GUEST, "long"), "bt", backdoor)
    r = st.regs
    if backdoor:
        assert r["r15"] == 1 and (r["rax"] & M32, r["rbx"] & M32) == (6, MAGIC)
        assert r["r14"] == r["r13"]   # the #GP came from the CPL3 `hlt` after the backdoor call
    else:
        assert r["r15"] == 0 and r["r14"] == r["r12"]   # #GP at the `in`, as for any port



@pytest.mark.kvm
def test_cpl3_backdoor_under_hw_follows_kvm():
    """Under hw the CPL3 I/O permission check is KVM's: without KVM's own
    enable_vmware_backdoor the `in` is #GP in the guest (pyvmm never sees
    it), as for any port; with it, KVM lets the access exit to pyvmm."""
    require_kvm()
    try:
        kvm_backdoor = open("/sys/module/kvm/parameters/enable_vmware_backdoor").read().strip() == "Y"
    except OSError:
        kvm_backdoor = False
    _, st, m = _run(build_guest(CPL3_GUEST, "long"), "hw", True)
    r = st.regs
    if kvm_backdoor:
        assert r["r15"] == 1 and (r["rax"] & M32, r["rbx"] & M32) == (6, MAGIC)
    else:
        assert r["r15"] == 0 and r["r14"] == r["r12"]
        assert not m.devices["vmware_backdoor"].counts

CPUID_GUEST = """
.intel_syntax noprefix
    mov eax, 0x40000000; cpuid
    mov r8d, eax; mov r9d, ebx; mov r10d, ecx; mov r11d, edx
    mov eax, 0x40000010; cpuid
    mov r12d, eax; mov r13d, ebx
    mov eax, 0x40000200; cpuid
    mov r14d, ebx; mov r15d, eax
    mov eax, 0x40000100; cpuid
    hlt
"""


@pytest.mark.parametrize("engine", ["bt", pytest.param("hw", marks=pytest.mark.kvm)])
@pytest.mark.parametrize("backdoor", [True, False])
def test_cpuid_says_vmware_and_keeps_kvm_and_pyvmm_leaves(engine, backdoor):
    _, st, _ = _run(build_guest(CPUID_GUEST, "long"), engine, backdoor)
    r = st.regs
    sig = b"".join((r[n] & M32).to_bytes(4, "little") for n in ("r9", "r10", "r11"))
    kvm_moved = (r["r14"] & M32).to_bytes(4, "little")
    from pyvmm.paravirt import abi
    assert tuple(r[n] & M32 for n in ("rbx", "rcx", "rdx")) == abi.signature_words()  # pyvmm's leaves stay
    if backdoor:
        assert sig == b"VMwareVMware" and r["r8"] == 0x40000010
        assert r["r12"] > 0 and r["r13"] == 1_000_000               # TSC kHz, APIC bus kHz
        assert kvm_moved == b"KVMK" and r["r15"] == 0x40000201
    else:
        assert sig != b"VMwareVMware" and kvm_moved != b"KVMK"


# -- Linux with Debian's vmware-rpctool (one bt boot) ------------------------------

LINUX_CMDLINE = "console=ttyS0 reboot=k panic=-1"


@pytest.fixture(scope="module")
def rpctool_initrd():
    from pyvmm.guest.extra import rpctool_initramfs
    require_from_setup(programs=["apt-get", "dpkg"], package="apt, dpkg")
    try:
        return str(rpctool_initramfs())
    except ConfigError as e:     # a fetch that fails is a failure, not a host fact
        pytest.fail(f"cannot fetch Debian's open-vm-tools: {e}", pytrace=False)


@pytest.mark.slow
def test_linux_vmware_rpctool_under_bt(rpctool_initrd):
    from .guest_session import GuestSession
    # The fitted kernel (tests/fitted_kernel.py) runs a dynamically linked
    # glibc program: rpctool links only libc, which copes without futex and
    # SysV IPC.
    with GuestSession("run", "--engine", "bt", "--kernel", fitted_kernel(), "--initrd", rpctool_initrd,
                      "--append", LINUX_CMDLINE, "--mem", "256M", "--no-reboot", "--verbose",
                      "--vmware-backdoor", "--guestinfo", "color=blue") as g:
        g.expect("PYVMM-INIT-READY", 900)
        sent = g.send('vmware-rpctool "log hello-from-guest"; echo RC1=$?\n')
        g.expect(r"RC1=0", 300, after=sent)
        sent = g.send('vmware-rpctool "info-get guestinfo.color"; echo RC2=$?\n')
        g.expect(r"\nblue\r?\nRC2=0", 300, after=sent)
        sent = g.send('vmware-rpctool "info-set guestinfo.shape round"; vmware-rpctool "info-get guestinfo.shape"\n')
        g.expect(r"\nround\r?\n", 300, after=sent)
        g.send("vmware-rpctool pyvmm.poweroff\n")
        assert g.wait(300) == 0, g.errors[-2000:]
        assert "pyvmm: guest log: hello-from-guest" in g.errors
        assert "guest stopped: poweroff vmware backdoor poweroff" in g.errors, g.errors[-2000:]
