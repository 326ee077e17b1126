"""Prometheus metrics: every series Orchestra exports, and the calls that feed them.

The rest of the code calls the functions here (``metrics.task_finished(template, status,
seconds)``), never prometheus-client itself, so each series is defined, named and labelled in
one place. A call is a counter or histogram update in memory (about a microsecond): no I/O.

Two kinds of series:

- **Recorded** as things happen (counters, histograms, the worker-slot gauges), in the process
  where they happen.
- **Read when scraped** (:func:`exposition`): tasks by status, from the database's counters
  (a handful of rows: the same read as the dashboard's counts, never a walk of the tasks
  table), and provider availability, as the router last saw it. Both describe the whole
  service, so the process that answers reports them once, whatever the number of processes.

Several processes (``orchestra serve --processes N``): the supervisor gives its processes one
fresh directory (:mod:`orchestra.metrics_folder`, prometheus-client's multiprocess mode via
``PROMETHEUS_MULTIPROC_DIR``); each process writes its recorded series to memory-mapped files
there, and a scrape, whichever process it lands on, sums them for the whole host. Counters
and histograms of a process that died keep counting towards the totals; its worker-slot
gauges are dropped (``metrics_folder.process_exited``). One process needs none of this.

Label values are bounded: no task ids; templates, models and schedules beyond
:data:`MAX_LABEL_VALUES` distinct values are reported as ``other`` (a task may name any
model): per host, shared by its processes through the directory (:class:`_Bounded`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from orchestra.domain import Step, StepStatus, Usage
from orchestra.metric_labels import BoundedLabel

#: The media type of :func:`exposition`'s text: Prometheus's text format 0.0.4, which every
#: Prometheus reads (the web framework adds ``; charset=utf-8``). prometheus-client's own
#: latest (1.0.0) differs only where names need escaping, which Orchestra's never do.
CONTENT_TYPE = "text/plain; version=0.0.4"
# No ``*_created`` series: a gauge per counter and histogram child, which Prometheus does not
# read over the text format (a quarter of the lines with many models).
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Where prometheus-client's multiprocess mode keeps the processes' files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Distinct values one label takes (on a host: every process of one supervisor together, its
#: restarted ones too) before further ones are reported as ``other``.
MAX_LABEL_VALUES = 200
OTHER = "other"

#: Seconds: from a few milliseconds in the queue to a quarter of an hour.
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
#: Seconds: a task or a step, from a template with no model call to a long generation.
_RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: Seconds: one model call.
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Seconds: an HTTP request until its answer's headers, a `?wait=` of up to a minute included.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30, 60)
#: The methods an HTTP request is counted under by name; any other is ``other``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The route label of a request that matched no route (a 404 or 405 of the routing).
UNMATCHED = "unmatched"

#: The outcomes a webhook delivery attempt is counted under.
WEBHOOK_RESULTS = ("delivered", "failed", "retrying")
#: Where the reaper puts a task whose lease expired (cancelled: it had been asked to cancel).
LEASE_OUTCOMES = ("queued", "failed", "cancelled")
#: The codes of provider errors (``ProviderError`` and its subclasses).
PROVIDER_ERRORS = ("provider_unavailable", "model_not_found", "provider_error")
#: Why a fallback chain moved past an entry: its call failed with one of these codes, or it
#: was ``skipped``, not asked, being known unavailable when the call began.
FALLBACK_REASONS = (*PROVIDER_ERRORS, "skipped")
#: The provider label of a failed step that asked no provider.
NO_PROVIDER = "none"

TASKS_SUBMITTED = Counter(
    "orchestra_tasks_submitted", "Tasks submitted (idempotent replays not counted).", ["template"]
)
TASKS_FINISHED = Counter(
    "orchestra_tasks_finished",
    "Tasks that reached a final status: succeeded, failed or cancelled.",
    ["template", "status"],
)
QUEUE_WAIT = Histogram(
    "orchestra_task_queue_wait_seconds",
    "Seconds from when a task was due (submitted, or its retry's time) until a worker took it.",
    ["template"],
    buckets=_WAIT_BUCKETS,
)
TASK_DURATION = Histogram(
    "orchestra_task_duration_seconds",
    "Seconds one attempt of a task ran, by the status it ended with.",
    ["template", "status"],
    buckets=_RUN_BUCKETS,
)
STEP_DURATION = Histogram(
    "orchestra_step_duration_seconds",
    "Seconds one step ran, by kind, the provider and model that answered it (empty for steps "
    "without a model call; for a failed or interrupted step, those it asked last, provider none "
    "if none) and its status: succeeded, failed, or interrupted (cut short by the task's "
    "timeout, a cancel or the service stopping).",
    ["kind", "provider", "model", "status"],
    buckets=_RUN_BUCKETS,
)
MODEL_CALL = Histogram(
    "orchestra_model_call_duration_seconds",
    "Seconds one model call took (chat or embedding, a streamed answer to its end), failed "
    "calls and calls cut short (a timeout, a cancel) included.",
    ["provider", "model"],
    buckets=_CALL_BUCKETS,
)
MODEL_TOKENS = Counter(
    "orchestra_model_tokens",
    "Tokens the model servers reported: direction in (the prompt) or out (the answer).",
    ["provider", "model", "direction"],
)
PROVIDER_ERRORS_TOTAL = Counter(
    "orchestra_provider_errors",
    "Model calls that failed, by provider and error code.",
    ["provider", "error"],
)
FALLBACKS = Counter(
    "orchestra_model_fallbacks",
    "Entries of a fallback chain a model call moved past to the next one, by the model name "
    "asked, the provider passed over, and why: its call's error code, or skipped (known "
    "unavailable, not asked).",
    ["model", "provider", "reason"],
)
MODEL_PROCESS_CRASHES = Counter(
    "orchestra_model_process_crashes",
    "Crashes of a provider's model process (the embedded model's), by what it was doing.",
    ["provider", "phase"],
)
MODEL_PROCESS_RESTARTS = Counter(
    "orchestra_model_process_restarts",
    "Starts of a provider's model process again after a crash.",
    ["provider"],
)
RETRIES = Counter(
    "orchestra_task_retries",
    "Failed attempts queued again for a later attempt (retry policy).",
    ["template"],
)
LEASE_EXPIRIES = Counter(
    "orchestra_lease_expiries",
    "Running tasks whose lease ran out (a worker died or lost the database), by where the "
    "reaper put them: queued again, failed (out of attempts) or cancelled (asked for).",
    ["outcome"],
)
WEBHOOK_DELIVERIES = Counter(
    "orchestra_webhook_deliveries",
    "Webhook delivery attempts, by result: delivered, failed (given up), retrying.",
    ["result"],
)
SCHEDULE_TICKS = Counter(
    "orchestra_schedule_ticks",
    "Schedule ticks, by schedule and outcome: submitted (a task queued), skipped (the previous "
    "task unfinished), failed (no task could be made: the template or parameters no longer "
    "fit), missed (the service was down; one for each stretch of ticks missed).",
    ["schedule", "outcome"],
)
HTTP_REQUESTS = Counter(
    "orchestra_http_requests",
    "HTTP requests answered, by method, route (the path's pattern, e.g. /api/v1/tasks/{task_id}"
    "; unmatched for a path no route serves) and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "orchestra_http_request_duration_seconds",
    "Seconds from a request's arrival until its answer's headers were sent (an event stream's "
    "start, a ?wait= read's end), by method and route.",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
)
MODEL_CACHE = Counter(
    "orchestra_model_cache_requests",
    "Model calls the cache of model answers was asked for, by result: hit (answered from the "
    "cache, no model asked) or miss.",
    ["result"],
)
_SLOTS = "orchestra_worker_slots"
_BUSY = "orchestra_worker_slots_busy"
# Summed over the processes alive now; a dead process's files are removed.
WORKER_SLOTS = Gauge(
    _SLOTS,
    "Tasks the worker pools may run at once ([workers] concurrency, summed over processes).",
    multiprocess_mode="livesum",
)
WORKER_SLOTS_BUSY = Gauge(
    _BUSY,
    "Worker slots running a task now.",
    multiprocess_mode="livesum",
)

for _result in WEBHOOK_RESULTS:  # known values start at 0, so rate() sees the first one
    WEBHOOK_DELIVERIES.labels(_result)
for _outcome in LEASE_OUTCOMES:
    LEASE_EXPIRIES.labels(_outcome)
for _result in ("hit", "miss"):
    MODEL_CACHE.labels(_result)


def _shared_folder() -> str | None:
    """The shared directory of the host's processes (None: one process)."""
    return os.environ.get(MULTIPROC_ENV) if multiprocess() else None


