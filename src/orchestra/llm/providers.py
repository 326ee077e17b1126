"""The providers the settings name: one per enabled ``[providers]`` entry, each of its kind
(Ollama, an OpenAI-compatible server, the embedded model), for the router to route over."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestra import logs
from orchestra.config import Settings
from orchestra.llm.base import Provider

log = logs.get("orchestra.llm")


def build_providers(settings: Settings, client: Any, env: Mapping[str, str]) -> dict[str, Provider]:
    """One provider per enabled [providers] entry."""
    from orchestra.llm.embedded import EmbeddedProvider
    from orchestra.llm.ollama import OllamaProvider
    from orchestra.llm.openai import OpenAIProvider

    out: dict[str, Provider] = {}
    # What is read of an answer is bounded by what a step may keep of it.
    limit = settings.limits.max_step_output_bytes
    for name, s in settings.providers.items():
        if not s.enabled:
            continue
        key = env.get(s.api_key_env) if s.api_key_env else None
        if s.api_key_env and not key:
            log.warning("provider.api_key_missing", provider=name, variable=s.api_key_env)
        if s.kind == "ollama":
            out[name] = OllamaProvider(
                name, client, s.url, s.timeout, key, s.keep_alive, output_limit=limit
            )
        elif s.kind == "openai":
            out[name] = OpenAIProvider(name, client, s.url, s.timeout, key, output_limit=limit)
        else:
            out[name] = EmbeddedProvider(
                name,
                s.model_path,
                s.context_length,
                s.threads,
                s.timeout,
                s.preload,
                probe_every=settings.fallback.health_interval,
            )
    return out
