"""Model calls honour HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY as httpx's default
client does, although the service's client has a transport of its own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from httpx._utils import get_environment_proxies  # what httpx's default client reads

from orchestra.config import Settings
from orchestra.errors import ConfigError
from orchestra.llm.transport import direct_route, environment_proxies, model_client
from tests.conftest import StartService
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.proxy import running_forward_proxy


@contextmanager
def process_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` holding ``env``'s proxy variables and no others, for the block."""
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        yield


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HTTP_PROXY": "http://proxy.corp:3128"},
        {"https_proxy": "proxy.corp:3128"},
        {"ALL_PROXY": "socks5://proxy.corp:1080", "FTP_PROXY": "http://ftp.corp:21"},
        {"http_proxy": "http://lower:1", "HTTP_PROXY": "http://upper:2"},
        {"HTTP_PROXY": "http://upper:2", "http_proxy": ""},
        {"HTTP_PROXY": "http://proxy.corp:3128", "REQUEST_METHOD": "GET"},
        {
            "HTTP_PROXY": "http://proxy.corp:3128",
            "NO_PROXY": "localhost, 127.0.0.1,::1,.internal.corp,gpu.lan,http://x.test,,10.0.0.0/8",
        },
        {"ALL_PROXY": "http://proxy.corp:3128", "no_proxy": "gpu.lan,*"},
    ],
)
def test_the_proxies_read_from_the_environment_are_the_ones_httpx_reads(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with process_environment(monkeypatch, env):
        assert environment_proxies(env) == get_environment_proxies()


#: (environment, given the proxy's URL; whether a call to http://127.0.0.1:PORT goes through it)
ROUTES: list[tuple[Callable[[str], dict[str, str]], bool]] = [
    (lambda proxy: {}, False),
    (lambda proxy: {"HTTP_PROXY": proxy}, True),  # loopback included, as in httpx
    (lambda proxy: {"http_proxy": proxy}, True),
    (lambda proxy: {"ALL_PROXY": proxy}, True),
    (lambda proxy: {"HTTPS_PROXY": proxy}, False),  # not for http:// URLs
    (lambda proxy: {"HTTP_PROXY": proxy, "NO_PROXY": "127.0.0.1"}, False),
    (lambda proxy: {"ALL_PROXY": proxy, "NO_PROXY": "gpu.lan,*"}, False),
    (lambda proxy: {"HTTP_PROXY": proxy, "NO_PROXY": "localhost"}, True),  # not the URL's name
    (lambda proxy: {"HTTP_PROXY": proxy, "NO_PROXY": "http://127.0.0.1"}, False),
]


@pytest.mark.parametrize(("make_env", "proxied"), ROUTES)
async def test_each_call_takes_the_route_httpx_default_client_gives_it(
    make_env: Callable[[str], dict[str, str]],
    proxied: bool,
    fake_ollama: FakeOllama,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_forward_proxy() as proxy:
        env = make_env(proxy.url)
        url = f"{fake_ollama.url}/api/version"
        through_proxy = [f"GET {url}"] if proxied else []
        async with model_client(4, env) as client:
            assert (await client.get(url)).status_code == 200
        assert proxy.seen == through_proxy
        proxy.seen.clear()
        with process_environment(monkeypatch, env):
            async with httpx.AsyncClient() as default:
                assert (await default.get(url)).status_code == 200
        assert proxy.seen == through_proxy


@pytest.mark.parametrize(("make_env", "proxied"), ROUTES)
async def test_calls_skip_the_client_only_where_httpx_sends_them_straight_to_the_lean_transport(
    make_env: Callable[[str], dict[str, str]], proxied: bool
) -> None:
    async with model_client(4, make_env("http://proxy.corp:3128")) as client:
        direct = direct_route(client, "http://127.0.0.1:11434")
        assert (direct is None) == proxied
        assert direct is None or direct is client._transport
        # Credentials in the URL (httpx's Basic auth) and https:// always go through the client.
        assert direct_route(client, "http://user:pw@127.0.0.1:11434") is None
        assert direct_route(client, "https://api.example.com/v1") is None
        assert direct_route(client, "http://host:notaport") is None


async def test_a_model_call_goes_through_the_proxy_named_in_http_proxy(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama
) -> None:
    async with (
        running_forward_proxy() as proxy,
        start_service(settings, env={"HTTP_PROXY": proxy.url}) as service,
    ):
        task = await service.submit("summarize", text="Through the proxy.")
        assert (await service.wait(task["id"]))["status"] == "succeeded"
        assert f"POST {fake_ollama.url}/api/chat" in proxy.seen
        assert fake_ollama.requests  # the call reached the model server


async def test_no_proxy_naming_the_model_server_sends_its_calls_direct(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama
) -> None:
    async with running_forward_proxy() as proxy:
        env = {"HTTP_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"}
        async with start_service(settings, env=env) as service:
            task = await service.submit("summarize", text="Straight to the model.")
            assert (await service.wait(task["id"]))["status"] == "succeeded"
        assert proxy.seen == []
        assert fake_ollama.requests


def test_a_proxy_httpx_cannot_use_is_a_config_error_that_hides_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        model_client(4, {"ALL_PROXY": "ftp://user:secret@proxy.corp:21"})
    assert "ftp://***@proxy.corp:21" in caught.value.message
    assert "secret" not in caught.value.message
