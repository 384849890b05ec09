"""The far end of a guest's TCP stream, run inside a test's namespace:
`python3 -m tests.net.stream_receiver ADDR PORT OUT.json`. Accepts one
connection, timestamps every arrival with CLOCK_MONOTONIC (shared by all
processes, so the test can line arrivals up with what it did to the
links), prints `ready`, then `bytes N` about every 0.1 s, and at the end
of the stream writes {"arrivals": [[t, n], ...], "bytes", "md5"} to
OUT.json and prints `done BYTES MD5`."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time


def main() -> int:
    addr, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    digest, total, arrivals = hashlib.md5(), 0, []
    reported = 0.0
    while data := conn.recv(1 << 16):
        now = time.monotonic()
        arrivals.append((now, len(data)))
        digest.update(data)
        total += len(data)
        if now - reported >= 0.1:
            print(f"bytes {total}", flush=True)
            reported = now
    with open(out, "w") as f:
        json.dump({"arrivals": arrivals, "bytes": total, "md5": digest.hexdigest()}, f)
    print(f"done {total} {digest.hexdigest()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