_template = BoundedLabel("template", MAX_LABEL_VALUES, OTHER, _shared_folder)
_model = BoundedLabel("model", MAX_LABEL_VALUES, OTHER, _shared_folder)
_schedule = BoundedLabel("schedule", MAX_LABEL_VALUES, OTHER, _shared_folder)

_Labelled = TypeVar("_Labelled", Counter, Histogram)
#: Each series' child per label values, found once: prometheus-client's ``labels()`` checks
#: and converts its arguments under a lock on every call, which costs more than the update.
_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: _Labelled, *labels: str) -> _Labelled:
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return cast("_Labelled", child)


# -- recording (called by the service) ---------------------------------------------------------


def task_submitted(template: str) -> None:
    """A task was queued (not an idempotent replay)."""
    _child(TASKS_SUBMITTED, _template(template)).inc()


def task_started(template: str, due_at: str, started_at: str | None) -> None:
    """A worker took a task that was due at ``due_at`` and started at ``started_at`` (ISO
    times, as stored on the task): one more busy slot, and its wait in the queue."""
    WORKER_SLOTS_BUSY.inc()
    try:  # a time that does not parse costs the observation, never the task
        wait = (
            datetime.fromisoformat(started_at or "") - datetime.fromisoformat(due_at)
        ).total_seconds()
    except (TypeError, ValueError):
        return
    _child(QUEUE_WAIT, _template(template)).observe(max(wait, 0.0))


