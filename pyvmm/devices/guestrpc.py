"""GuestRPC: the message channels of the VMware backdoor (command 30) and
the RPCI commands pyvmm answers on them.

A guest opens a channel, sends one message (its length, then the bytes
four at a time in EBX), reads the reply (its length, then four bytes at
a time) and closes the channel.  This module holds only the channel state
machine and the text commands; registers are the backdoor's business
(devices/vmware_backdoor.py), which hands each request in as an
RpcRequest and copies the RpcResult back.

Commands answered (reply "1 <text>" on success, "0 <reason>" otherwise):
  log <text>                     passed to the `on_log` sink
  info-get guestinfo.<key>       the value set with --guestinfo or info-set
  info-set guestinfo.<key> <v>   stores v (visible to later info-get)
  pyvmm.poweroff                 asks pyvmm to power the VM off (exit 0)

Message types, status bits and the RPCI protocol number are those of the
VMware backdoor interface."""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Callable

from ..device import as_dict, as_int, restore_state, saved
from ..errors import ConfigError

log = logging.getLogger(__name__)

# message types (ECX bits 16..31 on input)
OPEN, SEND_SIZE, SEND_PAYLOAD, RECV_SIZE, RECV_PAYLOAD, RECV_STATUS, CLOSE = range(7)
# status bits (ECX bits 16..31 on output)
STATUS_SUCCESS = 0x0001
STATUS_DORECV = 0x0002      # a reply is waiting
STATUS_CLOSED = 0x0004
STATUS_UNSENT = 0x0008
STATUS_HB = 0x0080          # the high-bandwidth port may be used (pyvmm never sets it)
PROTO_RPCI = 0x49435052     # "RPCI": guest -> host requests
PROTO_TCLO = 0x4F4C4354     # "TCLO": host -> guest commands
FLAG_COOKIE = 0x80000000
CHANNELS = 8
MAX_MESSAGE = 1 << 16       # longer messages are refused at SEND_SIZE
GUESTINFO = "guestinfo."
POWEROFF_COMMAND = "pyvmm.poweroff"


@dataclass
class RpcRequest:
    kind: int       # message type
    param: int      # EBX
    channel: int    # EDX bits 16..31
    cookie: tuple[int, int]  # (ESI, EDI)


@dataclass
class RpcResult:
    status: int = 0          # 0: failure
    param: int | None = None     # new EBX
    edx_high: int | None = None  # new EDX bits 16..31 (a channel id or a message type)
    cookie: tuple[int, int] | None = None  # new (ESI, EDI)


class _Channel:
    __slots__ = ("proto", "cookie", "want", "inbox", "reply", "sent")

    def __init__(self, proto: int, cookie: tuple[int, int] | None):
        self.proto = proto
        self.cookie = cookie
        self.want = -1              # bytes still expected; -1: no message under way
        self.inbox = bytearray()
        self.reply: bytes | None = None
        self.sent = 0               # reply bytes already read


def parse_guestinfo(text: str) -> tuple[str, str]:
    """"key=value" (a leading "guestinfo." is optional) -> (key, value).
    Raises ConfigError for anything else."""
    key, sep, value = text.partition("=")
    if key.startswith(GUESTINFO):
        key = key[len(GUESTINFO):]
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise ConfigError(f"bad --guestinfo {text!r} (expected key=value, key of letters, digits, . _ -)")
    return key, value


