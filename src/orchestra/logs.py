"""structlog setup: events, not sentences.

Console lines on a terminal, JSON lines otherwise. The standard library's loggers (uvicorn,
sqlalchemy, httpx) are routed through the same processors so every line has one format.

Every line is redacted as it is written (:func:`orchestra.redact.redact_text`): a URL's
userinfo and query keys never reach the log, whoever logged it (httpx's "HTTP Request: POST
http://user:password@host/…" lines included), and tracebacks too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from orchestra.config import LoggingSettings
from orchestra.redact import redact_text


def _drop_color_message(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # uvicorn adds an ANSI-coloured copy of each message for its own formatter.
    event.pop("color_message", None)
    return event


class _RedactingFormatter(structlog.stdlib.ProcessorFormatter):
    """Renders a record as the processors say, then redacts the finished line (one place
    that sees every line, whatever logged it and wherever the URL sits in it)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup(settings: LoggingSettings, stream: Any = None) -> None:
    """Configure structlog and the standard library's logging once, at process start."""
    stream = stream or sys.stderr
    use_json = settings.format == "json" or (
        settings.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    level = getattr(logging, settings.level.upper())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        _RedactingFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_color_message],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def get(name: str | None = None) -> Any:
    """A structlog logger; bind task_id and template on it for task events."""
    return structlog.get_logger(name)
