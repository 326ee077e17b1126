"""What an operator sees when providers fail: every entry of a chain that failed recorded on
the failed step, failed steps timed under the provider they last asked, fallbacks and model
process crashes counted, and a streamed call answered by a gateway that ignores ``stream``.

Every server here is real HTTP on loopback (the fake Ollama, the fake OpenAI-compatible
server, or one that writes the exact bytes a case gives) and the service runs whole.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from orchestra.config import Settings
from orchestra.errors import ProviderUnavailable
from tests.conftest import Service, StartService, with_provider
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.fake_openai import FakeOpenAI
from tests.fixtures.logs import captured, events
from tests.fixtures.real_model import REAL_MODEL
from tests.fixtures.servers import wait_until
from tests.fixtures.sse import read_events
from tests.integration.test_metrics import Scrape, scrape
from tests.integration.test_providers import KEY, dead_ollama_first, routed
from tests.integration.test_providers import fake_openai as fake_openai  # (a fixture)
from tests.integration.test_providers_answers import REQUEST, call, provider_at, raw, sends

F = TypeVar("F", bound=Callable[..., Any])


def real_model(test: F) -> F:
    """Marked as running the real model, and skipped without it (the module's other tests
    need none)."""
    for mark in REAL_MODEL:
        test = mark(test)
    return test


async def run_once(svc: Service, **body: Any) -> dict[str, Any]:
    """A summarize task with one attempt, once it has ended."""
    task = {"template": "summarize", "params": {"text": "a b c"}, "max_attempts": 1, **body}
    response = await svc.client.post("/api/v1/tasks", json=task)
    assert response.status_code == 201, response.text
    return await svc.wait(response.json()["id"], seconds=30)


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after(name, **labels) - before(name, **labels)


# -- 1. fallbacks on a failed step --------------------------------------------------------------


async def test_a_chain_whose_every_entry_fails_records_each_entry_on_the_failed_step(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    async with dead_ollama_first(settings, fake_openai, start_service) as svc:
        fake_openai.failure = Failure(400, "this gateway refuses the request")
        done = await run_once(svc)
        url = f"/api/v1/tasks/{done['id']}/events"
        events = [e async for e in read_events(svc.client, url)]
    assert done["status"] == "failed"
    message = done["error"]["message"]
    assert "ollama/llama3.2:" in message and "oai/gpt-fake:" in message
    [step] = done["steps"]
    assert step["status"] == "failed"
    # Each entry, in the chain's order, with the error its call failed with.
    ollama, oai = step["fallbacks"]
    assert ollama["route"] == "ollama/llama3.2" and "refused" in ollama["reason"], ollama
    assert oai["route"] == "oai/gpt-fake", oai
    assert "rejected the request (400): this gateway refuses the request" in oai["reason"]
    [finished] = [e for e in events if e["event"] == "step.finished"]
    assert finished["status"] == "failed" and finished["fallbacks"] == [ollama, oai]


async def test_a_model_of_one_entry_that_fails_records_no_fallbacks(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    """No chain, nothing passed over: the step's error says it all."""
    async with start_service(settings) as svc:
        fake_ollama.failure = Failure(400, "bad option")
        done = await run_once(svc, model="ollama/llama3.2")
    assert done["status"] == "failed"
    assert not done["steps"][0].get("fallbacks")


# -- 2. failed steps in orchestra_step_duration_seconds ----------------------------------------


