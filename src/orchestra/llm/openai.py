"""OpenAI-compatible servers: llama.cpp's server, vLLM, LM Studio, hosted APIs.

/chat/completions with Server-Sent Events when streaming, ``response_format`` for structured
output, /embeddings, /models. The configured URL is the base including ``/v1``, as the OpenAI
SDKs take it. Templates write Ollama-style ``options``; the ones with an OpenAI name are
renamed (``num_predict`` is ``max_tokens``), the ones that set up a server rather than a
request (``num_ctx``, ``num_gpu``…) are left out, and the rest pass through as they are.

An answer carries its text in a choice's ``message.content`` (``delta.content`` when streamed;
a server may send chunks without it: the role alone first, the usage alone last) or says it
finished (``finish_reason``): an empty text is an answer then. One that does neither fails as
malformed rather than passing for an empty answer. Token counts that are no non-negative
integers are recorded as unknown.

A gateway may ignore ``stream: true`` and answer one whole chat completion
(``application/json``): it is read as an answer not streamed is, and its text handed on in one
piece.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from orchestra.domain import Usage
from orchestra.errors import ProviderError, ProviderUnavailable
from orchestra.llm.base import ChatRequest, ChatResult, EmbedResult, Health
from orchestra.llm.http import JSON, SSE, HttpProvider, is_format, media_type, token_count
from orchestra.redact import redact_text

_RENAMED = {"num_predict": "max_tokens"}
_SERVER_ONLY = frozenset(
    {
        "num_ctx",
        "num_gpu",
        "num_thread",
        "num_batch",
        "num_keep",
        "main_gpu",
        "low_vram",
        "use_mmap",
        "use_mlock",
        "numa",
    }
)


def request_options(options: dict[str, Any]) -> dict[str, Any]:
    """Ollama-style options as OpenAI request fields."""
    return {_RENAMED.get(k, k): v for k, v in options.items() if k not in _SERVER_ONLY}


def response_format(
    fmt: str | dict[str, Any] | None, schema_in_json_object: bool = False
) -> dict[str, Any] | None:
    """``format`` as OpenAI's ``response_format``: "json" is a JSON object, a mapping is a
    JSON Schema the reply must follow: OpenAI's ``json_schema`` type, or, for servers that only
    know ``json_object`` (llama-cpp-python's), a ``json_object`` with a ``schema``."""
    if fmt is None:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if schema_in_json_object:
        return {"type": "json_object", "schema": fmt}
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}


def _names_format(message: str) -> bool:
    return "response_format" in message or "json_schema" in message


class _Usage(msgspec.Struct):
    # As sent, whatever their type: read through ``token_count``.
    prompt_tokens: Any = None
    completion_tokens: Any = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _Error(msgspec.Struct):
    message: str = ""


class _Completion(msgspec.Struct):
    model: str = ""
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: _Error | str | None = None


