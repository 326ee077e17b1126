"""The provider protocol: what the runner needs from any model server.

Providers take a shared ``httpx.AsyncClient`` and wrap every transport or protocol failure in
the error tree (``ModelNotFound``, ``ProviderUnavailable``, ``ProviderError``) at this boundary,
so nothing above it ever sees an httpx exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

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


class Health(msgspec.Struct, frozen=True):
    """Whether a provider answers, and if not, why."""

    ok: bool
    detail: str
    #: The models the provider has, when it could tell.
    models: tuple[str, ...] | None = None


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

    async def close(self) -> None:
        """Release what the provider holds (a loaded model); the shared HTTP client is not
        its to close."""
        ...
