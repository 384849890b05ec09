"""`pyvmm switch`: run a virtual switch as its own process, ask a running
one for its status.

    pyvmm switch run NAME [--config switch.json] [-v]
    pyvmm switch status NAME [--json]
    pyvmm switch stop NAME

`pyvmm run --net switch=NAME` starts `pyvmm switch run NAME` itself (a
detached process that outlives the VM) when no switch NAME answers.

Clients join with QEMU's stream framing on NAME.sock (group "default") or
NAME.GROUP.sock, e.g. `qemu ... -netdev stream,id=n0,addr.type=unix,
addr.path=$XDG_RUNTIME_DIR/pyvmm/NAME.sock`. Bad input gives one line on
stderr and exit 1 (2 for usage)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ..errors import VmmError
from ..net.switch_config import check_name, load_config
from ..net.switchd import SwitchDaemon, client_socket_path, query_status

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm switch", description="a virtual L2 switch between VMs")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run switch NAME in the foreground")
    run.add_argument("name")
    run.add_argument("--config", help="switch.json: MAC table, port groups (VLANs), rate limits, uplinks")
    run.add_argument("-v", "--verbose", action="store_true", help="log clients joining and leaving")
    st = sub.add_parser("status", help="ports, MAC table and counters of running switch NAME")
    st.add_argument("name")
    st.add_argument("--json", action="store_true")
    stop = sub.add_parser("stop", help="stop running switch NAME (its clients are disconnected)")
    stop.add_argument("name")
    return p


def _print_status(st: dict[str, Any]) -> None:
    print(f"switch {st['name']} (pid {st['pid']}, up {st['uptime']} s)")
    for group, path in st["sockets"].items():
        print(f"  group {group} vlan {st['groups'][group]['vlan']}: {path}")
    print(f"  {'port':<16} {'kind':<7} {'vlan':>4} {'macs':>5} {'rx':>9} {'tx':>9} {'dropped':>8}")
    for p in st["ports"]:
        c = p["counters"]
        dropped = sum(v for k, v in c.items() if k not in ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes"))
        vlan = "-" if p["vlan"] is None else p["vlan"]
        print(f"  {p['name']:<16} {p['kind']:<7} {vlan:>4} {p['learned']:>5} "
              f"{c['rx_frames']:>9} {c['tx_frames']:>9} {dropped:>8}")
    for t in st.get("teams", []):
        members = ", ".join(f"{m['ifname']} {'up' if m['up'] else 'down'}" for m in t["members"])
        print(f"  team {t['name']} ({t['policy']}, failback {'on' if t['failback'] else 'off'}): "
              f"active {t['active']}, {t['failovers']} failovers; {members}")
    mt = st["mac_table"]
    print(f"  MAC table: {mt['size']}/{mt['capacity']} (per port {mt['per_port']}, "
          f"max age {mt['max_age']} s, evicted {mt['evicted']}, aged {mt['aged']})")
    for e in mt["entries"][-50:]:
        print(f"    {e['mac']}  vlan {e['vlan']:<4} {e['port']:<16} {e['age']} s")


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    try:
        if args.command == "run":
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                                format="pyvmm switch: %(message)s")
            daemon = SwitchDaemon(check_name(args.name), load_config(args.config))
            daemon.open()
            print(f"pyvmm switch {args.name}: listening on {client_socket_path(args.name, rundir=daemon.rundir)}",
                  file=sys.stderr, flush=True)
            daemon.run()
            return 0
        if args.command == "stop":
            answer = query_status(args.name, request=b"stop")
            print(f"pyvmm switch {args.name}: stopping (pid {answer.get('pid')})", file=sys.stderr)
            return 0
        st = query_status(args.name)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            _print_status(st)
        return 0
    except VmmError as e:
        print(f"pyvmm switch: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