def slot_freed() -> None:
    """A task's run ended here, however it ended (the pair of :func:`task_started`)."""
    WORKER_SLOTS_BUSY.dec()


def worker_slots(change: int) -> None:
    """A worker pool started (``+concurrency``) or stopped (``-concurrency``)."""
    WORKER_SLOTS.inc(change)


def task_finished(template: str, status: str, seconds: float | None = None) -> None:
    """A task reached a final status; ``seconds``: how long its last attempt ran (None: it
    did not run, e.g. cancelled while queued)."""
    name = _template(template)
    _child(TASKS_FINISHED, name, status).inc()
    if seconds is not None:
        _child(TASK_DURATION, name, status).observe(seconds)


def task_retried(template: str) -> None:
    """A failed attempt was queued again for a later one."""
    _child(RETRIES, _template(template)).inc()


def lease_expired(outcome: str) -> None:
    """The reaper found a lease expired and put the task back (``queued``), failed it (no
    attempts left) or cancelled it (a cancel was asked for)."""
    _child(LEASE_EXPIRIES, outcome).inc()


def step_finished(kind: str, step: Step, asked: str | None = None) -> None:
    """A step ended (succeeded or failed; skipped steps are not timed). A step that succeeded
    is timed under the model that answered it (``step.model``); one that failed, under the
    entry (``provider/model``) it ``asked`` last, answered or not, else :data:`NO_PROVIDER`."""
    if step.duration_ms is None or step.status is StepStatus.SKIPPED:
        return
    route = step.model or ""
    if step.status is StepStatus.FAILED:
        route = asked or step.model or f"{NO_PROVIDER}/"
    provider, _, model = route.partition("/")
    _child(
        STEP_DURATION, kind, provider, _model(model) if model else "", step.status.value
    ).observe(step.duration_ms / 1000)


#: The status a step cut short from outside is timed under (the task's timeout, a cancel, the
#: service stopping), beside a step's own ``succeeded`` and ``failed``.
INTERRUPTED = "interrupted"


def step_interrupted(kind: str, seconds: float, asked: str | None) -> None:
    """A step was cut short from outside after ``seconds``: timed under the entry
    (``provider/model``) it ``asked`` last, else :data:`NO_PROVIDER`, and status
    :data:`INTERRUPTED`."""
    provider, _, model = (asked or f"{NO_PROVIDER}/").partition("/")
    _child(STEP_DURATION, kind, provider, _model(model) if model else "", INTERRUPTED).observe(
        seconds
    )


