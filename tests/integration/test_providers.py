"""Providers end to end: the OpenAI-compatible kind, fallback chains, health, /api/v1/models.

Every server here is real HTTP on loopback: a fake Ollama and a fake OpenAI-compatible server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from orchestra.config import ModelSettings, Settings, TemplateSettings
from tests.conftest import Service, StartService, with_provider
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.fake_openai import FakeOpenAI, running_fake_openai
from tests.fixtures.servers import free_socket, wait_until
from tests.fixtures.sse import read_events

KEY = "sk-test-5f1e2d"


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with running_fake_openai(api_key=KEY) as fake:
        yield fake


def routed(settings: Settings, fake_openai: FakeOpenAI, *chain: str) -> Settings:
    """Settings with the fake OpenAI server as provider ``oai`` and ``default`` = ``chain``."""
    settings = with_provider(
        settings, "oai", kind="openai", url=fake_openai.url, api_key_env="OAI_KEY", timeout=10
    )
    models = {**settings.models, "default": list(chain)}
    return msgspec.structs.replace(settings, models=models)


@pytest.fixture
async def oai_service(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> AsyncIterator[Service]:
    async with start_service(
        routed(settings, fake_openai, "oai/gpt-fake"), env={"OAI_KEY": KEY}
    ) as svc:
        yield svc


async def attempted(svc: Service, text: str, max_attempts: int) -> dict[str, Any]:
    """A summarize task with ``max_attempts``, once it has ended."""
    body = {"template": "summarize", "params": {"text": text}, "max_attempts": max_attempts}
    task = await svc.client.post("/api/v1/tasks", json=body)
    return await svc.wait(task.json()["id"], seconds=30)


# -- the openai kind ----------------------------------------------------------------------------


async def test_a_query_in_the_providers_url_goes_after_each_requests_path(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    """A hosted API's key in the URL's query (``…/v1?key=K``) stays a query: it went before
    the path (``/v1?key=K/chat/completions``), and no call could work."""
    routed_settings = routed(settings, fake_openai, "oai/gpt-fake")
    with_key = with_provider(routed_settings, "oai", url=f"{fake_openai.url}?key=abc")
    async with start_service(with_key, env={"OAI_KEY": KEY}) as svc:
        done = await svc.wait((await svc.submit("summarize", text="hello"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert "/v1/chat/completions?key=abc" in fake_openai.targets
    assert all(t.endswith("?key=abc") for t in fake_openai.targets), fake_openai.targets


async def test_openai_provider_streams_text_and_records_usage_and_provider(
    oai_service: Service, fake_openai: FakeOpenAI
) -> None:
    task = await oai_service.submit("summarize", text="The cat sat on the mat.")
    done = await oai_service.wait(task["id"])
    assert done["status"] == "succeeded", done["error"]
    assert "The cat sat on the mat." in done["result"]
    step = done["steps"][0]
    assert (step["provider"], step["model"]) == ("oai", "oai/gpt-fake")
    assert step["usage"]["prompt_tokens"] > 0
    assert step["usage"]["completion_tokens"] == len(done["result"].split())
    assert step["usage"]["finish_reason"] == "stop"
    sent = fake_openai.requests[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0 and sent["messages"][0]["role"] == "system"
    assert fake_openai.headers[-1]["authorization"] == f"Bearer {KEY}"
    events = [
        e async for e in read_events(oai_service.client, f"/api/v1/tasks/{task['id']}/events")
    ]
    streamed = "".join(e["text"] for e in events if e["event"] == "step.tokens")
    assert streamed.strip() == done["result"]


async def test_wrong_api_key_fails_clearly_and_the_key_is_never_shown(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService, tmp_path: Path
) -> None:
    wrong = "sk-wrong-9a8b7c"
    async with start_service(
        routed(settings, fake_openai, "oai/gpt-fake"), env={"OAI_KEY": wrong}
    ) as svc:
        done = await svc.wait((await svc.submit("summarize", text="hi"))["id"])
        health = (await svc.client.get("/health")).json()
    assert done["status"] == "failed"
    assert done["error"]["type"] == "provider_error" and "retryable" not in done["error"]
    assert "refused the credentials (401)" in done["error"]["message"]
    assert wrong not in json.dumps(done) and wrong not in json.dumps(health)
    assert health["providers"]["oai"]["available"] is False


async def test_a_json_schema_task_uses_response_format_and_adapts_to_json_object_servers(
    settings: Settings, start_service: StartService
) -> None:
    async with running_fake_openai(json_object_only=True) as fake:
        fake.reply = lambda body: '{"label": "billing"}'
        routes = routed(settings, fake, "oai/gpt-fake")
        async with start_service(routes, env={}) as svc:
            params = {"text": "I was charged twice", "labels": ["billing", "bug"]}
            first = await svc.wait((await svc.submit("classify", **params))["id"])
            second = await svc.wait((await svc.submit("classify", **params))["id"])
    assert (first["status"], first["result"]) == ("succeeded", "billing")
    assert (second["status"], second["result"]) == ("succeeded", "billing")
    formats = [r["response_format"] for r in fake.requests]
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["billing", "bug"]}},
        "required": ["label"],
    }
    assert formats[0] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    # Refused once; from then on the server is asked the way it understands.
    assert formats[1:] == [{"type": "json_object", "schema": schema}] * 2


async def test_an_error_in_the_middle_of_an_sse_stream_fails_the_attempt(
    oai_service: Service, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mid_stream_error = "the GPU fell over"
    done = await oai_service.wait((await oai_service.submit("summarize", text="a b c d e"))["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "provider_unavailable" and done["error"]["retryable"]
    assert "in the middle of its answer: the GPU fell over" in done["error"]["message"]


async def test_openai_embeddings_come_back_in_input_order(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService, tmp_path: Path
) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "vectors.yaml").write_text(
        "name: vectors\nmodel: oai/embed-fake\nparameters:\n  texts: {type: array}\n"
        "steps:\n  - id: v\n    kind: embed\n    input: params.texts\n"
    )
    routes = msgspec.structs.replace(
        routed(settings, fake_openai, "oai/gpt-fake"),
        templates=TemplateSettings(dirs=[str(folder)]),
    )
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        done = await svc.wait((await svc.submit("vectors", texts=["a", "bbb", "cc"]))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"] == [[1.0, 0.0], [3.0, 1.0], [2.0, 2.0]]
    assert done["steps"][0]["model"] == "oai/embed-fake"


# -- fallbacks ----------------------------------------------------------------------------------


@asynccontextmanager
async def dead_ollama_first(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> AsyncIterator[Service]:
    """A service whose ``default`` is ``ollama/llama3.2`` (where connections are refused:
    a socket bound, not listening) then the fake OpenAI server's ``oai/gpt-fake``."""
    sock = free_socket()
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        routes = with_provider(
            routed(settings, fake_openai, "ollama/llama3.2", "oai/gpt-fake"), "ollama", url=dead
        )
        async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
            yield svc
    finally:
        sock.close()


