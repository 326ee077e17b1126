"""The provider protocol: what the runner needs from any model server.

Providers take a shared ``httpx.AsyncClient`` and wrap every transport or protocol failure in
the error tree (``ModelNotFound``, ``ProviderUnavailable``, ``ProviderError``) at this boundary,
so nothing above it ever sees an httpx exception.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

from orchestra.domain import Usage


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a chat."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(msgspec.Struct, frozen=True):
    """A chat completion request, independent of any one server's API."""

    model: str
    messages: tuple[ChatMessage, ...]
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Structured output: "json", or a JSON Schema the reply must follow.
    format: str | dict[str, Any] | None = None
    #: Let a thinking model think first (Ollama's ``think``); None: the model's default.
    think: bool | None = None


class ChatResult(msgspec.Struct, frozen=True):
    """The model's reply and what it cost."""

    text: str
    model: str
    usage: Usage
    #: The provider (its name in the settings) that answered.
    provider: str = ""


class EmbedResult(msgspec.Struct, frozen=True):
    """One embedding vector per input, and what it cost."""

    vectors: list[list[float]]
    model: str
    usage: Usage
    provider: str = ""


class ProcessState(StrEnum):
    """Where a model process is (``orchestra.llm.model_process`` draws the transitions)."""

    #: Not started: it starts on first use (or at start, with preload).
    IDLE = "idle"
    #: Loading the model and generating its first token.
    STARTING = "starting"
    READY = "ready"
    #: Crashed; waiting out its backoff before it starts again.
    RESTARTING = "restarting"
    #: Crashed too often, or cannot load: a health check's probe tries a fresh process.
    DOWN = "down"
    STOPPED = "stopped"


class Phase(StrEnum):
    """What a model process was doing."""

    LOADING = "loading"
    WARMING_UP = "warming up"
    GENERATION = "generation"
    EMBEDDING = "embedding"
    IDLE = "idle"


class Crash(msgspec.Struct, frozen=True):
    """How a provider's model process last died."""

    #: When, in seconds since the epoch.
    at: float
    phase: Phase
    #: The signal that killed it (11 for SIGSEGV), or None when it exited.
    signal: int | None
    exit_code: int | None
    message: str


class ProcessInfo(msgspec.Struct, frozen=True):
    """A provider's own model process (the embedded model's), as its supervisor sees it."""

    state: ProcessState
    pid: int | None = None
    #: Resident memory of the process, in bytes (where the OS tells).
    rss_bytes: int | None = None
    #: Times it was started again after a crash.
    restarts: int = 0
    #: Crashes since the service started.
    crashes: int = 0
    last_crash: Crash | None = None
    #: When the next start is due (state restarting), in seconds since the epoch.
    restart_at: float | None = None


class Health(msgspec.Struct, frozen=True):
    """Whether a provider answers, and if not, why."""

    ok: bool
    detail: str
    #: The models the provider has, when it could tell.
    models: tuple[str, ...] | None = None
    #: The provider's model process, for the embedded model.
    process: ProcessInfo | None = None


class Provider(Protocol):
    """A model server."""

    #: The provider's name in the settings ([providers.NAME]).
    name: str
    kind: str

    async def chat(
        self, request: ChatRequest, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Ask the model; raises a ``ProviderError`` subclass on failure. With ``on_text``, the
        answer streams and each piece of text is passed to it as it arrives."""
        ...

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """Embed each input; raises a ``ProviderError`` subclass on failure."""
        ...

    async def health(self) -> Health:
        """Check the server quickly, listing its models where it can; never raises."""
        ...

    async def start(self) -> None:
        """Do what the provider needs before its first call (the embedded model's preload);
        failures are recorded in its health, never raised."""
        ...

    async def close(self) -> None:
        """Release what the provider holds (a loaded model); the shared HTTP client is not
        its to close."""
        ...


@runtime_checkable
class Supervised(Protocol):
    """A provider whose state changes by itself (a model process that crashes and restarts):
    it tells its listeners at once, and its status costs nothing to read."""

    #: Called with the provider's new health whenever its state changes.
    listeners: list[Callable[[Health], None]]

    def status(self) -> Health:
        """The provider as it is now, without asking anything."""
        ...
