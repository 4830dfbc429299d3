"""A fault-injecting HTTP proxy in front of the test S3 server, to prove retries really happen.

The proxy forwards requests byte for byte (the Host header too, so SigV4 signatures still verify) and
answers chosen requests itself with an S3-style error instead. Faults are bounded so every test ends.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


@dataclass
class FaultPlan:
    """Which requests fail: the first `first_n`, then each with chance `fraction`; never over `max_faults`."""

    status: int = 503
    code: str = "SlowDown"
    first_n: int = 0
    truncate_first_n_gets: int = 0
    fraction: float = 0.0
    max_faults: int = 1_000_000
    seed: int = 0
    requests: int = 0
    faults: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    truncated: int = 0

    def should_truncate(self, method: str) -> bool:
        """Forward a GET but cut its body short, as a connection dropped mid-download would."""
        with self.lock:
            cut = method == "GET" and self.truncated < self.truncate_first_n_gets
            self.truncated += cut
            return cut

    def should_fail(self) -> bool:
        with self.lock:
            self.requests += 1
            fail = self.faults < self.max_faults and (
                self.requests <= self.first_n or self._rng.random() < self.fraction
            )
            self.faults += fail
            return fail


class FaultProxy:
    """A loopback proxy; `endpoint_url` goes where boto3's endpoint would."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        target = urlparse(upstream)
        self.plan = plan
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(chunk)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if proxy.plan.should_fail():
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{proxy.plan.code}</Code>'
                        f"<Message>injected fault</Message></Error>"
                    ).encode()
                    self.send_response(proxy.plan.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if "Transfer-Encoding" in self.headers:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if proxy.plan.should_truncate(self.command) and len(data) > 1:
                        self.wfile.write(data[: len(data) // 2])
                        self.close_connection = True
                    elif self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fault_proxy(seaweed_s3) -> Iterator[Callable[..., FaultProxy]]:
    """Factory: `fault_proxy(first_n=2)` starts a proxy to SeaweedFS with that `FaultPlan`."""
    proxies: list[FaultProxy] = []

    def start(**plan: object) -> FaultProxy:
        proxy = FaultProxy(seaweed_s3.endpoint_url, FaultPlan(**plan))
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
