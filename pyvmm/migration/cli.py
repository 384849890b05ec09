"""`pyvmm migrate QMP_SOCKET URI`: drives a live migration through a running
pyvmm's QMP socket and reports how it went (exit 0 when completed)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import VmmError

POLL_S = 0.05


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm migrate", description="live-migrate the VM behind a QMP socket")
    p.add_argument("qmp", metavar="QMP_SOCKET", help="the source's --qmp unix socket path")
    p.add_argument("uri", metavar="URI", help="the destination's --incoming: tcp:HOST:PORT or unix:PATH")
    p.add_argument("--downtime-limit", type=int, metavar="MS", help="longest pause allowed (default 300)")
    p.add_argument("--max-bandwidth", type=int, metavar="BYTES_PER_S", help="0: unlimited")
    p.add_argument("--blk", action="store_true",
                   help="copy the drives' contents along (the destination opens its own images)")
    p.add_argument("--quit", action="store_true", help="end the source once the migration completed")
    p.add_argument("--json", action="store_true", help="print the final query-migrate as JSON")
    p.add_argument("--timeout", type=float, default=600.0, help="give up (cancel) after this many seconds")
    return p


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    from ..api.client import QmpClient
    try:
        client = QmpClient(args.qmp)
        try:
            return _drive(client, args)
        finally:
            client.close()
    except VmmError as e:
        print(f"pyvmm: migrate: {e}", file=sys.stderr)
        return 1


def _drive(client, args) -> int:
    params = {}
    if args.downtime_limit is not None:
        params["downtime-limit"] = args.downtime_limit
    if args.max_bandwidth is not None:
        params["max-bandwidth"] = args.max_bandwidth
    if params:
        client.execute("migrate-set-parameters", params)
    client.execute("migrate", {"uri": args.uri, **({"blk": True} if args.blk else {})})
    deadline = time.monotonic() + args.timeout
    while True:
        info = client.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            client.execute("migrate_cancel")
            print(f"pyvmm: migrate: no end after {args.timeout:.0f} s; cancelled", file=sys.stderr)
            return 1
        time.sleep(POLL_S)
    if args.json:
        print(json.dumps(info))
    if info["status"] != "completed":
        print(f"pyvmm: migrate: {info['status']}: {info.get('error-desc', '')}".rstrip(": "), file=sys.stderr)
        return 1
    ram = info.get("ram", {})
    print(f"migrated: total {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
          f"{info.get('dirty-sync-count')} passes, {ram.get('transferred')} bytes")
    if args.quit:
        client.execute("quit")
    return 0
