"""structlog set-up: console or JSON lines on stderr, stdlib logging routed through it, and
no secret in any of it.

Secrets are kept out three ways, each enough on its own for what it covers: tracebacks never
render local variables (a frame's `settings` holds the database URL); the settings' URLs
repr masked (config.SecretUrl); and the last processor masks, in the rendered line, every
URL's password and every secret a Settings of this process holds (`mask_secrets`)."""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable, MutableMapping
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import unquote

import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    if fmt == "json":
        rendering: list[structlog.types.Processor] = [
            # Structured tracebacks, which the JSON lines lacked (exc_info came out as `true`).
            ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            _mask_event,
            structlog.processors.JSONRenderer(),
        ]
    else:
        rendering = [
            _mask_event,
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=_plain_traceback
            ),
        ]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *rendering,
                _mask_rendered,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic and SQLAlchemy are chatty at INFO; their warnings still come through.
    for noisy in ("alembic", "sqlalchemy", "httpx", "httpcore", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # An exception nothing caught is logged like any other, masked, in the chosen format:
    # Typer's own printer would show it wrapped to the terminal, past any masking.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record, not the stream it was built with:
    a replaced stderr (a test runner's capture, a daemoniser) is never written after close."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def _plain_traceback(sio: TextIO, exc_info: Any) -> None:
    """Python's own traceback, masked: no locals, and no wrapping that would cut a URL in
    two where the masking cannot see it (rich's pretty tracebacks do both)."""
    sio.write("\n" + mask_secrets("".join(traceback.format_exception(*exc_info))))


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    text = repr(value)
    masked = mask_secrets(text)
    return value if masked == text else masked


def _mask_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    """Each value masked before it is rendered: the rendered line may escape a secret (JSON
    quotes, console colours) so that _mask_rendered no longer finds it. exc_info is left to
    the exception formatters, which mask what they write."""
    return {k: v if k == "exc_info" else _masked(v) for k, v in event.items()}


def _mask_rendered(_logger: Any, _name: str, line: str) -> str:
    return mask_secrets(line)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("forecaster").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("forecaster").critical(
        f"uncaught exception in thread {name}",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


# -- masking ----------------------------------------------------------------------------------

# Query parameters that carry a credential: libpq's password and sslpassword, API keys.
_SECRET_NAMES = r"password|passwd|pwd|sslpassword|token|access_token|api_key|apikey|secret"
_SECRET_PARAM = re.compile(rf"(?i)([?&](?:{_SECRET_NAMES}|client_secret)=)[^&#]*")
# libpq's keyword form ("host=h password=pw") and the like, outside a URL.
_SECRET_ASSIGNMENT = re.compile(rf"(?i)(?<![\w-])((?:{_SECRET_NAMES})=)[^\s&#'\",;)]+")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# Shorter values would mask ordinary words; a URL's password is masked by position anyway.
_MIN_SECRET = 4
# A parser that splits a URL at its delimiters quotes a piece of the password in its error
# ("invalid literal for int(): 'word@h'" for 'u:p@ss:word@h'): such pieces are masked too.
_MIN_PIECE = 6

_known: set[str] = set()
_known_pattern: tuple[int, re.Pattern[str] | None] = (0, None)


def _url_password(url: str) -> tuple[str, str, str] | None:
    """(what precedes the password, the password, what follows it), or None without one.

    The password runs to the URL's last '@': SQLAlchemy reads 'postgresql://u:pa/ss@h/db'
    with '/', '?', '#' or '@' unescaped in the password, and such a password in an http URL
    is what a user meant even if no client reads it so. The one exception is an http(s)
    URL whose '@' lies only in the query after a port ('http://h:8080/x?to=a@b'); showing a
    bit too little beats showing a password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    user, colon, after = rest[: max(at, 0)].partition(":")
    port_then_query = (
        scheme.lower() in ("http", "https")
        and re.fullmatch(r"\d*(/[^@?#]*)?[?#].*", after) is not None
    )
    if at < 0 or not colon or any(c in user for c in "/?#") or port_then_query:
        return None
    return f"{scheme}{sep}{user}:", rest[len(user) + 1 : at], rest[at:]


def mask_url(url: str) -> str:
    """A URL with its secrets replaced by ***: the password of its user:password@ part and
    the values of credential query parameters (?password=...)."""
    parts = _url_password(url)
    if parts is not None:
        url = f"{parts[0]}***{parts[2]}"
    return _SECRET_PARAM.sub(r"\1***", url)


def url_secrets(url: str) -> list[str]:
    """The values mask_url hides in this URL."""
    parts = _url_password(url)
    found = [parts[1]] if parts is not None else []
    return found + [m.group(0)[len(m.group(1)) :] for m in _SECRET_PARAM.finditer(url)]


def remember_secrets(values: Iterable[str]) -> None:
    """Mask these values wherever mask_secrets sees them from now on, in this process."""
    found: set[str] = set()
    for secret in values:
        found |= {secret, unquote(secret)}
        found |= {p for p in re.split(r"[@:/?#&=;]", secret) if len(p) >= _MIN_PIECE}
    _known.update(s for s in found if len(s) >= _MIN_SECRET and s.strip("*"))


def mask_secrets(text: str) -> str:
    """Text with every remembered secret replaced by ***, and every URL's password,
    credential query parameters and password=... assignments masked."""
    global _known_pattern
    count, pattern = _known_pattern
    if count != len(_known):
        # Longest first, so a secret containing another is masked whole.
        ordered = sorted(_known, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        _known_pattern = (len(ordered), pattern)
    if pattern is not None:
        text = pattern.sub("***", text)
    text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    return _SECRET_ASSIGNMENT.sub(r"\1***", text)
