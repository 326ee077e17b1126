"""structlog setup: events, not sentences.

Console lines on a terminal, JSON lines otherwise. The standard library's loggers (uvicorn,
sqlalchemy, httpx) go through the same processors and renderer, so every line has one format.

Every line is redacted as it is written (:func:`orchestra.redact.redact_text`): a URL's
userinfo and query keys never reach the log, whoever logged it (httpx's "HTTP Request: POST
http://user:password@host/…" lines included), and tracebacks too.

A line costs little, as a service at info logs a few per task: Orchestra's own events are
rendered by structlog and written straight to the stream (no ``logging.LogRecord`` on the
way), the standard library's records by one lean formatter, and records do not look up
their caller, thread or process, which no line shows. uvicorn's access log (a line per
request) is written only with ``[logging] access_log = true``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import structlog

from orchestra.config import LoggingSettings
from orchestra.redact import redact_text

T = TypeVar("T")
EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, Any], Any]

#: A LogRecord's own attributes; any other one came from ``extra=`` and is shown.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    # uvicorn adds an ANSI-coloured copy of each message for its own formatter.
    "color_message",
}


def _render_json(_logger: Any, _name: str, event: EventDict) -> str:
    # As structlog's JSONRenderer writes it (``"key": "value"``; values JSON has no type for
    # as their repr), without its per-call overhead.
    return json.dumps(event, default=repr)


def _redact(_logger: Any, _name: str, line: str) -> str:
    return redact_text(line)


class _Lines:
    """Where Orchestra's events go: each rendered line straight to the handler's stream,
    under the handler's lock (one lock for every line, whoever wrote it). Named, for
    ``add_logger_name``."""

    def __init__(self, handler: logging.StreamHandler[Any], name: str) -> None:
        self._handler = handler
        self.name = name

    def msg(self, line: str) -> None:
        """Write one line."""
        handler = self._handler
        try:
            with handler.lock:  # type: ignore[union-attr]
                handler.stream.write(line + "\n")
                handler.stream.flush()
        except Exception:  # as logging's handlers do: a log line must not fail its caller
            pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _RecordFormatter(logging.Formatter):
    """Renders a standard library record as Orchestra's events are rendered: its message as
    ``event``, its ``extra=`` values, logger, level, time (and traceback), then redacts the
    finished line (one place that sees it whole, wherever the URL sits in it)."""

    def __init__(self, processors: list[Processor]) -> None:
        super().__init__()
        self._processors = processors

    def format(self, record: logging.LogRecord) -> str:
        event: EventDict = {"event": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                event[key] = value
        event["logger"] = record.name
        event["level"] = record.levelname.lower()
        if record.exc_info:
            event["exc_info"] = record.exc_info
        result: Any = event
        for processor in self._processors:
            result = processor(None, "", result)
        return str(result)


#: True while a request's URL must not be logged (:func:`requests_unlogged`).
_UNLOGGED: contextvars.ContextVar[bool] = contextvars.ContextVar("unlogged", default=False)


def _logged_request(_record: logging.LogRecord) -> bool:
    return not _UNLOGGED.get()


@contextmanager
def requests_unlogged() -> Iterator[None]:
    """httpx logs no request line meanwhile (in this context): a webhook's URL may carry its
    secret in its path (Slack's, Discord's) or in a query key no list names (Azure's
    ``?code=``), which no redaction can tell from a path. Its sender logs the host itself."""
    token = _UNLOGGED.set(True)
    try:
        yield
    finally:
        _UNLOGGED.reset(token)


def setup(settings: LoggingSettings, stream: Any = None, process: int | None = None) -> None:
    """Configure structlog and the standard library's logging once, at process start.
    ``process``: this service process's number under the supervisor (``--processes N``),
    added to every line as ``process`` (the processes write to one stream)."""
    stream = stream or sys.stderr
    use_json = settings.format == "json" or (
        settings.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    level = getattr(logging, settings.level.upper())
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    finish: list[Processor] = (
        [structlog.processors.format_exc_info, _render_json, _redact]
        if use_json
        else [structlog.dev.ConsoleRenderer(colors=False), _redact]
    )
    which: list[Processor] = [] if process is None else [_numbered(process)]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        _RecordFormatter([structlog.contextvars.merge_contextvars, *which, stamp, *finish])
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            *which,
            stamp,
            *([] if use_json else [structlog.dev.set_exc_info]),
            *finish,
        ],
        logger_factory=lambda *args: _Lines(handler, (args[0] if args else None) or "orchestra"),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    # No line shows where a record was made, by which thread or process: don't look it up
    # (the logging module's documented switches; the caller lookup walks the stack).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries' chatter a level up: httpx's line per request (a provider's health check every
    # 30 s) shows from debug; aiosqlite's and httpcore's line per statement or socket event
    # (72 a second on an idle service, which buried Orchestra's own debug lines) never.
    logging.getLogger("httpx").setLevel(logging.INFO if level <= logging.DEBUG else logging.WARNING)
    logging.getLogger("httpx").addFilter(_logged_request)  # once: the same function
    for name in ("aiosqlite", "httpcore"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # A logger with no handler anywhere up its chain makes uvicorn skip the access line
    # altogether (it asks hasHandlers() once per connection), not just filter it.
    logging.getLogger("uvicorn.access").propagate = settings.access_log


def get(name: str | None = None) -> Any:
    """A structlog logger; bind task_id and template on it for task events."""
    return structlog.get_logger(name)


def _numbered(process: int) -> Processor:
    """A processor adding ``process`` to each line that does not name one itself."""

    def add(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", process)
        return event

    return add


def by_outcome(logger: Any, failed: bool) -> Callable[..., Any]:
    """How an end is logged: as a warning when it is a failure (a task that failed, a
    delivery given up), else as info."""
    return cast("Callable[..., Any]", logger.warning if failed else logger.info)


class Outage:
    """A side loop's failures, logged once per outage rather than at every try: the first as
    a warning, then again at most every ``every`` seconds while they go on (with how many
    failed), and one line when the loop works again. A database down for a minute made the
    event feed, the scheduler and the webhook sender log three lines a second each.

    Failures that come from requests, not from a loop (a refused request, a probe, a
    scrape), have no try that works to end the outage: ``ends_after`` ends it once no failure
    came for that long, so the next one is logged at once, counted from 1.

    Args:
        logger: Where to log (the loop's module's logger).
        event: The warning's event name (``feed.read_failed``); the recovery's is the same
            with ``_failed`` made ``_recovered``.
        every: The fewest seconds between two lines of one outage.
        ends_after: Seconds without a failure after which the outage is over (None: only
            :meth:`succeeded` ends it).
        error_after: Seconds an outage may last before its lines are errors, not warnings
            (None: never), for a part an operator must hear of (the queue's claims).
        clock: Monotonic seconds (tests pass their own).

    Every line says for how long the outage has lasted (``lasted_s``).
    """

    def __init__(
        self,
        logger: Any,
        event: str,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        ends_after: float | None = None,
        error_after: float | None = None,
    ) -> None:
        self.logger = logger
        self.event = event
        self.every = every
        self.clock = clock
        self.ends_after = ends_after
        self.error_after = error_after
        self.failures = 0
        self._logged_at = float("-inf")
        self._failed_at = float("-inf")
        self._began = 0.0

    def failed(self, exc: BaseException, **fields: Any) -> None:
        """One more try failed with ``exc`` (``fields``: more to say on its line)."""
        now = self.clock()
        if self.ends_after is not None and now - self._failed_at > self.ends_after:
            self.failures = 0  # quiet that long: this is another outage
        self._failed_at = now
        self.failures += 1
        if self.failures == 1:
            self._began = now
        if self.failures == 1 or now - self._logged_at >= self.every:
            self._logged_at = now
            lasted = now - self._began
            late = self.error_after is not None and lasted >= self.error_after
            say = self.logger.error if late else self.logger.warning
            error = f"{type(exc).__name__}: {exc}"
            say(
                self.event,
                error=error,
                failures=self.failures,
                lasted_s=round(lasted, 1),
                **fields,
            )

    def succeeded(self) -> None:
        """A try worked: the outage, if any, is over."""
        if self.failures:
            recovered = self.event.replace("_failed", "_recovered")
            lasted = round(self.clock() - self._began, 1)
            self.logger.info(recovered, after_failures=self.failures, lasted_s=lasted)
            self.failures = 0


def bind_task(task_id: int, template: str, attempt: int) -> None:
    """Bind a task to every line logged from here on in this asyncio task (the worker's run
    of it): a provider's, the cache's, a render's lines then name the task they were for.
    An asyncio task has its own copy of the context, so nothing else sees it."""
    structlog.contextvars.bind_contextvars(task_id=task_id, template=template, attempt=attempt)


def shared_task(work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """An asyncio task that outlives the call that starts it (a model process's reader, a
    provider's start), started in an empty context: a task started from a run of a task
    copies that run's context, and every line it logged would name that one task."""
    return asyncio.create_task(work, name=name, context=contextvars.Context())
