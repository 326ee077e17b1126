"""The cache of model answers: a model call asked again is answered from the database.

Which calls: a deterministic one (``temperature`` 0, or a ``seed`` set), or one whose step or
task says ``cache: true``; ``cache: false`` on either bypasses it (the task's word is the
caller's, so it beats a step's ``true``). ``[cache] enabled = false`` turns it off.

The key is a SHA-256 of a canonical msgspec encoding (mappings in sorted key order) of what
decides the answer: the provider that would be asked and the model there, for Ollama the
model's digest (a model pulled again under the same name is another model), the messages, the
options, the format and ``think``. Through a :class:`~orchestra.llm.router.Router` the
provider is the chain's first available entry; an answer a fallback entry gave is not stored
(it would be filed under another model's key).

A hit asks no provider: its answer comes back with ``usage.cached`` true (the tokens of the
answer when it was made, no durations), streamed to followers as one piece of text, and the
step checks it against its ``format`` as it would a fresh one. Failures of the cache's own
reads and writes are logged and the model is asked: the cache never fails a step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from orchestra import logs, metrics
from orchestra.config import CacheSettings
from orchestra.db.cache import CachedAnswer, CacheStore
from orchestra.domain import Usage, iso, now
from orchestra.errors import ProviderError
from orchestra.llm import passed_over
from orchestra.llm.base import ChatMessage, ChatRequest, ChatResult, Provider

log = logs.get("orchestra.cache")

#: Writes between two evictions (:meth:`~orchestra.db.cache.CacheStore.evict`). An eviction
#: walks the cap's worth of an index (10,000 entries by default): in every write it held the
#: event loop for milliseconds, which a task submitted meanwhile waited out.
EVICT_EVERY = 500
#: An eviction deletes at most this many entries per write since the last one, of each kind.
EVICT_LIMIT = 4
#: Seconds between two evictions at most, for a process that writes (its first write evicts
#: too): one that writes rarely, or restarts often, still brings the table back to its cap.
EVICT_SECONDS = 60.0

_encode = msgspec.json.Encoder(order="sorted").encode


class CallKey(msgspec.Struct, frozen=True, array_like=True):
    """Everything that decides a model's answer, in the order it is hashed."""

    provider: str
    model: str
    #: The model's digest where the provider tells it (Ollama); "" elsewhere.
    digest: str
    messages: tuple[ChatMessage, ...]
    options: dict[str, Any]
    format: str | dict[str, Any] | None
    think: bool | None

    def hashed(self) -> str:
        """The SHA-256 (hex) of the canonical encoding."""
        return hashlib.sha256(_encode(self)).hexdigest()


def deterministic(options: dict[str, Any]) -> bool:
    """Whether a call's options make the answer repeatable: temperature 0 or a seed."""
    temperature = options.get("temperature")
    zero = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    return (zero and temperature == 0) or options.get("seed") is not None


def applies(options: dict[str, Any], step: bool | None, task: bool | None) -> bool:
    """Whether a call goes through the cache: either saying ``false`` bypasses it, either
    saying ``true`` uses it, else when it is deterministic."""
    if step is False or task is False:
        return False
    return step is True or task is True or deterministic(options)


class AnswerCache:
    """Answers chat calls from :class:`~orchestra.db.cache.CacheStore` when it can.

    Args:
        clock: the current time (tests pass their own to age entries).
        evict_every: after this many writes (of this process), expired entries and those
            beyond ``max_entries`` are deleted (:meth:`CacheStore.evict`); also at its first
            write, and at a write :data:`EVICT_SECONDS` or more after the last eviction.
    """

    def __init__(
        self,
        store: CacheStore,
        settings: CacheSettings,
        *,
        clock: Callable[[], datetime] = now,
        evict_every: int = EVICT_EVERY,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.evict_every = evict_every
        self._writes = 0
        self._evicted_at: datetime | None = None

    async def identity(self, provider: Provider, model: str) -> tuple[str, str, str] | None:
        """(provider, model, digest) that a call for ``model`` would be asked of; None when
        no provider serves it (the call itself then says why)."""
        routes = getattr(provider, "routes", None)
        if routes is not None:  # a Router: the first entry of the chain it would try
            try:
                route = routes(model)[0]
            except ProviderError:
                return None
            provider, model = route.provider, route.model
        digest_of = getattr(provider, "digest", None)
        digest = await digest_of(model) if digest_of is not None else ""
        return provider.name, model, digest

    async def key(self, provider: Provider, request: ChatRequest) -> CallKey | None:
        """The key of ``request`` as ``provider`` would answer it (None: no provider)."""
        who = await self.identity(provider, request.model)
        if who is None:
            return None
        return CallKey(
            *who,
            messages=request.messages,
            options=request.options,
            format=request.format,
            think=request.think,
        )

    async def chat(
        self,
        provider: Provider,
        request: ChatRequest,
        on_text: Callable[[str], None] | None = None,
        *,
        step: bool | None = None,
        task: bool | None = None,
    ) -> ChatResult:
        """``provider.chat(request, on_text)``, answered from the cache when it applies and
        holds the answer; a fresh answer is stored for next time."""
        if not self.settings.enabled or not applies(request.options, step, task):
            return await provider.chat(request, on_text)
        key = await self.key(provider, request)
        if key is None:
            return await provider.chat(request, on_text)
        hashed = key.hashed()
        found = await self._get(hashed)
        metrics.model_cache(found is not None)
        if found is not None:
            if on_text is not None and found.text:
                on_text(found.text)  # followers see the answer, in one piece
            return ChatResult(
                text=found.text,
                model=found.model,
                provider=found.provider,
                usage=_cached_usage(found.usage),
            )
        with passed_over.answering() as routes:
            result = await provider.chat(request, on_text)
        # Only under the key of the entry that answered: a fallback's answer (another model,
        # maybe of the same provider) under the first entry's key would be served for it.
        asked = routes == [f"{key.provider}/{key.model}"] if routes else True
        if result.provider == key.provider and asked:
            await self._put(hashed, result)
        return result

    async def _get(self, hashed: str) -> CachedAnswer | None:
        try:
            fresh_since = iso(self.clock() - timedelta(seconds=self.settings.ttl))
            return await self.store.get(hashed, fresh_since)
        except Exception as exc:  # the cache must not fail the step: ask the model instead
            log.warning("cache.read_failed", error=f"{type(exc).__name__}: {exc}")
            return None

    async def _put(self, hashed: str, result: ChatResult) -> None:
        at = self.clock()
        answer = CachedAnswer(
            text=result.text, model=result.model, provider=result.provider, usage=result.usage
        )
        try:
            await self.store.put(hashed, answer, at=iso(at))
            self._writes += 1
            last = self._evicted_at
            if (
                self._writes >= self.evict_every
                or last is None
                or (at - last).total_seconds() >= EVICT_SECONDS
            ):
                self._writes, self._evicted_at = 0, at
                await self.store.evict(
                    expired_before=iso(at - timedelta(seconds=self.settings.ttl)),
                    max_entries=self.settings.max_entries,
                    limit=EVICT_LIMIT * self.evict_every,
                )
        except Exception as exc:  # the answer is good; only the next call pays
            log.warning("cache.write_failed", error=f"{type(exc).__name__}: {exc}")


def _cached_usage(usage: Usage) -> Usage:
    """A cached answer's usage: its tokens as when it was made; no model time was spent."""
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        finish_reason=usage.finish_reason,
        truncated=usage.truncated,
        cached=True,
    )
