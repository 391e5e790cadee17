"""Test helpers for virtual IPs: an ARP sniffer and the node program's ``--setup`` hook.

* ``python -m pycluster_vip.testing sniff IFACE OUT`` (run inside a network namespace with
  ``ip netns exec``) records every ARP packet seen on ``IFACE`` as one JSON line in ``OUT``
  (``t``, ``op``, ``sha``, ``spa``, ``tha``, ``tpa``, ``gratuitous``) and prints ``READY`` once
  it listens. `read_sniffed` parses the file.
* ``python -m pycluster.testing.node --setup pycluster_vip.testing:setup --setup-arg
  vip=10.213.1.200/24 [--setup-arg iface=eth0 --setup-arg peer=... --setup-arg
  check_interval=0.5]`` gives the test node a `VIP` option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .arp import open_socket, parse_frame
from .options import VIP


def setup(ns: argparse.Namespace) -> list[object]:
    """``--setup`` hook of ``pycluster.testing.node``: one `VIP` from ``--setup-arg`` values."""
    args: dict[str, str] = getattr(ns, "setup_args", {})
    peer = args.get("peer") or None
    return [VIP(
        args["vip"], args.get("iface", "eth0"), peer=peer,
        check_interval=float(args.get("check_interval", "0.5")),
        arp_count=int(args.get("arp_count", "3")),
        arp_interval=float(args.get("arp_interval", "0.2")),
        probe_timeout=float(args.get("probe_timeout", "0.3")),
    )]


def sniff(interface: str, out: str | Path) -> None:
    """Record ARP packets on ``interface`` to ``out`` until killed."""
    sock = open_socket(interface)
    sock.setblocking(True)
    with open(out, "a", buffering=1) as fh:
        print("READY", flush=True)
        while True:
            pkt = parse_frame(sock.recv(2048))
            if pkt is None:
                continue
            rec: dict[str, Any] = {"t": time.time(), "op": pkt.op, "sha": pkt.sha,
                                   "spa": pkt.spa, "tha": pkt.tha, "tpa": pkt.tpa,
                                   "eth_src": pkt.eth_src, "gratuitous": pkt.gratuitous}
            fh.write(json.dumps(rec) + "\n")


def read_sniffed(path: str | Path) -> list[dict[str, Any]]:
    """The packets recorded by `sniff` (a partly written last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``sniff IFACE OUT``."""
    p = argparse.ArgumentParser(prog="python -m pycluster_vip.testing")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sniff", help="record ARP packets as JSON lines")
    s.add_argument("interface")
    s.add_argument("out")
    ns = p.parse_args(argv)
    if ns.cmd == "sniff":
        try:
            sniff(ns.interface, ns.out)
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
