"""Helpers for the source tests: free loopback ports and a real local HTTP server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

# handler(path, query, headers) -> (status, body) or (status, body, extra headers); a bytes
# body is sent as is, an iterator of bytes chunk by chunk as it yields them (no length: the
# connection's end ends it), anything else as JSON.
Handler = Callable[[str, dict[str, str], dict[str, str]], tuple[Any, ...]]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that must be told their port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class LocalHttpServer:
    """A real HTTP server on 127.0.0.1 answering GETs with `handler`, recording requests."""

    url: str
    handler: Handler
    requests: list[Request] = field(default_factory=list)


@pytest.fixture
def http_server() -> Iterator[LocalHttpServer]:
    state = LocalHttpServer(
        url="", handler=lambda path, query, headers: (404, {"error": "no handler"})
    )

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.requests.append(Request(parts.path, query, headers))
            status, body, *more = state.handler(parts.path, query, headers)
            extra: dict[str, str] = more[0] if more else {}
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in extra.items():
                self.send_header(k, v)
            if isinstance(body, Iterator):
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the test is about
                return
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def now() -> datetime:
    return datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
