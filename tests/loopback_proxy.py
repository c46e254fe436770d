"""A reverse proxy on loopback in front of a real `mlflow server`, for tests.

It passes every request through unchanged, except paths under a refused prefix, which it answers
404 the way Azure ML's tracking server answers `/api/2.0/mlflow/logged-models*`, and requests an
optional ``answer`` callable answers itself (a double's own rules, e.g. tests/databricks_double.py).
An optional ``rewrite`` callable may change an upstream answer's body before the client sees it
(a double that reshapes results the way its platform does). Every request, headers included, is
kept in ``received``, so a test can check what a client sent (a token it must not send).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

LOGGED_MODELS_PREFIX = "/api/2.0/mlflow/logged-models"
_CHUNK = 1 << 20
# Hop-by-hop headers describe one connection, not the message: never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}  # fmt: skip


@dataclass(frozen=True)
class ProxyRequest:
    """One request as the proxy received it."""

    method: str
    path: str  # with its query string
    headers: dict[str, str]
    body: bytes | None


# Given a request, the status and JSON body to answer it with instead of the upstream server, or
# None to pass it through.
Answer = Callable[[ProxyRequest], tuple[int, bytes] | None]
# Given a request and the upstream's status and body, the body the client gets.
Rewrite = Callable[[ProxyRequest, int, bytes], bytes]


def _handler(
    target: str,
    refused: tuple[str, ...],
    seen: list[str],
    received: list[ProxyRequest],
    answer: Answer | None = None,
    rewrite: Rewrite | None = None,
) -> type:
    upstream = urlparse(target)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            seen.append(f"{self.command} {self.path}")
            # Read first, refused or not: an unread body would corrupt the next request on a
            # kept-alive connection.
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            request = ProxyRequest(self.command, self.path, dict(self.headers.items()), body)
            received.append(request)
            if self.path.startswith(refused):
                body = b"<html><body><h1>404 Not Found</h1></body></html>"
                self.send_response(404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if answer is not None and (reply := answer(request)):
                status, payload = reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=600)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                if rewrite is not None:
                    payload = rewrite(request, response.status, payload)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                for start in range(0, len(payload), _CHUNK):
                    self.wfile.write(payload[start : start + _CHUNK])
            finally:
                connection.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        def log_message(self, *arguments) -> None:
            return None

    return Handler


@contextmanager
def reverse_proxy(
    target: str,
    refused: tuple[str, ...] = (LOGGED_MODELS_PREFIX,),
    answer: Answer | None = None,
    rewrite: Rewrite | None = None,
    received: list[ProxyRequest] | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """Serve a proxy to ``target`` on a free loopback port; yield its URL and the request lines
    it saw (so a test can check what the client asked for). Pass a list as ``received`` to get
    every request whole, headers included."""
    seen: list[str] = []
    received = [] if received is None else received
    handler = _handler(target, refused, seen, received, answer, rewrite)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()
