"""Settings: frozen structs, loaded once from a TOML file plus environment overrides.

Precedence (later wins): built-in defaults, the TOML file, ``ORCHESTRA_<SECTION>__<KEY>``
environment variables. The file is the one named by ``--config``, else ``$ORCHESTRA_CONFIG``,
else ``./orchestra.toml`` when it exists. Nothing here reads the environment at import time:
callers pass ``env`` explicitly so tests can build different settings side by side.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from orchestra.errors import ConfigError

ENV_PREFIX = "ORCHESTRA_"
DEFAULT_FILE = "orchestra.toml"


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ServerSettings(_Section, frozen=True):
    """The HTTP server."""

    host: str = "127.0.0.1"
    port: int = 8000


class DatabaseSettings(_Section, frozen=True):
    """Where tasks are stored."""

    url: str = "sqlite+aiosqlite:///orchestra.db"
    #: Milliseconds SQLite waits for another process's write lock before giving up.
    busy_timeout_ms: int = 5000


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


class OllamaSettings(_Section, frozen=True):
    """The Ollama model server."""

    url: str = "http://localhost:11434"
    #: Seconds one model call may take.
    timeout: float = 300.0
    #: Tasks running at once per model on this server unless [models."NAME"] says otherwise;
    #: 0: only [workers] concurrency limits them.
    max_concurrency: int = 0


class ModelSettings(_Section, frozen=True):
    """Settings for one model, by name: [models."llama3.2"]."""

    #: Tasks using this model that may run at once; the others wait in the queue.
    max_concurrency: int = 0


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


class Settings(_Section, frozen=True):
    """Every setting of the service. Mirrors orchestra.toml section by section."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    workers: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    ollama: OllamaSettings = msgspec.field(default_factory=OllamaSettings)
    models: dict[str, ModelSettings] = msgspec.field(default_factory=dict)
    retention: RetentionSettings = msgspec.field(default_factory=RetentionSettings)
    templates: TemplateSettings = msgspec.field(default_factory=TemplateSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)

    def model_limit(self, model: str | None) -> int:
        """How many tasks for ``model`` may run at once (0: no limit of its own)."""
        if model is not None and model in self.models:
            return self.models[model].max_concurrency
        return self.ollama.max_concurrency

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("server.port", 0 <= self.server.port <= 65535, "a port between 0 and 65535"),
            ("workers.concurrency", self.workers.concurrency >= 1, "an integer >= 1"),
            ("workers.lease_seconds", self.workers.lease_seconds > 0, "a number > 0"),
            ("workers.poll_interval", self.workers.poll_interval > 0, "a number > 0"),
            ("workers.reap_interval", self.workers.reap_interval > 0, "a number > 0"),
            ("workers.shutdown_grace", self.workers.shutdown_grace >= 0, "a number >= 0"),
            ("workers.max_attempts", self.workers.max_attempts >= 1, "an integer >= 1"),
            ("ollama.timeout", self.ollama.timeout > 0, "a number > 0"),
            ("ollama.max_concurrency", self.ollama.max_concurrency >= 0, "an integer >= 0"),
            ("retention.days", self.retention.days >= 0, "a number >= 0"),
            ("retention.interval", self.retention.interval > 0, "a number > 0"),
            ("database.busy_timeout_ms", self.database.busy_timeout_ms >= 0, "an integer >= 0"),
        ]
        checks += [
            (f"models.{name}.max_concurrency", m.max_concurrency >= 0, "an integer >= 0")
            for name, m in self.models.items()
        ]
        for key, ok, expected in checks:
            if not ok:
                raise msgspec.ValidationError(f"Expected {expected} - at `$.{key}`")


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)


def _describe(err: msgspec.ValidationError, data: Mapping[str, Any]) -> tuple[str, str]:
    """Split msgspec's 'Expected `int`, got `str` - at `$.server.port`' into (key, reason)."""
    m = _AT.match(str(err))
    assert m is not None  # the pattern matches any string
    path = m.group("path") or ""
    what = m.group("what").replace("`", "")
    if path.startswith("models[...]"):
        # msgspec does not name dict keys; find the entry that fails on its own.
        for name, entry in (data.get("models") or {}).items():
            try:
                msgspec.convert(entry, ModelSettings)
            except msgspec.ValidationError as exc:
                key, reason = _describe(exc, {})
                return f"models.{name}" + (f".{key}" if key != "(top level)" else ""), reason
    unknown = re.match(r"Object contains unknown field (\S+)", what)
    if unknown:
        key = ".".join(p for p in (path, unknown.group(1)) if p)
        return key, "unknown setting"
    return path or "(top level)", what[0].lower() + what[1:] if what else "invalid value"


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Turn ORCHESTRA_SECTION__KEY=value variables into a nested mapping."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "ORCHESTRA_CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        value: Any = raw
        # Lists and tables are written in TOML syntax: ORCHESTRA_TEMPLATES__DIRS='["a", "b"]'.
        if raw.strip().startswith(("[", "{")):
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{name}: expected a TOML value ({exc})") from None
        out.setdefault(section, {})[key] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the settings file is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def resolve_path(explicit: str | Path | None, env: Mapping[str, str]) -> Path | None:
    """Pick the settings file: --config, then $ORCHESTRA_CONFIG, then ./orchestra.toml."""
    if explicit:
        return Path(explicit)
    if env.get("ORCHESTRA_CONFIG"):
        return Path(env["ORCHESTRA_CONFIG"])
    default = Path(DEFAULT_FILE)
    return default if default.is_file() else None


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, a TOML file and environment overrides.

    Args:
        path: The settings file; None picks one as :func:`resolve_path` does.
        env: Environment variables to read overrides from; None means ``os.environ``.

    Raises:
        ConfigError: with a one-line message naming the file (or variable), the key and what
            was expected.
    """
    env = os.environ if env is None else env
    file = resolve_path(path, env)
    data: dict[str, Any] = _read_file(file) if file else {}
    source = str(file) if file else "built-in defaults"
    try:
        msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        key, reason = _describe(exc, data)
        raise ConfigError(f"{source}: {key}: {reason}") from None

    overrides = _env_overrides(env)
    if not overrides:
        return msgspec.convert(data, Settings)
    merged = {section: dict(values) for section, values in data.items() if isinstance(values, dict)}
    merged.update({k: v for k, v in data.items() if not isinstance(v, dict)})
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    try:
        # Environment values are strings; strict=False lets "9000" become an int.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        key, reason = _describe(exc, merged)
        var = ENV_PREFIX + key.upper().replace(".", "__", 1)
        raise ConfigError(f"{var} (environment) over {source}: {key}: {reason}") from None
