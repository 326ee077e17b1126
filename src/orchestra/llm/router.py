"""Model names to providers: logical names, fallback chains, availability.

A model name in a template or a task is one of:

- a logical name from [models] (``default``), standing for an ordered chain of
  ``provider/model`` entries;
- ``provider/model`` for one provider of [providers] (``ollama/llama3.2``);
- anything else, a model of the first enabled server (``llama3.2``).

The first *available* entry of a chain serves: its provider passed its last health check (made
every ``[fallback] health_interval`` seconds in the background) and did not fail since, and it
lists the model (when it lists models at all). When a call fails on an entry before any of
its text was streamed, the next one is tried at once. An entry that failed for nothing
answering (its provider is marked), the model missing, or the server failing for the model (a
5xx, busy, a timeout, an answer cut off: that model of the provider is marked) is tried last
until a call begun after the failure is answered by it, or a health check finds the provider
well (and a busy one's Retry-After is over). One whose answer was refused for itself (a 4xx,
an answer that could not be read) is not marked: another request may fare better. Entries
marked unavailable are still tried, last, so a stale mark never fails a task that could have
run. A call that fails after some of its text was streamed does not move on (the step's live
text would run on into another model's answer): its attempt fails, and a retry (when the
failure is retryable) asks the next available entry first.

A step records the entries its calls passed over, each with why
(:mod:`orchestra.llm.passed_over`): those before the entry that answered; when every entry of a
chain failed, each of them with its error; when a call failed after its text began, those that
failed before it. Each entry a call moves past to the next is counted
(``orchestra_model_fallbacks_total``), by its error's code, or ``skipped`` when it was known
unavailable and not asked.

When no server of a chain answers at all, but one of them answered before (Ollama
restarting, a model server being upgraded), the call waits for it to come back, trying again
with a growing pause, for up to ``[fallback] outage_wait`` seconds, before it fails: the task
holds its slot meanwhile and the rest of the queue waits queued, instead of every task of the
backlog using up its attempts within seconds. A provider that never answered since the start
(a wrong URL, a runtime not installed) fails the call at once, as before.

Every text that comes from a provider passes through the router before it is stored, logged
or shown: each call's error and each health check's detail are cleared here of every
provider's secrets (their ``secrets``: API keys, URL passwords; :func:`orchestra.redact.scrub`),
so a server that echoes the Authorization header it was sent ("invalid api key: Bearer
sk-…") shows none of it, whichever kind of provider it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Container, Mapping
from functools import partial
from typing import NamedTuple, TypeVar

import msgspec

from orchestra import logs, metrics
from orchestra.config import DEFAULT_MODEL, Settings
from orchestra.errors import (
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    ProviderUnreachable,
)
from orchestra.llm import passed_over
from orchestra.llm.base import (
    ChatRequest,
    ChatResult,
    EmbedResult,
    Health,
    ProcessInfo,
    Provider,
    Supervised,
)
from orchestra.redact import scrub

log = logs.get("orchestra.llm")

T = TypeVar("T")

#: The first and the longest pause between tries while a chain's providers are away, seconds.
OUTAGE_FIRST_PAUSE = 0.5
OUTAGE_MAX_PAUSE = 5.0


#: Seconds a check of every provider asked for by a client (``/health?check=now``, the
#: dashboard's button) counts as now for the next one asked for.
ASKED_CHECK_SECONDS = 1.0


class Route(NamedTuple):
    """One entry of a chain: which provider, asked for which model."""

    provider: Provider
    model: str

    def __str__(self) -> str:
        return f"{self.provider.name}/{self.model}"


class ProviderState(msgspec.Struct, frozen=True):
    """What the router knows of one provider."""

    name: str
    kind: str
    available: bool
    detail: str
    models: tuple[str, ...] | None
    checked_at: float | None
    #: The provider's own model process (the embedded model's).
    process: ProcessInfo | None = None


def lists_model(listed: tuple[str, ...] | None, model: str) -> bool:
    """Whether a provider's model list has ``model`` (Ollama's "x" is "x:latest"); a provider
    that lists nothing may have anything."""
    if listed is None:
        return True
    return model in listed or (":" not in model and f"{model}:latest" in listed)


class Router:
    """Picks a provider for each call and falls back along chains; a ``Provider`` itself."""

    name = "router"
    kind = "router"

    def __init__(self, providers: Mapping[str, Provider], settings: Settings) -> None:
        self.providers = dict(providers)
        self.settings = settings
        self._health: dict[str, Health] = {}
        self._checked: dict[str, float] = {}
        #: The check of every provider under way (callers meanwhile share it), and when
        #: (time.monotonic()) a client last asked for one.
        self._refreshing: asyncio.Future[list[ProviderState]] | None = None
        self._asked_at = float("-inf")
        #: Providers where nothing answered: why, and when (time.monotonic()).
        self._down: dict[str, tuple[str, float]] = {}
        #: Models a provider failed a call for (a 5xx, busy, a timeout): why, when, and until
        #: when they asked to be left alone (Retry-After; else when).
        self._failing: dict[tuple[str, str], tuple[str, float, float]] = {}
        #: (provider, model) pairs a provider said it does not have.
        self._missing: set[tuple[str, str]] = set()
        #: Providers that answered (a call, or a health check) since the start.
        self._answered: set[str] = set()
        #: Calls waiting now for a provider to come back (see the module's docstring).
        self.waiting = 0
        self._gates = {
            name: asyncio.Semaphore(s.max_concurrency)
            for name, s in settings.providers.items()
            if name in self.providers and s.max_concurrency > 0
        }
        self._max_tokens = {
            name: s.max_tokens for name, s in settings.providers.items() if s.max_tokens
        }
        self._starting: set[asyncio.Task[None]] = set()
        #: Every provider's secrets, longest first (one that contains another goes first).
        self._secrets = tuple(
            sorted(
                {v for p in self.providers.values() for v in getattr(p, "secrets", ())},
                key=len,
                reverse=True,
            )
        )
        #: The providers that supervise a model process, told once (an isinstance check of a
        #: runtime protocol costs more than the rest of a /health answer).
        self._supervised: dict[str, Supervised] = {
            name: p for name, p in self.providers.items() if isinstance(p, Supervised)
        }
        for name, supervised in self._supervised.items():
            supervised.listeners.append(partial(self.observe, name))
        servers = [p for p in self.providers.values() if p.kind != "embedded"]
        everything = servers or list(self.providers.values())
        #: Where a plain model name ("llama3.2") goes: the first enabled server.
        self._bare: Provider | None = everything[0] if everything else None
        metrics.providers_known(self.providers)
        metrics.chains_known(
            {
                name: {route.provider.name for route in chain}
                for name in self.chains()
                if len(chain := self._entries(name)) > 1
            }
        )

    # -- which provider ---------------------------------------------------------------------

    def routes(self, model: str) -> list[Route]:
        """The entries to try for ``model``, available ones first (in chain order).

        Raises:
            ModelNotFound: no enabled provider can be asked for this name.
        """
        return self._ordered(self._chain(model))[0]

    def _chain(self, model: str) -> list[Route]:
        """The entries of ``model``'s chain, in its order (see :meth:`routes`)."""
        chain = self.settings.chain(model)
        if chain is None and model == DEFAULT_MODEL:
            raise ModelNotFound(
                f"no model {DEFAULT_MODEL!r} in [models]: a step asks it when it names no "
                "model, nor its task or template; add a chain for it, or name a model"
            )
        out: list[Route] = []
        for entry in chain if chain is not None else [model]:
            head, slash, rest = entry.partition("/")
            if slash and head in self.providers:
                out.append(Route(self.providers[head], rest))
            elif slash and head in self.settings.providers:
                continue  # a disabled provider
            elif chain is None and self._bare is not None:
                out.append(Route(self._bare, entry))
        if not out:
            raise ModelNotFound(
                f"no enabled provider serves model {model!r}"
                + (f" (its chain: {', '.join(chain)})" if chain else "")
            )
        return out

    def _entries(self, model: str) -> list[Route]:
        """The entries of ``model``'s chain that can be asked; none when no enabled provider
        serves it."""
        try:
            return self._chain(model)
        except ModelNotFound:
            return []

    def serving(self, model: str) -> tuple[str | None, dict[str, str]]:
        """The entry of ``model``'s chain that would serve now (None: none would), and why
        each entry not expected to answer is not, as known now (none of them asked). A chain
        whose every entry names a disabled provider has no entry at all."""
        ordered, unavailable = self._ordered(self._entries(model))
        serves = next((str(r) for r in ordered if r not in unavailable), None)
        return serves, {str(r): why for r, why in unavailable.items()}

    def available(self, route: Route) -> bool:
        """Whether ``route`` is expected to answer."""
        return self._unavailable(route) is None

    def _unavailable(self, route: Route) -> str | None:
        """Why ``route`` is not expected to answer; None when it is."""
        name = route.provider.name
        if name in self._down:
            return f"failed a call before: {self._down[name][0]}"
        if (name, route.model) in self._failing:
            return f"failed a call before: {self._failing[(name, route.model)][0]}"
        if (name, route.model) in self._missing:
            return "does not have the model"
        health = self._health.get(name)
        if health is None:
            return None
        if not health.ok:
            return f"health check: {health.detail}"
        return None if lists_model(health.models, route.model) else "does not list the model"

    def _ordered(self, chain: list[Route]) -> tuple[list[Route], dict[Route, str]]:
        """``chain`` with its available entries first (in chain order), and why each other
        one is not available, as known now, before any of them is asked."""
        unavailable = {r: why for r in chain if (why := self._unavailable(r)) is not None}
        return sorted(chain, key=lambda r: r in unavailable), unavailable

    def _mark(self, route: Route, error: ProviderError) -> None:
        """Remember that ``route`` failed: the model missing, the provider not answering at
        all, or the provider failing for this model (which leaves its other models be)."""
        at = time.monotonic()
        if isinstance(error, ModelNotFound):
            # The provider answers: a caller named a model it does not have (the task fails
            # saying so). Said once per model, and not as the provider being unavailable.
            missing = (route.provider.name, route.model)
            if missing not in self._missing:
                self._missing.add(missing)
                log.info("provider.model_missing", route=str(route), error=error.message)
            return
        if isinstance(error, ProviderUnreachable):
            self._down[route.provider.name] = (error.message, at)
        elif isinstance(error, ProviderUnavailable):
            until = at + error.retry_after
            self._failing[(route.provider.name, route.model)] = (error.message, at, until)
        log.warning("provider.unavailable", route=str(route), error=error.message)

    def _answers(self, route: Route, started: float) -> None:
        """``route`` answered a call that began at ``started``: the marks set before that
        call began are cleared (one set while it ran came from a later failure)."""
        name = route.provider.name
        self._answered.add(name)
        down = self._down.get(name)
        if down is not None and down[1] < started:
            del self._down[name]
        failing = self._failing.get((name, route.model))
        if failing is not None and failing[1] < started:
            del self._failing[(name, route.model)]

    async def _through(
        self,
        model: str,
        call: Callable[[Route], Awaitable[T]],
        streamed: Callable[[], bool] = lambda: False,
    ) -> T:
        """Try ``call`` on each route in turn until one answers; while none answers at all
        but one did before, wait for it to come back (see the module's docstring).
        ``streamed()`` tells whether the call that just failed had streamed text."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        pause = OUTAGE_FIRST_PAUSE
        while True:
            failures: list[tuple[Route, ProviderError]] = []
            chain = self._chain(model)
            ordered, unavailable = self._ordered(chain)
            for position, route in enumerate(ordered, 1):
                gate = self._gates.get(route.provider.name)
                started = time.monotonic()
                passed_over.asked(str(route))
                try:
                    if gate is None:
                        result = await _measured(route, call)
                    else:
                        async with gate:
                            result = await _measured(route, call)
                except ProviderError as exc:
                    self._scrub(exc)  # before it is marked, logged, passed over or raised
                    if isinstance(exc, (ProviderUnavailable, ModelNotFound)):
                        self._mark(route, exc)  # away, failing or without the model
                    if streamed():
                        passed_over.note_failed(chain, failures)
                        raise
                    failures.append((route, exc))
                    if position < len(ordered):
                        metrics.fell_back(model, route.provider.name, exc.code)
                    continue
                self._answers(route, started)
                passed_over.answered(str(route))
                if route != chain[0]:
                    passed_over.note(passed_over.before(chain, route, unavailable, failures))
                    asked = {r for r, _ in failures}
                    for skipped in chain[: chain.index(route)]:
                        if skipped not in asked:  # known unavailable: tried last, not reached
                            metrics.fell_back(model, skipped.provider.name, "skipped")
                return result
            error = _combined(model, failures, self._answered)
            if hint := self._asked_as_name(model):  # "nosuch/model": a typo, likely
                error.message += hint
                error.args = (error.message,)
            if not self._outage(failures):
                passed_over.note_failed(chain, failures)
                raise error
            now, wait = loop.time(), self.settings.fallback.outage_wait
            if deadline is None:
                deadline = now + wait
                log.warning("provider.waiting", model=model, seconds=wait, error=error)
            if now >= deadline:
                passed_over.note_failed(chain, failures)
                raise ProviderUnavailable(f"{error.message} (waited {wait:g}s for it to answer)")
            self.waiting += 1
            try:
                await asyncio.sleep(min(pause, deadline - now))
            finally:
                self.waiting -= 1
            pause = min(pause * 2, OUTAGE_MAX_PAUSE)

    def _scrub(self, error: ProviderError) -> None:
        """Clear ``error``'s message of every provider's secrets, in place (its type, retry
        wait and cause stay as they are)."""
        clean = scrub(error.message, self._secrets)
        if clean != error.message:
            error.message = clean
            error.args = (clean,)

    def _asked_as_name(self, model: str) -> str:
        """What a failure of ``model`` should add when its part before a slash names no
        provider (nor is it a chain): the whole name went to the first provider as a model
        name (``hf.co/…`` is one), and a typo of a provider's name looks the same."""
        head, slash, _ = model.partition("/")
        if not slash or self._bare is None or self.settings.chain(model) is not None:
            return ""
        if head in self.settings.providers:
            return ""
        return (
            f" (no provider is named {head!r}, so {model!r} was asked of "
            f"{self._bare.name!r} as a model name)"
        )

    def _outage(self, failures: list[tuple[Route, ProviderError]]) -> bool:
        """Whether a chain that failed so is worth waiting for: no server answered at all
        (nothing was asked yet), and one of them answered before. Not when the embedded
        model is among the failures: its process may have died during the call (a prompt
        that crashes it must not be sent again and again), and it restarts on its own."""
        return (
            self.settings.fallback.outage_wait > 0
            and bool(failures)
            and all(
                isinstance(exc, ProviderUnreachable) and route.provider.kind != "embedded"
                for route, exc in failures
            )
            and any(route.provider.name in self._answered for route, _ in failures)
        )

    async def chat(
        self, request: ChatRequest, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Ask the first route of ``request.model`` that answers."""

        sent = False  # whether the route being asked streamed any text

        def relay(text: str) -> None:
            nonlocal sent
            sent = True
            if on_text is not None:
                on_text(text)

        async def call(route: Route) -> ChatResult:
            nonlocal sent
            sent = False
            options = request.options
            cap = self._max_tokens.get(route.provider.name)
            if cap and "num_predict" not in options:
                options = {**options, "num_predict": cap}
            asked = msgspec.structs.replace(request, model=route.model, options=options)
            return await route.provider.chat(asked, None if on_text is None else relay)

        return await self._through(request.model, call, lambda: sent)

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """Embed with the first route of ``model`` that answers."""

        async def call(route: Route) -> EmbedResult:
            return await route.provider.embed(route.model, inputs)

        return await self._through(model, call)

    # -- health --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Let every provider prepare in the background (the embedded model's preload)."""
        for provider in self.providers.values():
            task = logs.shared_task(provider.start(), f"{provider.name}-start")
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def refresh(self, asked: bool = False) -> list[ProviderState]:
        """Check every provider now (at once, each bounded by its own short timeout).

        Callers that ask while a check is under way share it. A check ``asked`` for by a
        client (``/health?check=now``, the dashboard's button) within
        :data:`ASKED_CHECK_SECONDS` of the last one asked for answers with what that one
        found: a client asking in a loop sends the model servers at most one check a second,
        not one per request."""
        if asked:
            at = time.monotonic()
            if at - self._asked_at < ASKED_CHECK_SECONDS:
                return await asyncio.shield(self._refreshing) if self._refreshing else self.states()
            self._asked_at = at
        if self._refreshing is None:
            self._refreshing = logs.shared_task(self._check_all(), "provider-check")
            # Read, so that a check whose callers all went away does not log it as unread.
            self._refreshing.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._refreshing)

    async def _check_all(self) -> list[ProviderState]:
        try:
            names = list(self.providers)
            results = await asyncio.gather(*(self.providers[n].health() for n in names))
            for name, health in zip(names, results, strict=True):
                self.observe(name, health)
            return self.states()
        finally:
            self._refreshing = None

    def observe(self, name: str, health: Health) -> None:
        """Take ``health`` as provider ``name``'s state from now on (a check's result, or a
        change the provider reported itself: its model process crashed or came back)."""
        detail = scrub(health.detail, self._secrets)
        if detail != health.detail:
            health = msgspec.structs.replace(health, detail=detail)
        self._health[name] = health
        self._checked[name] = time.time()
        if health.ok:
            self._answered.add(name)
            self._down.pop(name, None)
            # A model's failure is cleared too, once the wait it asked for (if any) is over:
            # a health check does not ask the model.
            at = time.monotonic()
            self._failing = {
                key: mark for key, mark in self._failing.items() if key[0] != name or mark[2] > at
            }
            self._missing -= {
                (p, m)
                for p, m in self._missing
                if p == name and health.models and lists_model(health.models, m)
            }

    def states(self) -> list[ProviderState]:
        """Each provider as last checked."""
        out = []
        for name, provider in self.providers.items():
            health = self._health.get(name)
            down = self._down[name][0] if name in self._down else None
            out.append(
                ProviderState(
                    name=name,
                    kind=provider.kind,
                    available=health is not None and health.ok and down is None,
                    detail=(f"failed a call: {down}" if down else None)
                    or (health.detail if health else "not checked yet"),
                    models=health.models if health else None,
                    checked_at=self._checked.get(name),
                    process=_live_process(self._supervised.get(name)),
                )
            )
        return out

    def chains(self) -> dict[str, list[str]]:
        """Every logical name and its chain, the built-in ``default`` included."""
        return {
            name: chain
            for name in self.settings.models
            if (chain := self.settings.chain(name)) is not None
        }

    async def watch(self) -> None:
        """Refresh health every ``[fallback] health_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.settings.fallback.health_interval)
            try:
                await self.refresh()
            except Exception as exc:  # a provider's health() must not end the loop
                error = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
                log.error("provider.health_failed", error=error)

    async def health(self) -> Health:
        """All providers checked now: ok when at least one is."""
        states = await self.refresh()
        ok = any(s.available for s in states)
        return Health(ok=ok, detail="; ".join(f"{s.name}: {s.detail}" for s in states))

    async def close(self) -> None:
        """Close every provider."""
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        for provider in self.providers.values():
            await provider.close()


async def _measured(route: Route, call: Callable[[Route], Awaitable[T]]) -> T:
    """``call(route)``, its latency, tokens and errors counted (:mod:`orchestra.metrics`)."""
    clock = time.perf_counter()
    try:
        result = await call(route)
    except ProviderError as exc:
        seconds = time.perf_counter() - clock
        metrics.model_failed(route.provider.name, route.model, seconds, exc.code)
        raise
    except asyncio.CancelledError:  # cut short from outside: a task's timeout, a cancel
        seconds = time.perf_counter() - clock
        metrics.model_interrupted(route.provider.name, route.model, seconds)
        raise
    usage = getattr(result, "usage", None)
    metrics.model_called(route.provider.name, route.model, time.perf_counter() - clock, usage)
    return result


def _live_process(provider: Supervised | None) -> ProcessInfo | None:
    """A provider's model process as it is now (its memory changes between checks)."""
    return provider.status().process if provider is not None else None


