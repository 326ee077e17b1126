"""Ollama's native API: /api/chat for generation, /api/version for health.

Reference: ollama/ollama docs/api.md. Durations in Ollama's replies are nanoseconds.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec

from orchestra.domain import Usage
from orchestra.errors import ModelNotFound, ProviderError, ProviderUnavailable
from orchestra.llm.base import ChatRequest, ChatResult, EmbedResult, Health

HEALTH_TIMEOUT = 2.0


class _Message(msgspec.Struct):
    content: str = ""


class _ChatReply(msgspec.Struct):
    model: str = ""
    done: bool = True
    error: str | None = None
    message: _Message = msgspec.field(default_factory=_Message)
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class _EmbedReply(msgspec.Struct):
    model: str = ""
    embeddings: list[list[float]] = msgspec.field(default_factory=list)
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


def _ms(nanoseconds: int | None) -> float | None:
    return None if nanoseconds is None else round(nanoseconds / 1e6, 3)


def _cause(exc: BaseException) -> str:
    """The most specific reason in an exception chain ("Connection refused", not "All
    connection attempts failed")."""
    seen = exc
    while seen.__cause__ or seen.__context__:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
    return str(exc) or type(exc).__name__


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return response.text[:200]


class OllamaProvider:
    """Talks to one Ollama server."""

    name = "ollama"

    def __init__(self, client: httpx.AsyncClient, url: str, timeout: float) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.timeout = timeout

    @asynccontextmanager
    async def _request(
        self, path: str, payload: dict[str, Any], model: str
    ) -> AsyncIterator[httpx.Response]:
        """POST and hand over the open response; every failure becomes a ProviderError."""
        try:
            async with self.client.stream(
                "POST", f"{self.url}{path}", json=payload, timeout=self.timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response, model)
                yield response
        except httpx.ConnectError as exc:
            raise ProviderUnavailable(
                f"cannot connect to Ollama at {self.url}: {_cause(exc)}"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                f"Ollama at {self.url} did not answer within {self.timeout:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(
                f"request to Ollama at {self.url} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _status_error(self, response: httpx.Response, model: str) -> ProviderError:
        if response.status_code == 404:
            return ModelNotFound(
                f"model {model!r} not found on Ollama at {self.url} "
                f"(run `ollama pull {model}`): {_error_text(response)}"
            )
        if response.status_code >= 500 or response.status_code == 429:
            # 503 is also Ollama's "server busy" when its queue is full: worth a retry.
            return ProviderUnavailable(
                f"Ollama at {self.url} answered {response.status_code}: {_error_text(response)}"
            )
        return ProviderError(
            f"Ollama at {self.url} rejected the request ({response.status_code}): "
            f"{_error_text(response)}"
        )

    async def _json(self, path: str, payload: dict[str, Any], model: str, type_: Any) -> Any:
        async with self._request(path, payload, model) as response:
            body = await response.aread()
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.DecodeError as exc:
            raise ProviderError(f"Ollama at {self.url} sent an unreadable reply: {exc}") from exc

    async def chat(
        self, request: ChatRequest, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Call /api/chat and return the reply with its token counts.

        With ``on_text``, the answer streams (NDJSON) and each piece of text is handed to it as
        it arrives; an ``{"error": …}`` line in the middle of the stream (Ollama keeps HTTP 200
        there) fails the call.
        """
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": on_text is not None,
        }
        if request.options:
            payload["options"] = request.options
        if request.format is not None:
            payload["format"] = request.format
        if on_text is None:
            reply = await self._json("/api/chat", payload, request.model, _ChatReply)
            return self._result(reply, reply.message.content, request.model)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._stream(payload, request.model, on_text)
        except TimeoutError:
            raise ProviderUnavailable(
                f"Ollama at {self.url} did not answer within {self.timeout:g}s"
            ) from None

    async def _stream(
        self, payload: dict[str, Any], model: str, on_text: Callable[[str], None]
    ) -> ChatResult:
        parts: list[str] = []
        async with self._request("/api/chat", payload, model) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    chunk = msgspec.json.decode(line, type=_ChatReply)
                except msgspec.DecodeError as exc:
                    raise ProviderError(
                        f"Ollama at {self.url} sent an unreadable line: {exc}"
                    ) from exc
                if chunk.error:
                    raise ProviderUnavailable(
                        f"Ollama at {self.url} failed in the middle of its answer: {chunk.error}"
                    )
                if chunk.message.content:
                    parts.append(chunk.message.content)
                    on_text(chunk.message.content)
                if chunk.done:
                    return self._result(chunk, "".join(parts), model)
        raise ProviderUnavailable(f"Ollama at {self.url} ended its answer before it was done")

    @staticmethod
    def _result(reply: _ChatReply, text: str, model: str) -> ChatResult:
        return ChatResult(
            text=text,
            model=reply.model or model,
            usage=Usage(
                prompt_tokens=reply.prompt_eval_count,
                completion_tokens=reply.eval_count,
                total_ms=_ms(reply.total_duration),
                load_ms=_ms(reply.load_duration),
                prompt_ms=_ms(reply.prompt_eval_duration),
                generation_ms=_ms(reply.eval_duration),
                finish_reason=reply.done_reason,
            ),
        )

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """Call /api/embed for a batch of inputs."""
        payload = {"model": model, "input": inputs}
        reply = await self._json("/api/embed", payload, model, _EmbedReply)
        if len(reply.embeddings) != len(inputs):
            raise ProviderError(
                f"Ollama at {self.url} returned {len(reply.embeddings)} embeddings for "
                f"{len(inputs)} inputs"
            )
        return EmbedResult(
            vectors=reply.embeddings,
            model=reply.model or model,
            usage=Usage(
                prompt_tokens=reply.prompt_eval_count,
                total_ms=_ms(reply.total_duration),
                load_ms=_ms(reply.load_duration),
            ),
        )

    async def health(self) -> Health:
        """GET /api/version with a short timeout."""
        try:
            response = await self.client.get(f"{self.url}/api/version", timeout=HEALTH_TIMEOUT)
            response.raise_for_status()
            version = response.json().get("version", "unknown")
        except httpx.HTTPStatusError as exc:
            return Health(ok=False, detail=f"{self.url} answered {exc.response.status_code}")
        except httpx.HTTPError as exc:
            return Health(ok=False, detail=f"cannot reach {self.url}: {_cause(exc)}")
        except ValueError:
            return Health(ok=False, detail=f"{self.url} did not answer like Ollama")
        return Health(ok=True, detail=f"ok (Ollama {version} at {self.url})")
