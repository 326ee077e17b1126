"""The service's one ``httpx.AsyncClient`` for model servers: its transports and its proxies.

Three parts, chosen per request URL by httpx (``mounts``):

- ``http://`` goes to :class:`~orchestra.llm.lean_transport.LeanTransport`, HTTP/1.1 over asyncio
  streams: a local model server's answers cost a fraction of the Python that httpcore spends
  on them (``benchmarks/httpx_probe.py``; the figures are in ``benchmarks/RESULTS.md``).
- ``https://`` (hosted APIs) goes to httpx's own transport, split into small pools by
  ``ShardedTransport``: httpcore's pool checks every pooled connection (a ``getpeername`` and a
  readability poll each) whenever a request starts or ends, so its cost per request grows with
  the number of connections (encode/httpx#3215); over several small pools, each request goes
  to the pool with the fewest requests in flight, and every pool stays small and busy.
- Proxies, from the environment as httpx's default client reads them (``HTTP_PROXY``,
  ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, lower case first; see
  :func:`environment_proxies`): httpx stops reading them itself once a client is given a
  transport, so :func:`model_client` mounts a proxying httpx transport for each. Like httpx,
  a proxy applies to loopback addresses too (a local Ollama at ``http://127.0.0.1:11434``
  included) unless ``NO_PROXY`` names them (``NO_PROXY=localhost,127.0.0.1``); ``NO_PROXY=*``
  turns every proxy off. Only the environment the service was given counts: macOS's and
  Windows's system proxy settings, which httpx also reads, are not.

A provider asks :func:`direct_route` once, for its server's URL, whether the client would send
its calls straight to the lean transport; if so, it hands each call to the transport itself,
past httpx's client layer (see :class:`~orchestra.llm.http.HttpProvider`).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import AsyncIterator, Mapping

import httpx

from orchestra.errors import ConfigError
from orchestra.llm.lean_transport import LeanTransport
from orchestra.redact import redact_text, redact_url
from orchestra.tls import client_context


def model_client(max_connections: int, env: Mapping[str, str]) -> httpx.AsyncClient:
    """The client providers share: the lean transport for ``http://``, sharded httpx pools for
    other schemes, and the proxies ``env`` names.

    Args:
        max_connections: requests to model servers at once (more wait for a free one).
        env: the environment the service runs in (the CLI passes ``os.environ``).

    Raises:
        ConfigError: a proxy variable names a proxy httpx cannot use (``ftp://``, or SOCKS
            without ``httpx[socks]`` installed).
    """
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    for pattern, proxy in environment_proxies(env).items():
        try:
            mounts[pattern] = (
                None
                if proxy is None
                else httpx.AsyncHTTPTransport(proxy=proxy, limits=limits, verify=client_context())
            )
        except (ImportError, ValueError) as exc:
            raise ConfigError(
                f"the proxy {redact_url(str(proxy))} named in the environment for "
                f"{pattern} cannot be used: {redact_text(str(exc))}"
            ) from exc
    transport = LeanTransport(max_connections, fallback=ShardedTransport(max_connections))
    return httpx.AsyncClient(transport=transport, mounts=mounts, verify=client_context())


def direct_route(client: httpx.AsyncClient, url: str) -> LeanTransport | None:
    """The lean transport when ``client`` would send every request for ``url`` straight to it:
    a plain-HTTP URL without credentials (httpx turns those into Basic auth) that no proxy of
    the environment applies to. None: requests for ``url`` go through the client.

    A provider sends its calls to the route it is given, skipping httpx's client layer (URL
    merging, cookies, auth and redirect handling), which cost more than the lean transport
    itself: 0.47 ms of CPU a model call through the client, 0.23 ms straight to the transport
    (benchmarks/RESULTS.md). httpx names no public way to ask which transport takes a URL;
    where its private one is missing, every call goes through the client, as before.
    """
    route_for = getattr(client, "_transport_for_url", None)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None  # the client says so, as a ProviderError, at the first call
    if route_for is None or parsed.scheme != "http" or parsed.userinfo:
        return None
    route = route_for(parsed)
    return route if isinstance(route, LeanTransport) else None


def environment_proxies(env: Mapping[str, str]) -> dict[str, str | None]:
    """The proxies ``env`` asks for, as httpx's ``mounts`` patterns: a proxy URL, or None for
    "no proxy here" (a ``NO_PROXY`` entry).

    The same as httpx's default client builds from ``urllib.request.getproxies()`` (httpx's
    ``get_environment_proxies``, checked against it by the tests), read from ``env`` instead of
    the process's environment.
    """
    found = _proxy_variables(env)
    mounts: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        if found.get(scheme):
            url = found[scheme]
            mounts[f"{scheme}://"] = url if "://" in url else f"http://{url}"
    for host in (entry.strip() for entry in found.get("no", "").split(",")):
        # How curl reads NO_PROXY (CURLOPT_NOPROXY): "*" is every host, ".example.com" its
        # subdomains, "example.com" the domain and its subdomains.
        if host == "*":
            return {}
        if not host:
            continue
        if "://" in host:
            mounts[host] = None
        elif _is_ip(host, ipaddress.IPv4Address):
            mounts[f"all://{host}"] = None
        elif _is_ip(host, ipaddress.IPv6Address):
            mounts[f"all://[{host}]"] = None
        elif host.lower() == "localhost":
            mounts[f"all://{host}"] = None
        else:
            mounts[f"all://*{host}"] = None
    return mounts


def _proxy_variables(env: Mapping[str, str]) -> dict[str, str]:
    """``{"http": …, "no": …}`` from the ``*_proxy`` variables, read as
    ``urllib.request.getproxies_environment`` reads them: any case, a lower-case name winning
    (an empty one removes it), and no upper-case ``HTTP_PROXY`` under CGI, where a client's
    ``Proxy:`` header would arrive as it (httpoxy)."""
    found: dict[str, str] = {}
    for name, value in env.items():
        if value and name[-6:].lower() == "_proxy":
            found[name[:-6].lower()] = value
    if "REQUEST_METHOD" in env:
        found.pop("http", None)
    for name, value in env.items():
        if name[-6:] == "_proxy":
            if value:
                found[name[:-6].lower()] = value
            else:
                found.pop(name[:-6].lower(), None)
    return found


def _is_ip(host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(host.split("/")[0])
    except ValueError:
        return False
    return True


#: Connections per pool: small enough that the per-request scan stays cheap.
POOL_SIZE = 8


class _Counted(httpx.AsyncByteStream):
    """A response body that tells its pool when it is closed (the request is over then)."""

    def __init__(self, stream: httpx.AsyncByteStream, in_flight: list[int], index: int) -> None:
        self._stream = stream
        self._in_flight = in_flight
        self._index = index
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._in_flight[self._index] -= 1
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several ``httpx.AsyncHTTPTransport`` pools behind one transport."""

    def __init__(self, max_connections: int, pool_size: int = POOL_SIZE) -> None:
        shards = max(1, math.ceil(max_connections / pool_size))
        per_pool = math.ceil(max_connections / shards)
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self._pools = [
            httpx.AsyncHTTPTransport(limits=limits, verify=client_context()) for _ in range(shards)
        ]
        self._in_flight = [0] * shards

    @property
    def pools(self) -> int:
        """How many pools the connections are split into."""
        return len(self._pools)

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Requests under way in each pool (a request ends when its response is closed)."""
        return tuple(self._in_flight)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pool with the fewest requests in flight."""
        index = min(range(len(self._pools)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._in_flight[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Counted(response.stream, self._in_flight, index)
        return response

    async def aclose(self) -> None:
        """Close every pool's connections."""
        for pool in self._pools:
            await pool.aclose()