class _Embedding(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _Embeddings(msgspec.Struct):
    data: list[_Embedding]
    model: str = ""
    usage: _Usage | None = None


def _usage(usage: _Usage | None, finish_reason: str | None, started: float) -> Usage:
    """Token counts as reported, and the time since ``started`` (OpenAI's API reports no
    durations of its own)."""
    return Usage(
        prompt_tokens=token_count(usage.prompt_tokens) if usage else None,
        completion_tokens=token_count(usage.completion_tokens) if usage else None,
        total_ms=round((time.perf_counter() - started) * 1000, 3),
        finish_reason=finish_reason,
    )


class OpenAIProvider(HttpProvider):
    """Talks to one OpenAI-compatible server."""

    kind = "openai"
    label = "the OpenAI-compatible server"
    #: Set once the server rejected a ``json_schema`` response format and took the other form.
    schema_in_json_object = False

    def status_error(self, response: httpx.Response, model: str | None) -> ProviderError:
        error = super().status_error(response, model)
        if response.status_code == 404 and not _json_body(response):
            # Not the server's own "no such model" (JSON), but no such path: the usual cause
            # is a base URL without /v1 (http://host:8080 for http://host:8080/v1).
            if "/v1" not in urlsplit(self.url).path:
                return type(error)(f"{error.message} (is /v1 missing from the url?)")
        return error

    async def chat(
        self, request: ChatRequest, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """POST /chat/completions; with ``on_text``, stream it as Server-Sent Events."""
        payload: dict[str, Any] = {
            **request_options(request.options),
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": on_text is not None,
        }
        fmt = response_format(request.format, self.schema_in_json_object)
        if fmt is not None:
            payload["response_format"] = fmt
        try:
            return await self._chat(payload, request, on_text)
        except ProviderError as exc:
            # Not every server knows the json_schema type, and they say so differently
            # (llama-cpp-python's answers 500 naming the field): ask the other way, and
            # remember it for this server.
            if fmt is None or fmt["type"] != "json_schema" or not _names_format(exc.message):
                raise
        payload["response_format"] = response_format(request.format, True)
        result = await self._chat(payload, request, on_text)
        self.schema_in_json_object = True
        return result

    async def _chat(
        self,
        payload: dict[str, Any],
        request: ChatRequest,
        on_text: Callable[[str], None] | None,
    ) -> ChatResult:
        started = time.perf_counter()
        if on_text is None:
            reply = await self.call_json(
                "POST", "/chat/completions", payload, request.model, _Completion
            )
            return self._whole(reply, request.model, started)
        # Ask for the token counts in a last chunk (servers that do not know the option
        # ignore it, and then the counts stay unknown).
        payload["stream_options"] = {"include_usage": True}
        return await self.within_timeout(self._stream(payload, request.model, on_text, started))

    async def _stream(
        self,
        payload: dict[str, Any],
        model: str,
        on_text: Callable[[str], None],
        started: float,
    ) -> ChatResult:
        parts: list[str] = []
        answered, finish, usage = model, None, None
        result: ChatResult | None = None
        carried = False  # a chunk carried the text's field (delta.content, maybe "")
        opened = self.request("POST", "/chat/completions", payload, model, SSE, also=JSON)
        async with opened as response:
            if not is_format(media_type(response), SSE):  # a gateway that ignored ``stream``
                whole = self._whole(await self.read_json(response, _Completion), model, started)
                if whole.text:
                    on_text(whole.text)
                return whole
            # Read to the end even after [DONE], so the connection goes back to the pool.
            async for line in self.lines(response):
                if not line.startswith("data:") or result is not None:
                    continue  # blank separators, comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    if not carried and finish is None:
                        raise self.malformed(
                            'no chunk carried a choice with "delta.content" or "finish_reason"'
                        )
                    if usage is None:
                        # The server sent no counts (llama-cpp-python's does not while
                        # streaming): each streamed piece is one token; the prompt's count
                        # stays unknown.
                        usage = _Usage(completion_tokens=len(parts))
                    text = "".join(parts)
                    result = ChatResult(text, answered, _usage(usage, finish, started), self.name)
                    continue
                chunk = self.decode_chunk(data, _Completion)
                self._check(chunk, mid_stream=True)
                answered = chunk.model or answered
                usage = chunk.usage or usage
                for choice in chunk.choices[:1]:
                    finish = choice.finish_reason or finish
                    piece = choice.delta.content if choice.delta else None
                    carried = carried or piece is not None
                    if piece:
                        parts.append(piece)
                        on_text(piece)
        if result is None:
            raise ProviderUnavailable(f"{self.where} ended its answer before [DONE]")
        return result

    def _whole(self, reply: _Completion, model: str, started: float) -> ChatResult:
        """The answer of a whole (not streamed) chat completion."""
        self._check(reply)
        choice = reply.choices[0] if reply.choices else None
        if choice is None or choice.message is None:
            raise ProviderError(f"{self.where} answered without a choice")
        text = choice.message.content
        if text is None and choice.finish_reason is None:
            raise self.malformed('a choice without "message.content" or "finish_reason"')
        return ChatResult(
            text=text or "",
            model=reply.model or model,
            provider=self.name,
            usage=_usage(reply.usage, choice.finish_reason, started),
        )

    def _check(self, reply: _Completion, mid_stream: bool = False) -> None:
        if reply.error is None:
            return
        reason = reply.error if isinstance(reply.error, str) else reply.error.message
        where = " in the middle of its answer" if mid_stream else ""
        raise ProviderUnavailable(f"{self.where} failed{where}: {redact_text(reason)}")

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """POST /embeddings for a batch of inputs."""
        started = time.perf_counter()
        payload = {"model": model, "input": inputs}
        reply = await self.call_json("POST", "/embeddings", payload, model, _Embeddings)
        if len(reply.data) != len(inputs):
            raise ProviderError(
                f"{self.where} returned {len(reply.data)} embeddings for {len(inputs)} inputs"
            )
        return EmbedResult(
            vectors=[e.embedding for e in sorted(reply.data, key=lambda e: e.index)],
            model=reply.model or model,
            provider=self.name,
            usage=_usage(reply.usage, None, started),
        )

    async def health(self) -> Health:
        """GET /models: it answers, and with which models."""
        models, why = await self.probe(
            "/models", lambda body: tuple(str(m["id"]) for m in body["data"])
        )
        if models is None:
            return Health(ok=False, detail=why)
        return Health(
            ok=True, detail=f"ok ({len(models)} models at {self.shown_url})", models=models
        )


def _json_body(response: httpx.Response) -> bool:
    """Whether an error answer's body is JSON (a server's own error, not a web server's)."""
    try:
        response.json()
    except ValueError:
        return False
    return True