async def test_a_failed_step_is_timed_under_the_provider_it_last_asked(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    # "nowhere" names only a disabled provider: its step reaches none.
    nowhere = {**settings.models, "nowhere": ["embedded/smollm2"]}
    async with start_service(msgspec.structs.replace(settings, models=nowhere)) as svc:
        before = await scrape(svc.client)
        fake_ollama.failure = Failure(400, "bad option", times=1)
        asked = await run_once(svc, model="ollama/llama3.2")
        unreached = await run_once(svc, model="nowhere")
        after = await scrape(svc.client)
    assert asked["status"] == unreached["status"] == "failed"
    assert unreached["error"]["type"] == "model_not_found"
    name = "orchestra_step_duration_seconds_count"
    failed = {"kind": "llm", "status": "failed"}
    assert delta(after, before, name, **failed, provider="ollama", model="llama3.2") == 1
    assert delta(after, before, name, **failed, provider="none", model="") == 1
    assert delta(after, before, name, **failed, provider="") == 0


# -- 3. counters: fallbacks, model process crashes ----------------------------------------------


async def test_each_entry_a_chain_moves_past_is_counted_with_why(
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    fallbacks = "orchestra_model_fallbacks_total"
    routes = routed(settings, fake_openai, "ollama/llama3.2", "oai/gpt-fake")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        before = await scrape(svc.client)
        fake_ollama.failure = Failure(503, "server busy, please try again", times=1)
        first = await run_once(svc)  # Ollama asked, busy: moved on
        second = await run_once(svc)  # Ollama's model marked: passed over unasked
        after = await scrape(svc.client)
    assert first["status"] == second["status"] == "succeeded"
    assert [s["model"] for s in (first["steps"] + second["steps"])] == ["oai/gpt-fake"] * 2
    assert len(fake_ollama.requests) == 1
    past = {"model": "default", "provider": "ollama"}
    assert delta(after, before, fallbacks, **past, reason="provider_unavailable") == 1
    assert delta(after, before, fallbacks, **past, reason="skipped") == 1
    assert delta(after, before, fallbacks) == 2
    # Known from the start (every entry of every chain, every reason), so rate() sees the
    # first one.
    for provider in ("ollama", "oai"):
        for reason in ("provider_unavailable", "model_not_found", "provider_error", "skipped"):
            labels = {"model": "default", "provider": provider, "reason": reason}
            assert (fallbacks, frozenset(labels.items())) in before.samples


@real_model
async def test_a_model_process_crash_and_its_restart_are_counted(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    fifo = tmp_path / "model.gguf"  # the loader blocks opening it: the crash is mid-load
    os.mkfifo(fifo)
    local = with_provider(settings, "embedded", enabled=True, model_path=str(fifo), preload=True)
    async with start_service(local) as svc:
        before = await scrape(svc.client)
        pid = await process_field(svc, "pid", lambda pid: bool(pid))
        os.kill(pid, signal.SIGSEGV)
        await process_field(svc, "restarts", lambda n: n == 1)  # after a backoff of 1 s
        after = await scrape(svc.client)
    crashes = "orchestra_model_process_crashes_total"
    assert delta(after, before, crashes, provider="embedded", phase="loading") == 1
    assert delta(after, before, crashes, provider="embedded") == 1
    restarts = "orchestra_model_process_restarts_total"
    assert delta(after, before, restarts, provider="embedded") == 1
    for phase in ("loading", "warming up", "generation", "embedding", "idle"):
        labels = frozenset({("provider", "embedded"), ("phase", phase)})
        assert (crashes, labels) in before.samples


async def process_field(svc: Service, field: str, ok: Any) -> Any:
    """A field of the embedded provider's process on /health, once ``ok(value)``."""
    found: list[Any] = []

    async def seen() -> bool:
        health = (await svc.client.get("/health")).json()
        found[:] = [(health["providers"]["embedded"]["process"] or {}).get(field)]
        return bool(ok(found[0]))

    await wait_until(seen, timeout=30, interval=0.05)
    return found[0]


# -- 4. a streamed call answered with one whole JSON reply ---------------------------------------


async def test_an_openai_gateway_that_ignores_stream_is_read_as_a_whole_answer(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    fake_openai.ignore_stream = True
    fake_openai.finish_reason = "length"
    async with start_service(
        routed(settings, fake_openai, "oai/gpt-fake"), env={"OAI_KEY": KEY}
    ) as svc:
        done = await run_once(svc, params={"text": "The cat sat on the mat."})
        url = f"/api/v1/tasks/{done['id']}/events"
        events = [e async for e in read_events(svc.client, url)]
    assert done["status"] == "succeeded", done["error"]
    assert fake_openai.requests[0]["stream"] is True  # asked to stream, answered whole
    assert "The cat sat on the mat." in done["result"]
    usage = done["steps"][0]["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == len(done["result"].split())
    assert usage["finish_reason"] == "length"
    streamed = "".join(e["text"] for e in events if e["event"] == "step.tokens")
    assert streamed.strip() == done["result"]  # the live text shows it, in one piece


async def test_an_ollama_gateway_that_ignores_stream_is_read_as_a_whole_answer(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.ignore_stream = True
    async with start_service(settings) as svc:
        done = await run_once(svc, params={"text": "The cat sat on the mat."})
    assert done["status"] == "succeeded", done["error"]
    assert fake_ollama.requests[0]["stream"] is True
    assert "The cat sat on the mat." in done["result"]
    usage = done["steps"][0]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["finish_reason"] == "stop"
    assert usage["completion_tokens"] == len(done["result"].split())


OPENAI_WHOLE = b"""{
  "id": "chatcmpl-1",
  "object": "chat.completion",
  "model": "gpt-4o-mini",
  "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Hello there"},
     "finish_reason": "length"}
  ],
  "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
}
"""
OLLAMA_WHOLE = b"""{
  "model": "llama3.2",
  "created_at": "2025-01-01T00:00:00Z",
  "message": {"role": "assistant", "content": "Hello there"},
  "done": true,
  "done_reason": "length",
  "total_duration": 5000000,
  "prompt_eval_count": 7,
  "eval_count": 2
}
"""


@pytest.mark.parametrize(
    ("kind", "body"), [("openai", OPENAI_WHOLE), ("ollama", OLLAMA_WHOLE)], ids=["openai", "ollama"]
)
@pytest.mark.parametrize("compact", [True, False], ids=["one-line", "indented"])
async def test_a_streamed_call_answered_with_one_json_document_reads_its_text_usage_and_end(
    kind: str, body: bytes, compact: bool
) -> None:
    if compact:
        body = msgspec.json.encode(msgspec.json.decode(body))
    pieces: list[str] = []
    async with provider_at(kind, sends(raw(200, body, "application/json"))) as provider:
        result = await provider.chat(REQUEST, pieces.append)
    assert result.text == "Hello there" and pieces == ["Hello there"]
    assert result.usage.prompt_tokens == 7 and result.usage.completion_tokens == 2
    assert result.usage.finish_reason == "length"
    assert result.model in ("gpt-4o-mini", "llama3.2")


async def test_a_whole_openai_answer_that_is_an_error_fails_the_streamed_call() -> None:
    body = b'{"error": {"message": "upstream timed out"}}'
    async with provider_at("openai", sends(raw(200, body, "application/json"))) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            await call(provider, "stream")
    assert failed.value.message == f"{provider.where} failed: upstream timed out"


async def test_an_embedded_model_that_cannot_run_fails_the_task_at_once(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    """A model file that does not exist (or llama-cpp-python not installed) is fixed by its
    operator, not by a retry: the task fails on its first attempt, not retryable (it used
    all three, each "retryable")."""
    missing = with_provider(
        settings, "local", kind="embedded", model_path=str(tmp_path / "missing.gguf"), timeout=5
    )
    missing = msgspec.structs.replace(
        missing, models={**missing.models, "default": ["local/missing"]}
    )
    async with start_service(missing) as svc:
        response = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "a"}, "max_attempts": 3},
        )
        assert response.status_code == 201, response.text
        task = await svc.wait(response.json()["id"], seconds=30)
    assert task["status"] == "failed" and len(task["attempts"]) == 1, task["attempts"]
    assert not task["error"].get("retryable")  # (said only when true)
    assert "missing.gguf does not exist" in task["error"]["message"]


async def test_a_chain_naming_a_model_the_embedded_provider_does_not_serve_is_said_at_start(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    """A ``model_path`` names the embedded model after its file: the chain's
    ``local/smollm2`` then failed every task, said only on each task (helper-129)."""
    mine = with_provider(
        settings, "local", kind="embedded", model_path=str(tmp_path / "mine.gguf"), timeout=5
    )
    mine = msgspec.structs.replace(
        mine, models={**mine.models, "default": ["local/smollm2", "local/mine"]}
    )
    with captured(logging.WARNING) as logged:
        async with start_service(mine):
            pass
    [said] = events(logged, "provider.model_unserved")
    assert (said["chain"], said["entry"], said["serves"]) == (
        "default",
        "local/smollm2",
        "local/mine",
    )


async def test_a_model_whose_provider_part_names_no_provider_says_so(service: Service) -> None:
    """``nosuch/model`` goes to the first provider as a model name (a slash is legal in one:
    ``hf.co/…``); its failure says which provider was asked, and that none is named so."""
    response = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"text": "a"}, "model": "olama/llama3.2"},
    )
    assert response.status_code == 201, response.text
    task = await service.wait(response.json()["id"], seconds=30)
    assert task["status"] == "failed"
    said = task["error"]["message"]
    assert "no provider is named 'olama', so 'olama/llama3.2' was asked of 'ollama'" in said, said