def model_interrupted(provider: str, model: str, seconds: float) -> None:
    """A model call was cut short from outside after ``seconds`` (no provider error: it was
    not the provider's failure)."""
    _child(MODEL_CALL, provider, _model(model)).observe(seconds)


def model_called(provider: str, model: str, seconds: float, usage: Usage | None) -> None:
    """A model call answered after ``seconds``, using the tokens ``usage`` reports."""
    model = _model(model)
    _child(MODEL_CALL, provider, model).observe(seconds)
    if usage is None:
        return
    if usage.prompt_tokens:
        _child(MODEL_TOKENS, provider, model, "in").inc(usage.prompt_tokens)
    if usage.completion_tokens:
        _child(MODEL_TOKENS, provider, model, "out").inc(usage.completion_tokens)


def model_failed(provider: str, model: str, seconds: float, code: str) -> None:
    """A model call failed after ``seconds`` with a provider error of this code."""
    _child(MODEL_CALL, provider, _model(model)).observe(seconds)
    _child(PROVIDER_ERRORS_TOTAL, provider, code).inc()


def providers_known(names: Iterable[str]) -> None:
    """Start every provider's error counters at 0, so a first error shows as a rise."""
    for name in names:
        for code in PROVIDER_ERRORS:
            _child(PROVIDER_ERRORS_TOTAL, name, code)


def fell_back(model: str, provider: str, reason: str) -> None:
    """A call for ``model`` moved past an entry of ``provider`` in its chain, for ``reason``:
    the code of the error its call failed with, or ``skipped`` (see
    :data:`FALLBACK_REASONS`)."""
    reason = reason if reason in FALLBACK_REASONS else OTHER
    _child(FALLBACKS, _model(model), provider, reason).inc()


def chains_known(chains: Mapping[str, Iterable[str]]) -> None:
    """Start the fallback counters of each chain (a model name and the providers of its
    entries) at 0, for every reason."""
    for model, providers in chains.items():
        for provider in providers:
            for reason in FALLBACK_REASONS:
                _child(FALLBACKS, _model(model), provider, reason)


def model_process_known(provider: str, phases: Iterable[str]) -> None:
    """Start a model process's crash counters (one per phase) and its restarts at 0."""
    for phase in phases:
        _child(MODEL_PROCESS_CRASHES, provider, phase)
    _child(MODEL_PROCESS_RESTARTS, provider)


def model_process_crashed(provider: str, phase: str) -> None:
    """A provider's model process crashed (not ended on purpose) during ``phase``."""
    _child(MODEL_PROCESS_CRASHES, provider, phase).inc()


def model_process_restarted(provider: str) -> None:
    """A provider's model process was started again after a crash."""
    _child(MODEL_PROCESS_RESTARTS, provider).inc()


def webhook_delivery(result: str) -> None:
    """One webhook delivery attempt ended: ``delivered``, ``failed`` (given up) or
    ``retrying`` (it will be sent again)."""
    _child(WEBHOOK_DELIVERIES, result if result in WEBHOOK_RESULTS else OTHER).inc()


#: The outcomes a schedule's tick is counted under.
TICK_OUTCOMES = ("submitted", "skipped", "failed", "missed")


def schedules_known(names: Iterable[str]) -> None:
    """Start each schedule's tick counters at 0, for every outcome (so that the first failed
    or missed tick is an increase an alert sees)."""
    for name in names:
        for outcome in TICK_OUTCOMES:
            _child(SCHEDULE_TICKS, _schedule(name), outcome)


def schedule_ticked(schedule: str, outcome: str) -> None:
    """A schedule's tick was recorded: ``submitted``, ``skipped``, ``failed`` or ``missed``
    (in the process that fired it: another that found it fired already counts nothing)."""
    if outcome in TICK_OUTCOMES:
        _child(SCHEDULE_TICKS, _schedule(schedule), outcome).inc()


def model_cache(hit: bool) -> None:
    """The cache of model answers was asked for a call: ``hit`` (answered) or not."""
    _child(MODEL_CACHE, "hit" if hit else "miss").inc()


