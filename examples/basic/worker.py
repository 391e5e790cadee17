"""The service the example keeps highly available: an HTTP server that says who runs it.

pycluster starts it with ``PYCLUSTER_NODE`` and ``PYCLUSTER_EPOCH`` (the fencing token) set.
"""

from __future__ import annotations

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = (f"node {os.environ.get('PYCLUSTER_NODE')} "
                f"epoch {os.environ.get('PYCLUSTER_EPOCH')}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
