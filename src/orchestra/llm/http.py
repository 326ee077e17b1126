"""What the HTTP providers share: one pooled client, error mapping, streaming with a deadline.

Every transport failure becomes an error of the tree here: nothing answering at all (refused,
unknown host) is ``ProviderUnreachable``; a timeout, a 5xx or a 429 is ``ProviderUnavailable``
(retryable; a fallback chain moves on from either, see :mod:`orchestra.llm.router`); a 404 is
``ModelNotFound``; other 4xx are
``ProviderError`` (permanent: the request itself is wrong). A 429 or 503 that says how long to
wait (Retry-After) is :class:`ProviderBusy`, carrying the wait. A redirect, or an answer that is
not the format asked for (an HTML page where JSON was due: a proxy, a login page, a wrong URL),
is a ``ProviderError`` that says so, before any of it is parsed.

Every call is bounded as a whole by the provider's ``timeout`` (httpx's own bounds each read,
so a server sending a byte now and then held a call for as long as it liked), and what is read
of an answer by :func:`reply_bound`: an answer that could not make a step's output within
``[limits] max_step_output_bytes`` fails as soon as it is known to be too long, before the rest
of it is read into memory.

Messages name the server by its redacted URL (``http://***@host:11434``: no userinfo, no key
in the query; see :mod:`orchestra.redact`), and whatever else goes into them (an exception's
text, a server's error body) is redacted too, so no credential reaches a task's error, /health
or the log. A server's error body is also cleared of the provider's own secrets (its API key,
its URL's password: :attr:`HttpProvider.secrets`) before it is cut to length, so that a body
echoing the ``Authorization`` header sent shows no part of it; the router clears every
provider's messages of every provider's secrets once more (:mod:`orchestra.llm.router`).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import msgspec

from orchestra.config import LimitSettings
from orchestra.errors import (
    InvalidOutput,
    ModelNotFound,
    ProviderBusy,
    ProviderError,
    ProviderUnavailable,
    ProviderUnreachable,
)
from orchestra.lines import LineTooLong, aiter_lines
from orchestra.llm.transport import direct_route
from orchestra.redact import redact_text, redact_url, scrub, secret_values
from orchestra.retry_after import retry_after
from orchestra.sizes import human_bytes

#: Seconds a health check may take.
HEALTH_TIMEOUT = 2.0
#: msgspec's error for JSON that stops before its end (a line cut off with the connection).
_TRUNCATED = "Input data was truncated"

#: The media types of answers: a JSON document, JSON lines (Ollama's streams), Server-Sent
#: Events (OpenAI's streams).
JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

#: ``[limits] max_step_output_bytes`` when a provider is built without settings.
OUTPUT_LIMIT = LimitSettings().max_step_output_bytes
#: Bytes a server's JSON may spend on one byte of the text it carries: ``\u003c`` for "<"
#: (Go's encoder, Ollama's, escapes <, > and &), ``\u0001`` for a control character.
ESCAPE_FACTOR = 6
#: Bytes of an answer besides its text: the model's name, statistics, a choice's fields.
REPLY_SLACK = 64 * 1024
#: Most bytes of an error answer read for its reason (the message shows 200 characters).
ERROR_BODY_BYTES = 64 * 1024

T = TypeVar("T")


def reply_bound(output_limit: int) -> int:
    """The most bytes of an answer (or of one line of a streamed one) worth reading, given
    ``[limits] max_step_output_bytes``: past it, the text it carries cannot fit a step's
    output, however its JSON escapes it."""
    return ESCAPE_FACTOR * output_limit + REPLY_SLACK


def token_count(value: Any) -> int | None:
    """A count a server reported (tokens, nanoseconds), or None when it is no non-negative
    integer: unknown, as a count not reported at all (a server that sends -5 must not fail
    the task, nor reach the metrics' counters)."""
    return value if type(value) is int and value >= 0 else None


def media_type(response: httpx.Response) -> str:
    """The media type of an answer ("text/html"), without parameters; "" when not given."""
    value: str = response.headers.get("content-type", "")
    return value.partition(";")[0].strip().lower()


def is_format(media: str, expected: str) -> bool:
    """Whether an answer of type ``media`` can be the ``expected`` format: Server-Sent Events
    only as text/event-stream; JSON and JSON lines under any JSON type (a proxy may call JSON
    lines application/json). An answer that names no type is read as expected."""
    if not media:
        return True
    if expected == SSE:
        return media == SSE
    return "json" in media


def cause(exc: BaseException) -> str:
    """The most specific reason in an exception chain ("Connection refused", not "All
    connection attempts failed"), redacted."""
    seen = exc
    while seen.__cause__ or seen.__context__:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        if isinstance(seen, socket.gaierror):  # a name lookup's: its numbers are not errno's
            host = "the host name does not resolve"
            return f"{host} ({seen.strerror})" if seen.strerror else host
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
    return redact_text(str(exc)) or type(exc).__name__


def error_text(response: httpx.Response, secrets: tuple[str, ...] = ()) -> str:
    """The reason a server gives in an error body: Ollama's ``{"error": "..."}`` or OpenAI's
    ``{"error": {"message": "..."}}``, else the start of the body; redacted (a proxy's error
    page may repeat the URL it was asked for) and cleared of ``secrets`` (a server may repeat
    the Authorization header it was sent), before it is cut to its first 200 characters."""
    return redact_text(_error_text(response, secrets))


def _error_text(response: httpx.Response, secrets: tuple[str, ...]) -> str:
    try:
        body = response.json()
    except ValueError:
        return scrub(response.text, secrets)[:200] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        if isinstance(error, dict) and "message" in error:
            return scrub(str(error["message"]), secrets)
        return scrub(str(error), secrets)
    return scrub(response.text, secrets)[:200]


class HttpProvider:
    """A provider reached over HTTP through the service's shared client."""

    kind = "http"
    #: How error messages name the server ("Ollama", "the OpenAI-compatible server").
    label = "the server"

    def __init__(
        self,
        name: str,
        client: httpx.AsyncClient,
        url: str,
        timeout: float,
        api_key: str | None = None,
        *,
        output_limit: int = OUTPUT_LIMIT,
    ) -> None:
        """``output_limit``: ``[limits] max_step_output_bytes``, which bounds what is read of
        an answer (:func:`reply_bound`)."""
        self.name = name
        self.client = client
        base, _, query = url.partition("?")
        #: The URL requests go to, credentials included (httpx sends userinfo as Basic auth).
        self.url = base.rstrip("/") + (f"?{query}" if query else "")
        # A query (a hosted API's ?key=) goes after each request's path, not before it.
        self._base, self._query = base.rstrip("/"), f"?{query}" if query else ""
        #: The URL as messages show it: without its userinfo or a key in its query.
        self.shown_url = redact_url(self.url)
        #: What this provider sends that is secret (its key, its URL's password), masked in
        #: every message made of what the server says (:func:`~orchestra.redact.scrub`).
        self.secrets = secret_values(api_key, url)
        self.timeout = timeout
        self.output_limit = output_limit
        #: The most bytes read of an answer, or characters of one line of a streamed one.
        self.max_reply = reply_bound(output_limit)
        # Sent with each request, never logged or shown (errors name the variable, not the key).
        self.headers: Mapping[str, str] = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        #: The lean transport, when calls may skip the client (see ``direct_route``).
        self._direct = direct_route(client, self.url)
        #: What a JSON request adds to the client's own headers.
        self._client_headers = {**self.headers, "Content-Type": "application/json"}
        #: What the client would send with a JSON body: its own headers, then ours.
        self._json_headers = [
            *client.headers.raw,
            *((k.encode(), v.encode()) for k, v in self._client_headers.items()),
        ]
        self._timeouts = {"timeout": httpx.Timeout(timeout).as_dict()}
        self._urls: dict[str, tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}

    @property
    def where(self) -> str:
        return f"{self.label} at {self.shown_url}"

    def at(self, path: str) -> str:
        """The URL of ``path`` on this server: the base's path, then ``path``, then the
        base's query (``http://h/v1?key=K`` and ``/models``: ``http://h/v1/models?key=K``)."""
        return f"{self._base}{path}{self._query}"

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        payload: Any,
        model: str | None,
        expect: str = JSON,
        *,
        also: str | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and hand over the open response, once it is known to be a success
        in the ``expect`` format (a media type), or in the format ``also`` when given (the
        caller tells which from :func:`media_type`); every failure is a ProviderError."""
        try:
            async with self._send(method, path, payload) as response:
                status = response.status_code
                if status >= 400:
                    head = await _read_head(response, ERROR_BODY_BYTES)
                    raise self.status_error(_with_body(response, head), model)
                if status >= 300:
                    raise self.redirect_error(response)
                media = media_type(response)
                if not is_format(media, expect) and not (also and is_format(media, also)):
                    raise ProviderError(f"{self.where} answered {media}, not {expect}")
                yield response
        except LineTooLong:  # from the lines of the answer, read in the caller's block
            raise self.too_long("a line") from None
        except httpx.ConnectError as exc:
            raise ProviderUnreachable(f"cannot connect to {self.where}: {cause(exc)}") from exc
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                f"{self.where} did not answer within {self.timeout:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(
                f"request to {self.where} failed: {type(exc).__name__}: {redact_text(str(exc))}"
            ) from exc
        except httpx.InvalidURL as exc:  # not an HTTPError: it would escape as a bug
            raise ProviderError(f"{self.where} is not a usable URL: {cause(exc)}") from exc

    @asynccontextmanager
    async def _send(self, method: str, path: str, payload: Any) -> AsyncIterator[httpx.Response]:
        """The open response to a JSON request: straight through the lean transport when the
        client would send it there anyway, else through the client.

        Both ways send the same bytes: the body encoded by msgspec (so a NaN or a date in a
        template's options is encoded alike, whichever way the call goes), httpx's own
        headers. Once a server has set a cookie (a sticky session of a load balancer), its
        calls go through the client, which sends it back; httpx's "HTTP Request" log line is
        written for calls through the client only."""
        body = msgspec.json.encode(payload)
        client = self.client
        if self._direct is None or client.cookies or client.is_closed:
            async with client.stream(
                method,
                self.at(path),
                content=body,
                headers=self._client_headers,
                timeout=self.timeout,
            ) as response:
                yield response
            return
        known = self._urls.get(path)
        if known is None:
            url = httpx.URL(self.at(path))
            known = self._urls[path] = (url, [(b"Host", url.netloc), *self._json_headers])
        url, head = known
        # The headers httpx itself would send with ``content=body``, in its order (Host first,
        # Content-Length last), given whole: building them from ``content`` looked each one up
        # again, a third of the request's cost.
        headers = [*head, (b"Content-Length", b"%d" % len(body))]
        request = httpx.Request(
            method,
            url,
            headers=headers,
            stream=httpx.ByteStream(body),
            extensions=self._timeouts,
        )
        request.read()  # the body is at hand: a lost keep-alive connection can send it again
        response = await self._direct.handle_async_request(request)
        response.request = request
        try:
            if "set-cookie" in response.headers:
                client.cookies.extract_cookies(response)
            yield response
        finally:
            await response.aclose()

    def status_error(self, response: httpx.Response, model: str | None) -> ProviderError:
        """The error for an HTTP error status."""
        reason = error_text(response, self.secrets)
        status = response.status_code
        if status == 404 and model is not None:
            return ModelNotFound(f"model {model!r} not found on {self.where}: {reason}")
        if status >= 500 or status == 429:
            # 503 is also Ollama's "server busy" when its queue is full: worth a retry.
            message = f"{self.where} answered {status}: {reason}"
            wait = None
            if status in (429, 503):  # the statuses whose Retry-After means "busy, come back"
                wait = retry_after(response.headers.get("retry-after"))
            if wait is not None:
                asked = f"{math.ceil(wait)}s"
                return ProviderBusy(f"{message} (it asks to wait {asked}: Retry-After)", wait)
            return ProviderUnavailable(message)
        if status in (401, 403):
            return ProviderError(f"{self.where} refused the credentials ({status}): {reason}")
        return ProviderError(f"{self.where} rejected the request ({status}): {reason}")

    def redirect_error(self, response: httpx.Response) -> ProviderError:
        """The error for a redirect: not followed (a POST would not survive most of them, and
        the URL to fix is the provider's)."""
        location = response.headers.get("location")
        where = f"redirect to {redact_url(location)}" if location else "a redirect"
        return ProviderError(
            f"{self.where} answered {response.status_code} ({where}; redirects are not "
            "followed: check the provider's url)"
        )

    async def call_json(
        self, method: str, path: str, payload: Any, model: str | None, type_: type[T]
    ) -> T:
        """A request whose whole reply is one JSON document of ``type_``, within the
        provider's timeout as a whole and read up to :attr:`max_reply` bytes."""
        return await self.within_timeout(self._call_json(method, path, payload, model, type_))

    async def _call_json(
        self, method: str, path: str, payload: Any, model: str | None, type_: type[T]
    ) -> T:
        async with self.request(method, path, payload, model) as response:
            return await self.read_json(response, type_)

    async def read_json(self, response: httpx.Response, type_: type[T]) -> T:
        """An answer's whole body as one JSON document of ``type_``, read up to
        :attr:`max_reply` bytes."""
        body = await self._read_reply(response)
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.DecodeError as exc:
            raise ProviderError(f"{self.where} sent an unreadable reply: {exc}") from exc

    async def _read_reply(self, response: httpx.Response) -> bytes:
        """The body, read as it arrives; refused as soon as it passes :attr:`max_reply`."""
        bound = self.max_reply
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and "content-encoding" not in response.headers:
            if int(declared) > bound:
                raise self.too_long("an answer")
        parts: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > bound:
                raise self.too_long("an answer")  # the rest is never read: the connection closes
            parts.append(chunk)
        return b"".join(parts)

    def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        """The lines of a streamed answer, each at most :attr:`max_reply` characters (a longer
        one fails the call: :meth:`request` turns its ``LineTooLong`` into the error)."""
        return aiter_lines(response, self.max_reply)

    def too_long(self, what: str) -> InvalidOutput:
        """The error for an answer (or a line of one) over :attr:`max_reply`."""
        return InvalidOutput(
            f"{self.where} sent {what} of more than {human_bytes(self.max_reply)}: more than a "
            f"step's output may hold, whatever its encoding (the limit is "
            f"{human_bytes(self.output_limit)}: [limits] max_step_output_bytes)"
        )

    def malformed(self, what: str) -> ProviderError:
        """The error for an answer the protocol cannot produce (its text's fields missing)."""
        return ProviderError(f"{self.where} sent a malformed answer: {what}")

    async def within_timeout(self, call: Awaitable[T]) -> T:
        """Bound a whole answer, streamed or not (httpx's timeout bounds each read, not the
        total: a server sending a byte now and then would hold the call for ever)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise ProviderUnavailable(
                f"{self.where} did not answer within {self.timeout:g}s"
            ) from None

    def decode_chunk(self, line: str | bytes, type_: type[T]) -> T:
        """One line of a stream.

        Raises:
            ProviderUnavailable: the line stops in the middle of its JSON: the answer was cut
                off (the connection closed mid-line), which another try may not meet.
            ProviderError: the line is no JSON of the protocol's.
        """
        try:
            return msgspec.json.decode(line, type=type_)
        except msgspec.DecodeError as exc:
            if line and str(exc) == _TRUNCATED:  # (an empty line is said to be truncated too)
                raise ProviderUnavailable(
                    f"{self.where} cut its answer off in the middle of a line"
                ) from exc
            raise ProviderError(f"{self.where} sent an unreadable line: {exc}") from exc

    async def probe(self, path: str, read: Callable[[Any], T]) -> tuple[T | None, str]:
        """GET ``path`` quickly for a health check: (``read(json)``, "") or (None, why not);
        within :data:`HEALTH_TIMEOUT` as a whole."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                response = await self.client.get(
                    self.at(path), headers=self.headers, timeout=HEALTH_TIMEOUT
                )
            response.raise_for_status()
            return read(response.json()), ""
        except TimeoutError:
            return None, f"{self.shown_url} did not answer within {HEALTH_TIMEOUT:g}s"
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            reason = error_text(exc.response, self.secrets)
            return None, f"{self.shown_url} answered {status}: {reason}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, f"cannot reach {self.shown_url}: {cause(exc)}"
        except (ValueError, KeyError, TypeError, AttributeError):
            return None, f"{self.shown_url} did not answer like {self.label}"

    async def start(self) -> None:
        """Nothing to prepare: the server is checked by the health checks."""

    async def close(self) -> None:
        """Nothing to release: the HTTP client belongs to the service."""


async def _read_head(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of a body (the rest is left unread: the connection closes)."""
    head = bytearray()
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= limit:
            break
    return bytes(head[:limit])


def _with_body(response: httpx.Response, body: bytes) -> httpx.Response:
    """``response`` holding ``body`` (its start, already decoded): what error messages read."""
    kept = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    phrase = response.extensions.get("reason_phrase")
    return httpx.Response(
        response.status_code,
        headers=kept,
        content=body,
        request=response.request,
        extensions={} if phrase is None else {"reason_phrase": phrase},
    )