async def test_a_refused_connection_falls_back_to_the_next_entry(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    async with dead_ollama_first(settings, fake_openai, start_service) as svc:
        done = await svc.wait((await svc.submit("summarize", text="fall back"))["id"])
        models = (await svc.client.get("/api/v1/models")).json()
        url = f"/api/v1/tasks/{done['id']}/events"
        events = [e async for e in read_events(svc.client, url)]
        page = (await svc.client.get(f"/ui/tasks/{done['id']}")).text
        providers_page = (await svc.client.get("/ui/providers")).text
        # The next task skips Ollama without asking it, and says why.
        after = await svc.wait((await svc.submit("summarize", text="again"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["steps"][0]["model"] == "oai/gpt-fake"
    assert len(done["attempts"]) == 1  # no retry: the fallback happened within the call
    # The step says which entry it passed over and why, as its step.finished event does.
    [passed] = done["steps"][0]["fallbacks"]
    assert passed["route"] == "ollama/llama3.2" and "refused" in passed["reason"], passed
    [finished] = [e for e in events if e["event"] == "step.finished"]
    assert finished["fallbacks"] == [passed]
    assert "Fell back from <code>ollama/llama3.2</code> (" in page  # and the task's page
    [skipped] = after["steps"][0]["fallbacks"]
    assert skipped["route"] == "ollama/llama3.2"
    assert skipped["reason"].startswith(("failed a call before: ", "health check: "))
    default = next(m for m in models["models"] if m["name"] == "default")
    assert default["serves"] == "oai/gpt-fake"
    assert default["chain"] == ["ollama/llama3.2", "oai/gpt-fake"]
    assert list(default["unavailable"]) == ["ollama/llama3.2"]
    assert "refused" in default["unavailable"]["ollama/llama3.2"]
    assert "passed over: <code>ollama/llama3.2</code>, " in providers_page
    by_name = {p["name"]: p for p in models["providers"]}
    assert by_name["ollama"]["available"] is False and "refused" in by_name["ollama"]["detail"]
    assert by_name["oai"]["available"] is True and "gpt-fake" in by_name["oai"]["models"]
    assert by_name["oai"]["kind"] == "openai"


async def test_a_missing_model_falls_back_and_is_skipped_afterwards(
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    routes = routed(settings, fake_openai, "ollama/mistral", "oai/gpt-fake")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        for _ in range(3):
            done = await svc.wait((await svc.submit("summarize", text="x"))["id"])
            assert done["steps"][0]["model"] == "oai/gpt-fake"
            passed = [{"route": "ollama/mistral", "reason": "does not list the model"}]
            assert done["steps"][0]["fallbacks"] == passed
    # Ollama's model list (checked at startup) lacks "mistral": never asked at all.
    assert [r["model"] for r in fake_ollama.requests] == []
    assert len(fake_openai.requests) == 3


async def test_a_model_missing_everywhere_names_every_entry(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    routes = routed(settings, fake_openai, "ollama/mistral", "oai/mistral")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        with structlog.testing.capture_logs() as logged:
            done = await svc.wait((await svc.submit("summarize", text="x"))["id"])
    # The providers answer: a missing model is no provider being unavailable (a warning
    # for each call buried the real outages).
    assert not [e for e in logged if e["event"] == "provider.unavailable"], logged
    assert done["status"] == "failed"
    assert done["error"]["type"] == "model_not_found" and "retryable" not in done["error"]
    message = done["error"]["message"]
    assert "no provider could answer for 'default'" in message
    assert "ollama/mistral:" in message and "oai/mistral:" in message


async def test_a_chain_of_disabled_providers_is_shown_serving_nothing(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    """A chain whose every entry names a disabled provider serves nothing, and the models
    list and the providers page say so (they answered 500)."""
    routes = with_provider(routed(settings, fake_openai, "oai/gpt-fake"), "ollama", enabled=False)
    off = msgspec.structs.replace(routes, models={**routes.models, "off": ["ollama/llama3.2"]})
    async with start_service(off, env={"OAI_KEY": KEY}) as svc:
        models = await svc.client.get("/api/v1/models")
        page = await svc.client.get("/ui/providers")
    assert models.status_code == 200, models.text
    [out] = [m for m in models.json()["models"] if m["name"] == "off"]
    assert out == {"name": "off", "chain": ["ollama/llama3.2"], "serves": None, "unavailable": {}}
    assert page.status_code == 200, page.text
    assert "none available" in page.text


async def test_a_failing_server_is_fallen_back_from_within_the_attempt(
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    """A server that answers with an error (503: Ollama's "server busy"; a 5xx) before any
    text moves the chain on at once, as a refused connection does: the task was retried on
    it with backoff, while the next entry could have answered."""
    fake_ollama.failure = Failure(503, "server busy, please try again", times=1)
    routes = routed(settings, fake_openai, "ollama/llama3.2", "oai/gpt-fake")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        done = await svc.wait((await svc.submit("summarize", text="x"))["id"])
        # Until a health check finds it well, the failed entry is asked last.
        after = await svc.wait((await svc.submit("summarize", text="y"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert len(done["attempts"]) == 1
    assert done["steps"][0]["model"] == "oai/gpt-fake"
    [passed] = done["steps"][0]["fallbacks"]
    assert passed["route"] == "ollama/llama3.2"
    assert "answered 503" in passed["reason"] and "server busy" in passed["reason"], passed
    assert after["steps"][0]["model"] == "oai/gpt-fake"
    [skipped] = after["steps"][0]["fallbacks"]
    assert skipped["reason"].startswith("failed a call before: "), skipped
    assert len(fake_ollama.requests) == 1


async def test_an_answer_refused_by_one_entry_is_asked_of_the_next_without_marking_it(
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    """A 4xx (or an answer that cannot be read) from the first entry failed the task for
    good while the next one could answer; it is about that request, so the entry is not
    marked and the next task asks it first again."""
    routes = routed(settings, fake_openai, "ollama/llama3.2", "oai/gpt-fake")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        fake_ollama.failure = Failure(400, "option num_gpu is not supported", times=1)
        done = await svc.wait((await svc.submit("summarize", text="x"))["id"])
        after = await svc.wait((await svc.submit("summarize", text="y"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert len(done["attempts"]) == 1 and done["steps"][0]["model"] == "oai/gpt-fake"
    [passed] = done["steps"][0]["fallbacks"]
    assert "rejected the request (400)" in passed["reason"], passed
    assert after["steps"][0]["model"] == "ollama/llama3.2" and not after["steps"][0].get(
        "fallbacks"
    )


async def test_a_busy_server_without_another_entry_is_retried(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    # 503 is Ollama's "server busy": the server is there, so the task retries on it.
    fake_ollama.failure = Failure(503, "server busy, please try again", times=1)
    async with start_service(settings) as svc:
        done = await attempted(svc, "x", 2)
    assert done["status"] == "succeeded"
    assert done["steps"][0]["model"] == "ollama/llama3.2"
    assert [a["status"] for a in done["attempts"]] == ["failed", "succeeded"]
    assert "answered 503" in done["attempts"][0]["error"]["message"]


async def test_a_model_that_failed_a_call_is_asked_last_until_it_answers_or_is_checked(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    """A 5xx marks the model that failed, not its provider: the provider's other models are
    asked as before, and it stays available (one 429 or 500 flapped its gauge to 0)."""
    pair = {**settings.models, "pair": ["ollama/llama3.2", "ollama/qwen2.5"]}
    async with start_service(msgspec.structs.replace(settings, models=pair)) as svc:

        async def run() -> dict[str, Any]:
            body = {"template": "summarize", "params": {"text": "x"}, "model": "pair"}
            task = await svc.client.post("/api/v1/tasks", json=body)
            return await svc.wait(task.json()["id"])

        fake_ollama.failure = Failure(500, "model requires more system memory", times=1)
        first = await run()
        models = (await svc.client.get("/api/v1/models")).json()
        providers = models["providers"]
        second = await run()  # the failed model is asked last
        await svc.client.get("/api/v1/models", params={"check": "now"})
        third = await run()  # a good health check clears the mark
    assert first["steps"][0]["model"] == "ollama/qwen2.5"
    [ollama] = [p for p in providers if p["name"] == "ollama"]
    assert ollama["available"] is True, ollama
    # The chain says which entry is passed over and why, while its provider shows ok.
    why = f"failed a call before: Ollama at {fake_ollama.url} answered 500: "
    [pair_out] = [m for m in models["models"] if m["name"] == "pair"]
    assert pair_out == {
        "name": "pair",
        "chain": ["ollama/llama3.2", "ollama/qwen2.5"],
        "serves": "ollama/qwen2.5",
        "unavailable": {"ollama/llama3.2": why + "model requires more system memory"},
    }
    assert second["steps"][0]["model"] == "ollama/qwen2.5"
    [skipped] = second["steps"][0]["fallbacks"]
    assert skipped == {
        "route": "ollama/llama3.2",
        "reason": f"failed a call before: Ollama at {fake_ollama.url} answered 500: "
        "model requires more system memory",
    }
    assert third["steps"][0]["model"] == "ollama/llama3.2"
    assert not third["steps"][0].get("fallbacks")


async def test_an_answer_cut_off_after_its_text_began_is_not_continued_by_another_model(
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    """Two words streamed, then the server fails: the next entry is not asked in the same
    attempt (the step's live text would run on into its answer); the retry asks it first."""
    fake_ollama.mid_stream_error = "CUDA error: out of memory"
    routes = routed(settings, fake_openai, "ollama/llama3.2", "oai/gpt-fake")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        done = await attempted(svc, "a b c d", 2)
    assert done["status"] == "succeeded", done["error"]
    first, second = done["attempts"]
    assert first["status"] == "failed" and "out of memory" in first["error"]["message"]
    assert second["status"] == "succeeded"
    assert done["steps"][0]["model"] == "oai/gpt-fake"
    [passed] = done["steps"][0]["fallbacks"]
    assert passed["reason"].startswith("failed a call before: "), passed
    assert len(fake_ollama.requests) == 1 and len(fake_openai.requests) == 1


async def test_every_entry_busy_waits_the_shortest_retry_after(
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    routes = routed(settings, fake_openai, "ollama/llama3.2", "oai/gpt-fake")
    async with start_service(routes, env={"OAI_KEY": KEY}) as svc:
        # Set after the start's health checks, which would spend them.
        fake_ollama.failure = Failure(429, "slow down", times=1, headers={"Retry-After": "20"})
        fake_openai.failure = Failure(503, "overloaded", times=1, headers={"Retry-After": "1"})
        done = await attempted(svc, "x", 2)
    assert done["status"] == "succeeded", done["error"]
    first, second = done["attempts"]
    error = first["error"]
    assert error["type"] == "provider_unavailable" and error.get("retryable") is True, error
    assert "ollama/llama3.2:" in error["message"] and "oai/gpt-fake:" in error["message"]
    waited = datetime.fromisoformat(second["started_at"]) - datetime.fromisoformat(
        first["finished_at"]
    )
    # The shortest wait (1 s), not 20 s. It counts from when the retry was decided, a little
    # before the attempt's finished_at was written (0.989 s here once, on PostgreSQL).
    assert 0.8 <= waited.total_seconds() < 15.0, waited


async def test_an_entry_that_never_answered_does_not_hurry_the_retry(
    settings: Settings, fake_openai: FakeOpenAI, start_service: StartService
) -> None:
    """A chain of an Ollama that is not there (refused, never answered: not installed) and a
    server that asks for 30 s: the retry came after the policy's second, the refused entry's
    "no wait" taken as the shortest, and the task's attempts were spent in seconds (on a
    laptop without Ollama, the default chain with the embedded model down after crashes)."""
    async with dead_ollama_first(settings, fake_openai, start_service) as svc:
        fake_openai.failure = Failure(503, "overloaded", headers={"Retry-After": "30"})
        task = await svc.submit("summarize", text="x")

        async def retrying() -> bool:
            got = (await svc.client.get(f"/api/v1/tasks/{task['id']}")).json()
            return bool(got["status"] == "queued" and got["attempts"])

        await wait_until(retrying, timeout=20)
        got = (await svc.client.get(f"/api/v1/tasks/{task['id']}")).json()
    failed = datetime.fromisoformat(got["attempts"][0]["finished_at"])
    waits = datetime.fromisoformat(got["next_run_at"]) - failed
    assert waits.total_seconds() >= 25, (waits, got["attempts"][0]["error"])


async def test_a_plain_model_name_goes_to_the_first_server(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    async with start_service(settings) as svc:
        response = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "x"}, "model": "qwen2.5"},
        )
        done = await svc.wait(response.json()["id"])
    assert done["steps"][0]["model"] == "ollama/qwen2.5"
    assert fake_ollama.requests[-1]["model"] == "qwen2.5"


async def test_provider_max_concurrency_bounds_calls_in_flight(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 0.2
    limited = with_provider(settings, "ollama", max_concurrency=1)
    async with start_service(limited) as svc:
        ids = [(await svc.submit("summarize", text=f"t{i}"))["id"] for i in range(4)]
        done = [await svc.wait(i) for i in ids]
    assert all(t["status"] == "succeeded" for t in done)
    assert fake_ollama.max_in_flight == 1


async def test_a_logical_name_can_limit_its_tasks(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 0.2
    models: dict[str, Any] = {
        **settings.models,
        "default": ModelSettings(chain=["ollama/llama3.2"], max_concurrency=2),
    }
    async with start_service(msgspec.structs.replace(settings, models=models)) as svc:
        ids = [(await svc.submit("summarize", text=f"t{i}"))["id"] for i in range(5)]
        await wait_until(lambda: fake_ollama.in_flight == 2, timeout=5)
        running = (await svc.client.get("/api/v1/tasks", params={"status": "running"})).json()
        assert len(running["items"]) <= 2
        done = [await svc.wait(i) for i in ids]
    assert all(t["status"] == "succeeded" for t in done)
    assert fake_ollama.max_in_flight == 2


async def test_ollama_gets_think_and_keep_alive(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService, tmp_path: Path
) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "ponder.yaml").write_text(
        "name: ponder\nmodel: default\nsteps:\n  - id: a\n    prompt: why?\n    think: true\n"
    )
    configured = msgspec.structs.replace(
        with_provider(settings, "ollama", keep_alive="10m"),
        templates=TemplateSettings(dirs=[str(folder)]),
    )
    async with start_service(configured) as svc:
        done = await svc.wait((await svc.submit("ponder"))["id"])
        bad = await svc.client.post(
            "/api/v1/templates/validate",
            content="name: x\nsteps:\n  - id: a\n    prompt: hi\n    think: maybe\n",
        )
    assert done["status"] == "succeeded"
    sent = fake_ollama.requests[-1]
    assert (sent["think"], sent["keep_alive"]) == (True, "10m")
    problem = bad.json()["errors"][0]
    assert (problem["line"], problem["path"]) == (5, "steps[0].think")
    assert "true or false" in problem["message"]


async def test_provider_max_tokens_caps_answers_unless_the_step_says(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    async with start_service(with_provider(settings, "ollama", max_tokens=7)) as svc:
        await svc.wait((await svc.submit("summarize", text="x"))["id"])
        capped = fake_ollama.requests[-1]["options"]
        response = await svc.client.post(
            "/api/v1/templates",
            content="name: long\nmodel: default\nsteps:\n  - id: a\n    prompt: go\n"
            "    options: {num_predict: 900}\n",
        )
        assert response.status_code == 201
        await svc.wait((await svc.submit("long"))["id"])
        own = fake_ollama.requests[-1]["options"]
    assert capped == {"temperature": 0, "num_predict": 7}
    assert own == {"num_predict": 900}


async def test_a_stop_written_as_one_string_reaches_ollama_as_a_list(
    fake_ollama: FakeOllama, service: Service
) -> None:
    """``options: {stop: "END"}`` is valid (OpenAI takes a string), but Ollama refuses a
    ``stop`` that is no array: every run of such a template failed there."""
    response = await service.client.post(
        "/api/v1/templates",
        content="name: halt\nmodel: default\nsteps:\n  - id: a\n    prompt: go\n"
        '    options: {stop: "END", temperature: 0}\n',
    )
    assert response.status_code == 201, response.text
    done = await service.wait((await service.submit("halt"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert fake_ollama.requests[-1]["options"] == {"stop": ["END"], "temperature": 0}


# -- replies holding characters that str.splitlines() takes for line ends ---------------------

#: JSON leaves these unescaped (msgspec, llama.cpp's server), and httpx's iter_lines split a
#: streamed JSON line at each of them: the model call failed on a reply that was whole.
LOOKALIKES = "one\u2028two\u2029three\x85four\x1cfive"


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_reply_holding_unicode_line_separators_arrives_whole(
    kind: str,
    settings: Settings,
    fake_ollama: FakeOllama,
    fake_openai: FakeOpenAI,
    start_service: StartService,
) -> None:
    from orchestra.client import AsyncClient

    fake_ollama.reply = fake_openai.reply = lambda _request: LOOKALIKES
    chosen = routed(settings, fake_openai, "oai/gpt-fake") if kind == "openai" else settings
    async with start_service(chosen, env={"OAI_KEY": KEY}) as svc:
        task = await svc.submit("summarize", text="anything")
        done = await svc.wait(task["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["result"] == LOOKALIKES
        # The service's own event stream, read by its client, carries it whole too.
        async with AsyncClient(str(svc.client.base_url)) as client:
            streamed = [
                e.data["text"]
                async for e in client.task_events(task["id"])
                if e.type == "step.tokens"
            ]
        assert "".join(streamed).strip() == LOOKALIKES
