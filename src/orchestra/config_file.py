"""Loading the settings: a TOML file, then ``ORCHESTRA_<SECTION>__<KEY>`` environment
variables over it, into :class:`~orchestra.config.Settings` (the structs live there).

Nothing here reads the environment at import time: callers pass ``env`` explicitly so tests
can build different settings side by side.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec

from orchestra.config import (
    DEFAULT_FILE,
    DEFAULT_MODELS,
    DEFAULT_PROVIDERS,
    ENV_PREFIX,
    ModelSettings,
    ProviderSettings,
    Settings,
)
from orchestra.errors import ConfigError

#: Tables of named entries, and the type of one entry.
_NAMED_TABLES: dict[str, Any] = {
    "providers": ProviderSettings,
    "models": list[str] | ModelSettings,
}

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)


def _describe(
    err: msgspec.ValidationError, data: Mapping[str, Any], root: Any = Settings, strict: bool = True
) -> tuple[str, str]:
    """Split msgspec's 'Expected `int`, got `str` - at `$.server.port`' into (key, reason);
    ``strict``: as ``data`` was converted (False: with the environment's strings in it)."""
    m = _AT.match(str(err))
    assert m is not None  # the pattern matches any string
    path = m.group("path") or ""
    what = m.group("what").replace("`", "")
    for table, entry_type in _NAMED_TABLES.items():
        if not path.startswith(f"{table}[...]"):
            continue
        # msgspec does not name dict keys; find the entry that fails on its own.
        for name, entry in (data.get(table) or {}).items():
            try:
                msgspec.convert(entry, entry_type, strict=strict)
            except msgspec.ValidationError as exc:
                key, reason = _describe(exc, {}, entry_type, strict)
                return f"{table}.{name}" + (f".{key}" if key != "(top level)" else ""), reason
    unknown = re.match(r"Object contains unknown field (\S+)", what)
    if unknown:
        key = ".".join(p for p in (path, unknown.group(1)) if p)
        return key, "unknown setting"
    if what.startswith("Invalid enum value"):
        choices = _choices(path, root)
        if choices:
            return path, f"{what[0].lower()}{what[1:]} (expected one of {', '.join(choices)})"
    missing = re.match(r"Object missing required field (\S+)", what)
    if missing:
        return ".".join(p for p in (path, missing.group(1)) if p), "required, but not set"
    return path or "(top level)", what[0].lower() + what[1:] if what else "invalid value"


def _choices(path: str, root: Any) -> tuple[str, ...]:
    """The words a setting at ``path`` in ``root`` (the settings, or an entry of a named
    table: a provider's ``kind``) takes, its ``Literal``; () if it is not one (or the path
    leads nowhere)."""
    kind: Any = root
    for part in path.split("."):
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return ()
        kind = get_type_hints(kind).get(part)
    literals = [kind] if get_origin(kind) is Literal else get_args(kind)
    return tuple(str(v) for lit in literals if get_origin(lit) is Literal for v in get_args(lit))


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Turn ORCHESTRA_SECTION__KEY=value variables into a nested mapping (more ``__`` go
    deeper: ORCHESTRA_PROVIDERS__OLLAMA__URL)."""
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "ORCHESTRA_CONFIG":
            continue
        *parents, key = name[len(ENV_PREFIX) :].lower().split("__")
        value: Any = raw
        # Lists and tables are written in TOML syntax: ORCHESTRA_TEMPLATES__DIRS='["a", "b"]'.
        if raw.strip().startswith(("[", "{")):
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{name}: expected a TOML value ({exc})") from None
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return out


def _named_as_in(overrides: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides, an entry of a named table (``[providers.GPU]``) under the name the file
    gives it: a variable's name is upper case, and lowered it made an entry of its own."""
    out = dict(overrides)
    for table in _NAMED_TABLES:
        given, named = out.get(table), data.get(table)
        if not isinstance(given, dict) or not isinstance(named, Mapping):
            continue
        by_lower = {str(name).lower(): name for name in named}
        out[table] = {by_lower.get(name, name): value for name, value in given.items()}
    return out


def _model_tables(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with each ``[models]`` chain written as a list (``fast = ["ollama/x"]``) as
    the table it stands for (``chain = [...]``), so that a variable setting one of its other
    keys adds to it rather than replacing it."""
    models = data.get("models")
    if not isinstance(models, Mapping):
        return dict(data)
    tables = {k: {"chain": v} if isinstance(v, list) else v for k, v in models.items()}
    return {**data, "models": tables}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, table by table."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _legacy_ollama(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Read an ``[ollama]`` table as the provider named ``ollama`` (a shorthand)."""
    out = dict(data)
    legacy = out.pop("ollama", None)
    if legacy is None:
        return out
    if not isinstance(legacy, Mapping):
        raise ConfigError(f"{source}: ollama: expected a table")
    providers = out.get("providers") or {}
    if not isinstance(providers, Mapping):
        raise ConfigError(f"{source}: providers: expected a table")
    out["providers"] = _merge(providers, {"ollama": legacy})
    return out


def _with_defaults(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Add the built-in providers and model names under the settings' own."""
    out = _legacy_ollama(data, source)
    providers = out.get("providers") or {}
    if not isinstance(providers, Mapping):
        raise ConfigError(f"{source}: providers: expected a table")
    out["providers"] = _merge(DEFAULT_PROVIDERS, providers)
    models = out.get("models") or {}
    if not isinstance(models, Mapping):
        raise ConfigError(f"{source}: models: expected a table")
    out["models"] = {**DEFAULT_MODELS, **{k: _on_built_in(k, v) for k, v in models.items()}}
    return out


def _on_built_in(name: str, entry: Any) -> Any:
    """A ``[models.NAME]`` table for a built-in name that sets other keys than its chain
    (``max_concurrency``) keeps the built-in chain."""
    built_in = DEFAULT_MODELS.get(name)
    if isinstance(entry, Mapping) and "chain" not in entry and isinstance(built_in, list):
        return {"chain": built_in, **entry}
    return entry


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


def origin(key: str, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Where the value of ``key`` (``"database.url"``) comes from, for a message: its
    environment variable when that is set, else the settings file :func:`load` reads for
    ``path``, else the built-in defaults."""
    env = os.environ if env is None else env
    var = ENV_PREFIX + key.upper().replace(".", "__")
    if var in env:
        return f"{var} (environment)"
    file = resolve_path(path, env)
    return str(file) if file else "built-in defaults"


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
    if "ollama" in data and "ollama" in (data.get("providers") or {}):
        raise ConfigError(
            f"{source}: ollama: [ollama] and [providers.ollama] are both set; keep one"
        )
    try:
        msgspec.convert(_with_defaults(data, source), Settings)
    except msgspec.ValidationError as exc:
        key, reason = _describe(exc, _with_defaults(data, source))
        raise ConfigError(f"{source}: {key}: {reason}") from None

    overrides = _env_overrides(env)
    if not overrides:
        return msgspec.convert(_with_defaults(data, source), Settings)
    overrides, data = _named_as_in(overrides, data), _model_tables(data)
    env_source = f"environment over {source}"
    merged = _with_defaults(
        _merge(_legacy_ollama(data, source), _legacy_ollama(overrides, env_source)), env_source
    )
    try:
        # Environment values are strings; strict=False lets "9000" become an int.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        key, reason = _describe(exc, merged, strict=False)
        var = ENV_PREFIX + key.upper().replace(".", "__")
        raise ConfigError(f"{var} (environment) over {source}: {key}: {reason}") from None
