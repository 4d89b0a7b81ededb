#!/usr/bin/env python3
"""The example stack's web server: a page, a /health endpoint, and a count of requests.

It speaks sd_notify when nexus gives it a NOTIFY_SOCKET: STATUS= with what it serves.
Listens on 127.0.0.1:$PORT (8080 by default). Python's standard library only."""

import http.server
import os
import socket
import sys

PORT = int(os.environ.get("PORT", "8080"))
hits = 0


def notify(message):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError:
            pass


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global hits
        if self.path == "/health":
            body = b"ok\n"
        else:
            hits += 1
            body = f"hello from pid {os.getpid()} (request {hits})\n".encode()
            notify(f"STATUS=served {hits} requests")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        # One line per request on stdout (nexus stamps it and writes logs/web-1.log).
        if self.path != "/health":
            print(f"{self.address_string()} {fmt % args}", flush=True)


server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print(f"listening on http://127.0.0.1:{PORT}/", flush=True)
notify("STATUS=listening")
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
print("web: stopping", file=sys.stderr, flush=True)