class GuestRpc:
    """The channels and the RPCI command table.

    `on_log(text)` receives each "log" request; `on_poweroff()` is called
    for "pyvmm.poweroff"; `values` are the guestinfo keys (without the
    "guestinfo." prefix)."""

    STATE_VERSION = 1

    def __init__(self, values: dict[str, str] | None = None,
                 on_log: Callable[[str], None] = lambda text: None,
                 on_poweroff: Callable[[], None] = lambda: None):
        self.values = dict(values or {})
        self.on_log = on_log
        self.on_poweroff = on_poweroff
        self.channels: list[_Channel | None] = [None] * CHANNELS
        self.requests = 0

    def __repr__(self) -> str:
        open_ = sum(c is not None for c in self.channels)
        return f"GuestRpc(open={open_}, requests={self.requests}, keys={len(self.values)})"

    def reset(self) -> None:
        self.channels = [None] * CHANNELS

    # -- the channel state machine ------------------------------------------
    def handle(self, req: RpcRequest) -> RpcResult:
        """One backdoor message call; never raises for bad guest input."""
        if req.kind == OPEN:
            return self._open(req.param)
        ch = self.channels[req.channel] if 0 <= req.channel < CHANNELS else None
        if ch is None or (ch.cookie is not None and ch.cookie != req.cookie):
            return RpcResult(0)
        if req.kind == SEND_SIZE:
            if req.param > MAX_MESSAGE or ch.proto != PROTO_RPCI:
                return RpcResult(0)
            ch.want, ch.inbox, ch.reply, ch.sent = req.param, bytearray(), None, 0
            if ch.want == 0:
                self._finish(ch)
            return RpcResult(STATUS_SUCCESS)
        if req.kind == SEND_PAYLOAD:
            if ch.want <= 0:
                return RpcResult(0)
            take = min(4, ch.want)
            ch.inbox += (req.param & 0xFFFFFFFF).to_bytes(4, "little")[:take]
            ch.want -= take
            if ch.want == 0:
                self._finish(ch)
            return RpcResult(STATUS_SUCCESS)
        if req.kind == RECV_SIZE:
            if ch.reply is None:
                return RpcResult(STATUS_SUCCESS, param=0)
            return RpcResult(STATUS_SUCCESS | STATUS_DORECV, param=len(ch.reply), edx_high=SEND_SIZE)
        if req.kind == RECV_PAYLOAD:
            if ch.reply is None or ch.sent >= len(ch.reply):
                return RpcResult(0)
            chunk = ch.reply[ch.sent:ch.sent + 4].ljust(4, b"\0")
            ch.sent += 4
            return RpcResult(STATUS_SUCCESS, param=int.from_bytes(chunk, "little"), edx_high=SEND_PAYLOAD)
        if req.kind == RECV_STATUS:
            if ch.reply is None:
                return RpcResult(0)
            ch.reply, ch.sent, ch.want = None, 0, -1
            return RpcResult(STATUS_SUCCESS)
        if req.kind == CLOSE:
            self.channels[req.channel] = None
            return RpcResult(STATUS_SUCCESS)
        return RpcResult(0)

    def _open(self, param: int) -> RpcResult:
        proto = param & ~FLAG_COOKIE & 0xFFFFFFFF
        if proto not in (PROTO_RPCI, PROTO_TCLO):
            return RpcResult(0)
        try:
            index = self.channels.index(None)
        except ValueError:
            return RpcResult(0)
        # without cookies, (ESI, EDI) are whatever the guest had: not checked
        cookie = (secrets.randbits(32), secrets.randbits(32)) if param & FLAG_COOKIE else None
        self.channels[index] = _Channel(proto, cookie)
        return RpcResult(STATUS_SUCCESS, edx_high=index, cookie=cookie)

    def _finish(self, ch: _Channel) -> None:
        text = bytes(ch.inbox).rstrip(b"\0").decode("utf-8", "replace")
        ch.want = -1
        ch.reply = self.command(text).encode()
        ch.sent = 0

    # -- the RPCI commands -------------------------------------------------------
    def command(self, text: str) -> str:
        """The reply ("1 ..." or "0 ...") to one RPCI request."""
        self.requests += 1
        name, _, arg = text.partition(" ")
        log.debug("guestrpc: %r", text)
        if name == "log":
            self.on_log(arg)
            return "1 "
        if name == "info-get":
            key = arg.strip()
            if not key.startswith(GUESTINFO) or key[len(GUESTINFO):] not in self.values:
                return "0 No value found"
            return "1 " + self.values[key[len(GUESTINFO):]]
        if name == "info-set":
            key, _, value = arg.lstrip().partition(" ")
            if not key.startswith(GUESTINFO) or len(key) == len(GUESTINFO):
                return "0 Invalid key"
            self.values[key[len(GUESTINFO):]] = value
            return "1 "
        if name == POWEROFF_COMMAND:
            self.on_poweroff()
            return "1 "
        return "0 Unknown command"

    def save(self) -> dict:
        """Open channels are not saved: a guest mid-conversation sees its
        channel closed after restore(), as after a reset."""
        return saved(self, {"values": dict(self.values), "requests": self.requests})

    def restore(self, state: dict) -> None:
        restore_state(self, state, self._load)

    def _load(self, state: dict) -> None:
        values = as_dict(state["values"])
        if not all(type(k) is str and type(v) is str for k, v in values.items()):
            raise TypeError("guestinfo values must be strings")
        self.values = dict(values)
        self.requests = as_int(state["requests"])
        self.reset()

