"""A fault-injecting HTTP proxy for an S3 endpoint: it forwards every request to the endpoint, except
a share of them, chosen by a seeded random generator, that get a fault instead:

  500     InternalError (S3's XML error body)
  503     SlowDown (S3's throttling answer)
  503     ServiceUnavailable
  drop    the connection closed without an answer, after the request was read

Point a client at `proxy.url` in place of the endpoint. `proxy.injected` counts the faults by kind,
`proxy.forwarded` the requests that went through. Written by hand because no maintained library
injects S3-shaped errors in front of a local endpoint; the standard library's HTTP server does the
serving.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

FAULTS = ("500", "503-slowdown", "503-unavailable", "drop")
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503-slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "503-unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, *, share: float, seed: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.share = share
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._draw()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault:
                    status, code, message = _ERRORS[fault]
                    xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
                    self._answer(status, {"Content-Type": "application/xml"}, xml.encode())
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                    kept = {k: v for k, v in reply.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}}
                    self._answer(reply.status, kept, data)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _draw(self) -> str | None:
        with self._lock:
            if self._random.random() >= self.share:
                return None
            fault = self._random.choice(FAULTS)
            self.injected[fault] += 1
            return fault

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
