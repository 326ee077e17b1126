"""A model server that goes away and comes back (Ollama restarting): a call waits for it, up
to ``[fallback] outage_wait``, instead of failing its attempt at once; one that never answered
fails at once. Against a real service, with the fake Ollama behind a relay on a loopback port
that stops listening (connection refused) and listens again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from orchestra.config import FallbackSettings, ProviderSettings, Settings
from orchestra.errors import ModelNotFound, ProviderUnavailable
from orchestra.llm.base import ChatMessage, ChatRequest, Health
from orchestra.llm.providers import build_providers
from orchestra.llm.router import Router
from tests.conftest import StartService, with_provider
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, wait_until


class Relay:
    """Forwards connections from a fixed loopback port to ``target``; :meth:`stop` closes the
    port (connections are refused), :meth:`start` opens it again."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open -= {writer, up_writer}


@pytest.fixture
async def relay(fake_ollama: FakeOllama) -> AsyncIterator[Relay]:
    relay = Relay(fake_ollama.url)
    await relay.start()
    yield relay
    with contextlib.suppress(Exception):
        await relay.stop()


def waiting(settings: Settings, url: str, seconds: float) -> Settings:
    settings = with_provider(settings, "ollama", url=url)
    return msgspec.structs.replace(settings, fallback=FallbackSettings(outage_wait=seconds))


async def test_a_task_waits_for_a_model_server_that_went_away_and_runs_when_it_is_back(
    settings: Settings, start_service: StartService, relay: Relay
) -> None:
    async with start_service(waiting(settings, relay.url, 30)) as svc:
        before = await svc.submit("summarize", text="while it is up")
        assert (await svc.wait(before["id"]))["status"] == "succeeded"
        await relay.stop()  # Ollama restarts: connections are refused
        task = await svc.submit("summarize", text="during the restart")
        router = svc.app.runtime.router
        await wait_until(lambda: router.waiting == 1, timeout=10)
        await relay.start()
        done = await svc.wait(task["id"], 30)
    assert done["status"] == "succeeded", done["error"]
    assert len(done["attempts"]) == 1  # no attempt was used up by the restart


async def test_the_wait_ends_with_the_outage_window_and_a_server_never_seen_fails_at_once(
    settings: Settings, start_service: StartService, relay: Relay
) -> None:
    async with start_service(waiting(settings, relay.url, 1.5)) as svc:
        before = await svc.submit("summarize", text="while it is up")
        assert (await svc.wait(before["id"]))["status"] == "succeeded"
        await relay.stop()
        body = {"template": "summarize", "params": {"text": "gone"}, "max_attempts": 1}
        task = (await svc.client.post("/api/v1/tasks", json=body)).json()
        done = await svc.wait(task["id"], 30)
    assert done["status"] == "failed"
    assert "waited 1.5s for it to answer" in done["error"]["message"], done["error"]
    # A server that never answered since the start: a wrong URL fails at once.
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with start_service(waiting(settings, nowhere, 30)) as svc:
        body = {"template": "summarize", "params": {"text": "x"}, "max_attempts": 1}
        started = time.monotonic()
        task = (await svc.client.post("/api/v1/tasks", json=body)).json()
        done = await svc.wait(task["id"], 30)
        assert done["status"] == "failed" and time.monotonic() - started < 10
    assert "waited" not in done["error"]["message"]


async def test_a_chain_whose_embedded_model_failed_too_is_not_waited_for(
    settings: Settings, tmp_path: Path
) -> None:
    """The embedded model's process may have died during the call (a prompt that crashes
    it): its chain fails at once, as before, and the prompt is not sent again and again."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    chain = msgspec.structs.replace(
        waiting(settings, nowhere, 30),
        providers={
            **settings.providers,
            "ollama": ProviderSettings(kind="ollama", url=nowhere, timeout=5),
            "embedded": ProviderSettings(
                kind="embedded", model_path=str(tmp_path / "missing.gguf"), timeout=5
            ),
        },
        models={"default": ["ollama/llama3.2", "embedded/missing"]},
    )
    async with httpx.AsyncClient() as client:
        router = Router(build_providers(chain, client, {}), chain)
        for name in ("ollama", "embedded"):  # both answered before
            router.observe(name, Health(ok=True, detail="ok"))
        request = ChatRequest("default", (ChatMessage("user", "hello"),))
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable) as failed:
            await asyncio.wait_for(router.chat(request), timeout=20)
        assert time.monotonic() - started < 5 and router.waiting == 0
        await router.close()
    assert "does not exist" in failed.value.message and "waited" not in failed.value.message


async def test_no_model_named_anywhere_and_no_default_chain_fails_saying_so(
    settings: Settings,
) -> None:
    """A step asks ``default`` when nothing names a model; without that chain in [models]
    the call fails at once with the reason, not as a model called "default" not found."""
    plain = msgspec.structs.replace(settings, models={})
    async with httpx.AsyncClient() as client:
        router = Router(build_providers(plain, client, {}), plain)
        with pytest.raises(ModelNotFound) as failed:
            await router.chat(ChatRequest("default", (ChatMessage("user", "hello"),)))
        await router.close()
    assert failed.value.message.startswith("no model 'default' in [models]: a step asks it")
