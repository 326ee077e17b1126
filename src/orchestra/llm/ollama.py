"""Ollama's native API: /api/chat (streaming NDJSON), /api/embed, /api/tags, /api/version.

Reference: ollama/ollama docs/api.md. Durations in Ollama's replies are nanoseconds.

Every reply of /api/chat, and every line of a streamed one, carries ``done`` (false on each
piece, true on the last, which holds the statistics) and a ``message``. A reply without them
is something else (/api/generate's ``response``, a proxy's JSON) and fails as malformed rather
than passing for an empty answer; counts and durations that are no non-negative integers are
recorded as unknown.

A gateway may ignore ``stream: true`` and answer one whole reply: on one line, it is a stream
of one line; indented over several, it is read whole. Either way it is read as a reply not
streamed is, and its text handed on in one piece.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec

from orchestra.domain import Usage
from orchestra.errors import ModelNotFound, ProviderError, ProviderUnavailable
from orchestra.llm.base import ChatRequest, ChatResult, EmbedResult, Health
from orchestra.llm.http import NDJSON, OUTPUT_LIMIT, HttpProvider, error_text, token_count
from orchestra.redact import redact_text


class _Message(msgspec.Struct):
    content: str = ""


class _ChatReply(msgspec.Struct):
    model: str = ""
    #: None: the reply did not say (Ollama always does).
    done: bool | None = None
    error: str | None = None
    #: None: the reply carries no message (Ollama's always does).
    message: _Message | None = None
    done_reason: str | None = None
    # Counts and durations as sent, whatever their type: read through ``token_count``.
    total_duration: Any = None
    load_duration: Any = None
    prompt_eval_count: Any = None
    prompt_eval_duration: Any = None
    eval_count: Any = None
    eval_duration: Any = None


class _EmbedReply(msgspec.Struct):
    model: str = ""
    embeddings: list[list[float]] = msgspec.field(default_factory=list)
    total_duration: Any = None
    load_duration: Any = None
    prompt_eval_count: Any = None


def _ms(nanoseconds: Any) -> float | None:
    """A duration Ollama reported, in milliseconds (None: not reported, or not a duration)."""
    count = token_count(nanoseconds)
    return None if count is None else round(count / 1e6, 3)


def ollama_options(options: dict[str, Any]) -> dict[str, Any]:
    """A template's options as Ollama takes them: a ``stop`` written as one string (valid,
    and what OpenAI takes) as a list of it, since Ollama refuses a ``stop`` that is no array."""
    stop = options.get("stop")
    if isinstance(stop, str):
        return {**options, "stop": [stop]}
    return options


def same_model(wanted: str, listed: str) -> bool:
    """Ollama names a model without a tag as ``:latest`` ("llama3.2" is "llama3.2:latest")."""
    return wanted == listed or (":" not in wanted and f"{wanted}:latest" == listed)


class OllamaProvider(HttpProvider):
    """Talks to one Ollama server."""

    kind = "ollama"
    label = "Ollama"

    def __init__(
        self,
        name: str,
        client: httpx.AsyncClient,
        url: str,
        timeout: float,
        api_key: str | None = None,
        keep_alive: str = "",
        *,
        output_limit: int = OUTPUT_LIMIT,
    ) -> None:
        super().__init__(name, client, url, timeout, api_key, output_limit=output_limit)
        self.keep_alive = keep_alive
        #: Each model's digest as /api/tags last listed it (the cache of model answers keys
        #: on it); read by the health checks, and when a model is not known yet.
        self.digests: dict[str, str] = {}
        self._digests_read_at = float("-inf")

    def status_error(self, response: httpx.Response, model: str | None) -> ProviderError:
        if response.status_code == 404 and model is not None:
            return ModelNotFound(
                f"model {model!r} not found on {self.where} (run `ollama pull {model}`): "
                f"{error_text(response, self.secrets)}"
            )
        return super().status_error(response, model)

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
            payload["options"] = ollama_options(request.options)
        if request.format is not None:
            payload["format"] = request.format
        if request.think is not None:
            payload["think"] = request.think
        if self.keep_alive:
            payload["keep_alive"] = self.keep_alive
        if on_text is None:
            reply = await self.call_json("POST", "/api/chat", payload, request.model, _ChatReply)
            return self._whole(reply, request.model)
        return await self.within_timeout(self._stream(payload, request.model, on_text))

    def _whole(self, reply: _ChatReply, model: str) -> ChatResult:
        """The answer of a reply not streamed."""
        if reply.error:
            raise ProviderUnavailable(f"{self.where} failed: {redact_text(reply.error)}")
        if reply.message is None:
            raise self.malformed('a reply without "message"')
        if reply.done is None:
            raise self.malformed('a reply without "done"')
        if not reply.done:  # a reply not streamed is the whole answer
            raise self.malformed('a reply not streamed, with "done": false')
        return self._result(reply, reply.message.content, model)

    async def _stream(
        self, payload: dict[str, Any], model: str, on_text: Callable[[str], None]
    ) -> ChatResult:
        parts: list[str] = []
        result: ChatResult | None = None
        carried = False  # a line carried a message (its text may be empty)
        first = True
        async with self.request("POST", "/api/chat", payload, model, NDJSON) as response:
            # Read to the end even after the "done" line, so the connection goes back to the
            # pool (leaving a body unread closes it, and the next call pays a new connect).
            lines = self.lines(response)
            async for line in lines:
                if not line.strip() or result is not None:
                    continue
                if first and not _json(line):  # one reply over several lines: read it whole
                    result = self._whole(await self._document(line, lines), model)
                    if result.text:
                        on_text(result.text)
                    continue
                first = False
                chunk = self.decode_chunk(line, _ChatReply)
                if chunk.error:
                    raise ProviderUnavailable(
                        f"{self.where} failed in the middle of its answer: "
                        f"{redact_text(chunk.error)}"
                    )
                if chunk.done is None:
                    raise self.malformed('a line without "done"')
                if chunk.message is not None:
                    carried = True
                    if chunk.message.content:
                        parts.append(chunk.message.content)
                        on_text(chunk.message.content)
                if chunk.done:
                    if not carried:
                        raise self.malformed('no line carried a "message"')
                    result = self._result(chunk, "".join(parts), model)
        if result is None:
            raise ProviderUnavailable(f"{self.where} ended its answer before it was done")
        return result

    async def _document(self, first: str, rest: AsyncIterator[str]) -> _ChatReply:
        """One JSON reply of several lines: ``first``, then the ``rest`` of the answer's
        lines; up to :attr:`max_reply` characters."""
        lines, size = [first], len(first)
        async for line in rest:
            size += len(line) + 1
            if size > self.max_reply:
                raise self.too_long("an answer")
            lines.append(line)
        try:
            return msgspec.json.decode("\n".join(lines), type=_ChatReply)
        except msgspec.DecodeError as exc:
            raise ProviderError(f"{self.where} sent an unreadable reply: {exc}") from exc

    def _result(self, reply: _ChatReply, text: str, model: str) -> ChatResult:
        return ChatResult(
            text=text,
            model=reply.model or model,
            provider=self.name,
            usage=Usage(
                prompt_tokens=token_count(reply.prompt_eval_count),
                completion_tokens=token_count(reply.eval_count),
                total_ms=_ms(reply.total_duration),
                load_ms=_ms(reply.load_duration),
                prompt_ms=_ms(reply.prompt_eval_duration),
                generation_ms=_ms(reply.eval_duration),
                finish_reason=reply.done_reason,
            ),
        )

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """Call /api/embed for a batch of inputs."""
        payload: dict[str, Any] = {"model": model, "input": inputs}
        if self.keep_alive:
            payload["keep_alive"] = self.keep_alive
        reply = await self.call_json("POST", "/api/embed", payload, model, _EmbedReply)
        if len(reply.embeddings) != len(inputs):
            raise ProviderError(
                f"{self.where} returned {len(reply.embeddings)} embeddings for {len(inputs)} inputs"
            )
        return EmbedResult(
            vectors=reply.embeddings,
            model=reply.model or model,
            provider=self.name,
            usage=Usage(
                prompt_tokens=token_count(reply.prompt_eval_count),
                total_ms=_ms(reply.total_duration),
                load_ms=_ms(reply.load_duration),
            ),
        )

    async def health(self) -> Health:
        """GET /api/version, then /api/tags for the models it has."""
        version, why = await self.probe("/api/version", lambda body: str(body["version"]))
        if version is None:
            return Health(ok=False, detail=why)
        listed, _ = await self.probe("/api/tags", _listing)
        models = None
        if listed is not None:
            models = tuple(listed)
            self._learn(listed)
        return Health(ok=True, detail=f"ok (Ollama {version} at {self.shown_url})", models=models)

    def _learn(self, listed: dict[str, str]) -> None:
        self.digests = listed
        self._digests_read_at = time.monotonic()

    async def digest(self, model: str) -> str:
        """The digest of ``model`` ("" when Ollama does not tell), from the last listing;
        a model not in it has the list read again, at most every
        :data:`DIGEST_REFRESH` seconds."""
        found = _digest_in(self.digests, model)
        if found is None and time.monotonic() - self._digests_read_at >= DIGEST_REFRESH:
            listed, _ = await self.probe("/api/tags", _listing)
            self._digests_read_at = time.monotonic()
            if listed is not None:
                self._learn(listed)
                found = _digest_in(listed, model)
        return found or ""


#: Seconds before a model missing from the last listing has the list read again.
DIGEST_REFRESH = 30.0


def _json(line: str) -> bool:
    """Whether ``line`` is a JSON document by itself."""
    try:
        msgspec.json.decode(line)
    except msgspec.DecodeError:
        return False
    return True


def _listing(body: Any) -> dict[str, str]:
    """/api/tags as {name: digest} (the digest "" when not given), in its order."""
    return {str(m["name"]): str(m.get("digest") or "") for m in body["models"]}


def _digest_in(listed: dict[str, str], model: str) -> str | None:
    if model in listed:
        return listed[model]
    if ":" not in model:
        return listed.get(f"{model}:latest")
    return None
