"""The daemon's small HTTP app: /metrics, /healthz, /readyz (DESIGN.md decision 7) and the
overview page at / (`pipelines.overview`).

The standard library's threading server, on a daemon thread: a scrape or a probe never
waits for a job, and nothing new to depend on. /healthz says the process is alive and is
always open (a liveness probe has no token); with a token set, every other path needs
`Authorization: Bearer <token>`. The overview is served with a Content-Security-Policy that
allows no script at all: a name from the store that escaped the page's escaping still could
not run.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from forecaster.errors import ConfigError
from forecaster.metrics import ServiceMetrics

__all__ = ["HttpApp"]

log = logging.getLogger(__name__)

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_MAX_SERIES_PARAM = 512  # the longest series name the store holds
# What a readiness error may carry into a public answer: no URL (it may hold a password),
# nothing that looks like a credential, and not much of it.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_CREDENTIAL = re.compile(r"(?i)\b(password|passwd|pwd|token|secret)\s*[=:]\s*\S+")


def _public_error(exc: BaseException) -> str:
    text = _URL.sub("<url>", f"{type(exc).__name__}: {exc}")
    text = _CREDENTIAL.sub(r"\1=***", text)
    return text if len(text) <= 200 else text[:197] + "..."


def _bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    """A failed bind as one line naming the setting and the option that fix it: a port in
    use or reserved is the port's fault; anything else (a name that does not resolve, an
    address of another machine) is the host's."""
    problem = f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            "http.port",
            f"{problem} (another process listens there)",
            "Pass --port N to `forecaster run` (0 picks a free port), or set http.port in "
            "the config file or FORECASTER_HTTP__PORT.",
        )
    if exc.errno == errno.EACCES:
        return ConfigError(
            "http.port",
            f"{problem} (ports below 1024 need privileges)",
            "Pass --port N with N of 1024 or more, or set http.port in the config file or "
            "FORECASTER_HTTP__PORT.",
        )
    return ConfigError(
        "http.host",
        problem,
        "Pass --host ADDRESS to `forecaster run` with an address of this machine (127.0.0.1, "
        "or 0.0.0.0 for every interface), or set http.host in the config file or "
        "FORECASTER_HTTP__HOST.",
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: HttpApp) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "forecaster"
    sys_version = ""
    timeout = 30  # a client that opens a connection and says nothing does not hold a thread

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        app = self.server.app
        url = urlsplit(self.path)
        path = url.path
        if path == "/healthz":
            self._send(200, b"ok\n", _TEXT)
        elif not app.authorized(self.headers.get("Authorization")):
            self._send(401, b"unauthorized\n", _TEXT, {"WWW-Authenticate": "Bearer"})
        elif path == "/metrics":
            self._metrics(app)
        elif path == "/readyz":
            status, body = app.readiness_report()
            self._send(status, json.dumps(body, sort_keys=True).encode() + b"\n", _JSON)
        elif path == "/" and app.overview is not None:
            self._overview(app, url.query)
        else:
            self._send(404, b"not found\n", _TEXT)

    def _metrics(self, app: HttpApp) -> None:
        try:
            body, content_type = app.metrics.exposition()
        except Exception:
            log.exception("scrape of /metrics failed")
            self._send(500, b"scrape failed; see the service log\n", _TEXT)
            return
        self._send(200, body, content_type)

    def _overview(self, app: HttpApp, query: str) -> None:
        assert app.overview is not None
        try:  # bounded: a query of thousands of fields is refused, not parsed
            series = (parse_qs(query, max_num_fields=20).get("series") or [""])[0] or None
        except ValueError:
            series = "?" * (_MAX_SERIES_PARAM + 1)
        if series is not None and len(series) > _MAX_SERIES_PARAM:
            self._send(400, b"bad query: give ?series=NAME, one stored series\n", _TEXT)
            return
        try:
            status, html = app.overview(series)
        except Exception:
            log.exception("rendering the overview page failed")
            self._send(500, b"the overview failed; see the service log\n", _TEXT)
            return
        self._send(status, html.encode(), _HTML, _PAGE_HEADERS)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("%s %s", self.address_string(), format % args)


class HttpApp:
    """Serves `metrics` and the readiness checks on host:port (port 0 picks a free one).

    readiness returns named checks (e.g. {"database": True, "scheduler": True}); /readyz is
    200 when all hold, 503 otherwise or when it raises. overview, when given, renders the
    page at / for the series named by `?series=` (None without one) as (status, HTML)
    (`pipelines.overview.Overview.page`); without it / is 404."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        token: str | None,
        metrics: ServiceMetrics,
        readiness: Callable[[], dict[str, bool]],
        overview: Callable[[str | None], tuple[int, str]] | None = None,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("the HTTP token is empty: set a real one, or None to serve openly")
        self.host = host
        self._port = port
        self._token = token.encode() if token is not None else None
        self.metrics = metrics
        self.readiness = readiness
        self.overview = overview
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"the HTTP app is already serving on {self.url}")
        try:
            self._server = _Server((self.host, self._port), self)
        except OSError as exc:
            raise _bind_error(self.host, self._port, exc) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() may wait for the loop to notice
            name="forecaster-http",
            daemon=True,
        )
        self._thread.start()
        page = " and the overview at /" if self.overview is not None else ""
        log.info("serving /metrics, /healthz, /readyz%s on %s", page, self.url)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, credentials = (header or "").strip().partition(" ")
        # Header values arrive decoded as latin-1: encoding back gives the bytes sent.
        given = credentials.strip().encode("latin-1", errors="replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._token)

    def readiness_report(self) -> tuple[int, dict[str, Any]]:
        try:
            checks = {str(k): bool(v) for k, v in self.readiness().items()}
        except Exception as exc:
            log.exception("readiness check raised")
            return 503, {"ready": False, "checks": {}, "error": _public_error(exc)}
        ready = all(checks.values())
        return (200 if ready else 503), {"ready": ready, "checks": checks}