def http_answered(method: str, route: str | None, status: int, seconds: float) -> None:
    """An HTTP request's answer started: ``route`` is the path pattern it matched (None:
    none). Labels stay bounded: a pattern, never a path; unknown methods are ``other``."""
    method = method if method in HTTP_METHODS else OTHER
    route = route or UNMATCHED
    _child(HTTP_REQUESTS, method, route, str(status)).inc()
    _child(HTTP_DURATION, method, route).observe(seconds)


# -- scraping ----------------------------------------------------------------------------------


class _ReadNow:
    """The series read when scraped: tasks by status (None: the database did not answer) and
    provider availability."""

    def __init__(
        self,
        counts: Mapping[str, int] | None,
        providers: Iterable[tuple[str, str, bool]],
        writable: bool,
        listening: bool | None = None,
    ) -> None:
        self.counts = counts
        self.providers = list(providers)
        self.writable = writable
        self.listening = listening

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "orchestra_database_up",
            "1 when this scrape read the database, 0 when it could not (an outage).",
            value=0.0 if self.counts is None else 1.0,
        )
        yield GaugeMetricFamily(
            "orchestra_database_writable",
            "1 while this process's writes to the database succeed, 0 since one was refused "
            "(a held lock, a full disk, a read-only database) until one succeeds again; 0 "
            "while its SQLite file was deleted or replaced under it.",
            value=1.0 if self.writable else 0.0,
        )
        if self.listening is not None:
            yield GaugeMetricFamily(
                "orchestra_database_listening",
                "PostgreSQL: 1 while this process's LISTEN connection is up (other processes' "
                "submits wake its workers at once), 0 while it cannot connect (they wait for "
                "the poll interval).",
                value=1.0 if self.listening else 0.0,
            )
        if self.counts is not None:
            tasks = GaugeMetricFamily(
                "orchestra_tasks",
                "Tasks in each status now, from the database's counters (the whole service).",
                labels=["status"],
            )
            for status, n in self.counts.items():
                tasks.add_metric([status], n)
            yield tasks
        up = GaugeMetricFamily(
            "orchestra_provider_available",
            "1 while a provider passes its health checks and answered its last call, else 0.",
            labels=["provider", "kind"],
        )
        for name, kind, available in self.providers:
            up.add_metric([name, kind], 1.0 if available else 0.0)
        yield up


class _Recorded:
    """This process's registry (one process) as a collector of another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def multiprocess() -> bool:
    """Whether the recorded series live in the shared directory (several processes)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class HostSlots(NamedTuple):
    """The worker slots of every process of this host (one supervisor's)."""

    busy: int
    total: int
    #: Processes that run a worker pool.
    processes: int


def host_slots() -> HostSlots | None:
    """Busy and total worker slots summed over this host's processes, from the shared
    directory (several processes); None with one process (its own pool knows)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not multiprocess() or not folder:
        return None
    merge: Callable[..., Iterable[Metric]] = _multiprocess.MultiProcessCollector.merge
    busy = total = processes = 0
    # One file per process (gauge_livesum_PID.db), removed when the process dies.
    for path in Path(folder).glob("gauge_livesum_*.db"):
        found = {s.name: s.value for m in merge([str(path)], accumulate=True) for s in m.samples}
        slots = int(found.get(_SLOTS, 0))
        total += slots
        busy += int(found.get(_BUSY, 0))
        processes += slots > 0
    return HostSlots(busy=busy, total=total, processes=processes)


def exposition(
    counts: Mapping[str, int] | None,
    providers: Iterable[tuple[str, str, bool]],
    writable: bool = True,
    listening: bool | None = None,
) -> bytes:
    """Every series in Prometheus's text format: the recorded ones (of every process, in
    multiprocess mode; of this one, else) and those read now from ``counts`` (tasks by
    status; None leaves them out), ``providers`` (name, kind, available), ``writable``
    (whether the database's writes succeed, as /health tells) and ``listening`` (whether
    PostgreSQL's LISTEN connection is up; None, on SQLite, leaves it out)."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess():
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Recorded())
    registry.register(_ReadNow(counts, providers, writable, listening))
    return generate_latest(registry)
