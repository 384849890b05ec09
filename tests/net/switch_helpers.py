"""What the switch tests share: Ethernet frames built by hand, a client
speaking QEMU's stream framing, and a `pyvmm switch run` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvmm.net.framing import StreamDecoder, encode
from pyvmm.net.switchd import query_status

BROADCAST = b"\xff" * 6
TEST_ETHERTYPE = 0x88B5     # IEEE "local experimental": nobody else's protocol


def mac(n: int) -> bytes:
    """A locally administered unicast address."""
    return bytes([0x02, 0, 0, 0, (n >> 8) & 0xFF, n & 0xFF])


def eth(dst: bytes, src: bytes, payload: bytes = b"", ethertype: int = TEST_ETHERTYPE) -> bytes:
    frame = dst + src + struct.pack(">H", ethertype) + payload
    return frame + bytes(max(0, 60 - len(frame)))


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, socket.inet_aton(src_ip),
                       bytes(6), socket.inet_aton(target_ip))
    return eth(BROADCAST, src_mac, body, 0x0806)


def parse_arp(frame: bytes) -> dict | None:
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    _h, _p, _hl, _pl, op, sha, spa, tha, tpa = struct.unpack_from(">HHBBH6s4s6s4s", frame, 14)
    return {"op": op, "sha": sha, "spa": socket.inet_ntoa(spa), "tha": tha, "tpa": socket.inet_ntoa(tpa),
            "dst": frame[0:6]}


class Client:
    """A VM's end of the switch: length-prefixed frames over a Unix socket."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.decoder = StreamDecoder(1 << 16)
        self.pending: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(encode(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> bytes | None:
        """The next frame, None when none came within timeout."""
        end = time.monotonic() + timeout
        while not self.pending:
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def recv_until(self, pred, timeout: float = 10.0) -> bytes | None:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            frame = self.recv(left)
            if frame is None:
                return None
            if pred(frame):
                return frame
        return None

    def close(self) -> None:
        self.sock.close()


class SwitchProcess:
    """`pyvmm switch run NAME` in a child process (optionally inside a
    network namespace), sockets in a fresh short directory."""

    def __init__(self, config: dict | None = None, name: str = "t", netns: str | None = None):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="pvsw", dir="/tmp"))
        self.env = dict(os.environ, PYVMM_SWITCH_DIR=str(self.dir))
        cmd = [sys.executable, "-m", "pyvmm", "switch", "run", name]
        if config is not None:
            cfg = self.dir / "switch.json"
            cfg.write_text(json.dumps(config))
            cmd += ["--config", str(cfg)]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.proc = subprocess.Popen(cmd, env=self.env, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 15
        while not (self.dir / f"{name}.ctl").exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"switch did not start: {self.proc.stderr.read() if self.proc.poll() is not None else 'timeout'}")
            time.sleep(0.02)

    def socket_path(self, group: str = "default") -> Path:
        return self.dir / (f"{self.name}.sock" if group == "default" else f"{self.name}.{group}.sock")

    def client(self, group: str = "default") -> Client:
        """A connected client whose port the switch has made (so that
        frames sent next reach it)."""
        def names() -> set[str]:
            return {p["name"] for p in self.status()["ports"]}
        before = names()
        c = Client(self.socket_path(group))
        end = time.monotonic() + 10
        while not names() - before:
            assert time.monotonic() < end, "the switch did not accept the client"
            time.sleep(0.01)
        return c

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pyvmm", "switch", *args], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def status(self) -> dict:
        return query_status(self.name, self.dir)

    def port_of(self, st: dict, name: str) -> dict:
        return next(p for p in st["ports"] if p["name"] == name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()
        return self.proc.returncode
