"""The image's HEALTHCHECK: exit 0 when the node's ``/health`` answers 200, else 1.

The address is ``PYCLUSTER_HEALTH_ADDR`` (``host:port``; a wildcard host is asked on loopback).
Only the standard library: it runs with the image's Python, outside the node process.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    addr = os.environ.get("PYCLUSTER_HEALTH_ADDR", "")
    host, _, port = addr.rpartition(":")
    if not port:
        print("PYCLUSTER_HEALTH_ADDR is not set: the node serves no /health", file=sys.stderr)
        return 1
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
