"""A fault-injecting HTTP proxy in front of a real S3 API server (moto's), for the tests (a
helper module, not a test module).

Clients are pointed at the proxy's URL as their S3 endpoint; every request is forwarded to the
server with its headers (Host included, which SigV4 signs), except those a rule picks: they
get what a struggling S3 gives (503 SlowDown, 500 InternalError), a connection closed before
any answer, or an answer cut off mid-body. The proxy logs every request it saw (method, key,
query, what it did), so tests can check the order of uploads. Nothing in the code under test
is replaced: it talks HTTP to a server that misbehaves.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

FAULTS = ("slowdown", "internal", "reset", "truncate")
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again.")}


@dataclass
class Rule:
    fault: str                                  # one of FAULTS
    times: int | None                           # per request (method + path + query); None = always
    match: Callable[[str, str], bool] = lambda method, key: True   # (method, bucket/key)


@dataclass
class Seen:
    method: str
    key: str         # bucket/key, no leading slash
    query: str
    action: str      # "forwarded" or the fault


@dataclass
class FaultProxy:
    upstream: str                               # http://127.0.0.1:PORT of the real server
    rules: list[Rule] = field(default_factory=list)
    log: list[Seen] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._count: Counter = Counter()
        up = urllib.parse.urlsplit(self.upstream)
        self._up = (up.hostname, up.port)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def _handle(self):
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, fault: str, times: int | None = 1, match=None) -> None:
        """From now on, requests `match` picks get `fault` on their first `times` tries."""
        assert fault in FAULTS, fault
        with self._lock:
            self.rules.append(Rule(fault, times, match or (lambda m, k: True)))
            self._count.clear()

    def heal(self) -> None:
        with self._lock:
            self.rules.clear()
            self._count.clear()

    def faults(self) -> int:
        return sum(s.action != "forwarded" for s in self.log)

    # --- one request ---------------------------------------------------------------------

    def _body(self, h: http.server.BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                chunk = h.rfile.read(size + 2)[:size]
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):   # trailers
                        pass
                    return out
                out += chunk
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _choose(self, method: str, key: str, query: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.fault == "truncate" and method != "GET":
                    continue   # only an answer with a body can be cut off
                if rule.match(method, key):
                    tries = self._count[(id(rule), method, key, query)]
                    self._count[(id(rule), method, key, query)] += 1
                    if rule.times is None or tries < rule.times:
                        return rule.fault
        return None

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        key = urllib.parse.unquote(url.path).lstrip("/")
        body = self._body(h)
        fault = self._choose(h.command, key, url.query)
        self.log.append(Seen(h.command, key, url.query, fault or "forwarded"))
        if fault == "reset":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f'<Message>{message}</Message><Resource>/{key}</Resource>'
                       f'<RequestId>fault-proxy</RequestId></Error>').encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self._up, timeout=120)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                h.send_header(k, v)
        # a HEAD answer has no body but announces the object's length
        length = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
        h.send_header("Content-Length", length or "0")
        if fault == "truncate" and h.command == "GET" and len(data) > 1:
            # the whole length announced, half of it sent, then the connection drops
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
