"""What the HTTP providers share: one pooled client, error mapping, streaming with a deadline.

Every transport failure becomes an error of the tree here: nothing answering at all (refused,
unknown host) is ``ProviderUnreachable``, so a fallback chain moves on; a timeout, a 5xx or a
429 is ``ProviderUnavailable`` (retryable); a 404 is ``ModelNotFound``; other 4xx are
``ProviderError`` (permanent: the request itself is wrong).

Messages name the server by its redacted URL (``http://***@host:11434``: no userinfo, no key
in the query; see :mod:`orchestra.redact`), and whatever else goes into them (an exception's
text, a server's error body) is redacted too, so no credential reaches a task's error, /health
or the log.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import msgspec

from orchestra.errors import ModelNotFound, ProviderError, ProviderUnavailable, ProviderUnreachable
from orchestra.llm.transport import direct_route
from orchestra.redact import redact_text, redact_url

#: Seconds a health check may take.
HEALTH_TIMEOUT = 2.0

T = TypeVar("T")


def cause(exc: BaseException) -> str:
    """The most specific reason in an exception chain ("Connection refused", not "All
    connection attempts failed"), redacted."""
    seen = exc
    while seen.__cause__ or seen.__context__:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
    return redact_text(str(exc)) or type(exc).__name__


def error_text(response: httpx.Response) -> str:
    """The reason a server gives in an error body: Ollama's ``{"error": "..."}`` or OpenAI's
    ``{"error": {"message": "..."}}``, else the start of the body; redacted (a proxy's error
    page may repeat the URL it was asked for)."""
    return redact_text(_error_text(response))


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        return str(error)
    return response.text[:200]


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
    ) -> None:
        self.name = name
        self.client = client
        #: The URL requests go to, credentials included (httpx sends userinfo as Basic auth).
        self.url = url.rstrip("/")
        #: The URL as messages show it: without its userinfo or a key in its query.
        self.shown_url = redact_url(self.url)
        self.timeout = timeout
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

    @asynccontextmanager
    async def request(
        self, method: str, path: str, payload: Any, model: str | None
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and hand over the open response; every failure is a ProviderError."""
        try:
            async with self._send(method, path, payload) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self.status_error(response, model)
                yield response
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
                f"{self.url}{path}",
                content=body,
                headers=self._client_headers,
                timeout=self.timeout,
            ) as response:
                yield response
            return
        known = self._urls.get(path)
        if known is None:
            url = httpx.URL(f"{self.url}{path}")
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
        reason = error_text(response)
        status = response.status_code
        if status == 404 and model is not None:
            return ModelNotFound(f"model {model!r} not found on {self.where}: {reason}")
        if status >= 500 or status == 429:
            # 503 is also Ollama's "server busy" when its queue is full: worth a retry.
            return ProviderUnavailable(f"{self.where} answered {status}: {reason}")
        if status in (401, 403):
            return ProviderError(f"{self.where} refused the credentials ({status}): {reason}")
        return ProviderError(f"{self.where} rejected the request ({status}): {reason}")

    async def call_json(
        self, method: str, path: str, payload: Any, model: str | None, type_: type[T]
    ) -> T:
        """A request whose whole reply is one JSON document of ``type_``."""
        async with self.request(method, path, payload, model) as response:
            body = await response.aread()
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.DecodeError as exc:
            raise ProviderError(f"{self.where} sent an unreadable reply: {exc}") from exc

    async def within_timeout(self, call: Awaitable[T]) -> T:
        """Bound a whole streamed answer (httpx's timeout bounds each read, not the total)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise ProviderUnavailable(
                f"{self.where} did not answer within {self.timeout:g}s"
            ) from None

    def decode_chunk(self, line: str | bytes, type_: type[T]) -> T:
        """One line of a stream."""
        try:
            return msgspec.json.decode(line, type=type_)
        except msgspec.DecodeError as exc:
            raise ProviderError(f"{self.where} sent an unreadable line: {exc}") from exc

    async def probe(self, path: str, read: Callable[[Any], T]) -> tuple[T | None, str]:
        """GET ``path`` quickly for a health check: (``read(json)``, "") or (None, why not)."""
        try:
            response = await self.client.get(
                f"{self.url}{path}", headers=self.headers, timeout=HEALTH_TIMEOUT
            )
            response.raise_for_status()
            return read(response.json()), ""
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            return None, f"{self.shown_url} answered {status}: {error_text(exc.response)}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, f"cannot reach {self.shown_url}: {cause(exc)}"
        except (ValueError, KeyError, TypeError, AttributeError):
            return None, f"{self.shown_url} did not answer like {self.label}"

    async def start(self) -> None:
        """Nothing to prepare: the server is checked by the health checks."""

    async def close(self) -> None:
        """Nothing to release: the HTTP client belongs to the service."""
