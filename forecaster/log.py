"""structlog set-up: console or JSON lines on stderr, stdlib logging routed through it, and
no secret in any of it.

Secrets are kept out three ways, each enough on its own for what it covers: tracebacks never
render local variables (a frame's `settings` holds the database URL); the settings' URLs
repr masked (masking.SecretUrl); and the last processor masks, in the rendered line, every
URL's password and every secret a Settings of this process holds (`mask_secrets`, which
lives in forecaster.masking and is re-exported here).

structlog loads inside configure_logging, not when this module does: the commands that only
read the store log nothing as a rule and configure logging on the first record
(configure_logging_on_first_record), so they start without it."""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

from forecaster.masking import mask_secrets, mask_url, remember_secrets, url_secrets

__all__ = [
    "configure_logging",
    "configure_logging_on_first_record",
    "mask_secrets",
    "mask_url",
    "remember_secrets",
    "url_secrets",
]

# Alembic and SQLAlchemy are chatty at INFO; their warnings still come through.
_NOISY = ("alembic", "sqlalchemy", "httpx", "httpcore", "apscheduler")


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    import structlog
    from structlog.processors import ExceptionRenderer
    from structlog.tracebacks import ExceptionDictTransformer

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
    _route(handler, level)


def configure_logging_on_first_record(level: str = "info", fmt: str = "console") -> None:
    """configure_logging as it will be, done when the first record is logged: the levels
    and the hooks for uncaught exceptions now, structlog and its handler then (importing
    structlog is a tenth of the start of a command that logs nothing). Every record is
    filtered, formatted and masked as configure_logging's own handler would."""
    _route(_ConfigureOnFirstRecord(level, fmt), level)


def _route(handler: logging.Handler, level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # An exception nothing caught is logged like any other, masked, in the chosen format:
    # Typer's own printer would show it wrapped to the terminal, past any masking.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


class _ConfigureOnFirstRecord(logging.Handler):
    """The root handler until a record comes: it then configures logging (which replaces
    it) and hands the record to the handler configured."""

    _lock = threading.RLock()

    def __init__(self, level: str, fmt: str) -> None:
        super().__init__()
        self._config = (level, fmt)
        self._configured = False

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            if not self._configured:
                self._configured = True
                if self in logging.getLogger().handlers:
                    configure_logging(*self._config)
        for handler in list(logging.getLogger().handlers):
            if handler is not self and record.levelno >= handler.level:
                handler.handle(record)


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