def _combined(
    model: str, failures: list[tuple[Route, ProviderError]], answered: Container[str]
) -> ProviderError:
    """One error for a chain whose every entry failed: retryable when a server was
    unreachable or failing (it may come back; the retry waits the shortest of their waits,
    none when one asked for none), "model not found" when every server said so.

    A server that never answered (``answered``: the providers that did) and cannot be
    reached asks for no wait, but is no reason to come back sooner than the others ask: it
    is likely not there at all (an Ollama not installed), and the chain's retries were
    spent in seconds on it."""
    reasons = "; ".join(f"{route}: {exc.message}" for route, exc in failures)
    if len(failures) == 1:
        return failures[0][1]
    message = f"no provider could answer for {model!r}: {reasons}"
    if all(isinstance(exc, ModelNotFound) for _, exc in failures):
        return ModelNotFound(message)
    waits = {
        route: exc.retry_after for route, exc in failures if isinstance(exc, ProviderUnavailable)
    }
    if not waits:
        return ProviderError(message)
    absent = {
        route
        for route, exc in failures
        if isinstance(exc, ProviderUnreachable)
        and not exc.retry_after
        and route.provider.name not in answered
    }
    # The retry may come as soon as the first of them may be asked again.
    counted = [wait for route, wait in waits.items() if route not in absent] or waits.values()
    return ProviderUnavailable(message, retry_after=min(counted))
