"""The cache of model answers: a repeated deterministic call skips the model (counted by the
fake model server on loopback), expires, keeps to its size cap, and obeys ``cache:`` on steps
and tasks; cached answers still pass format validation. Both engines."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar, get

from orchestra.config import CacheSettings, Settings, TemplateSettings
from orchestra.db import Database
from orchestra.db.cache import CacheStore
from orchestra.llm.base import ChatMessage, ChatRequest
from orchestra.llm.cache import AnswerCache, applies
from orchestra.llm.ollama import OllamaProvider
from tests.conftest import Service, StartService, sql_rows
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.logs import captured, events
from tests.fixtures.servers import serve
from tests.fixtures.sse import read_events

TEMPLATES = {
    "det": """\
name: det
model: llama3.2
parameters:
  q: {type: string, required: true}
steps:
  - id: answer
    prompt: "Q: {{ params.q }}"
    options: {temperature: 0, num_ctx: 4096}
""",
    "det_wider": """\
name: det_wider
model: llama3.2
parameters:
  q: {type: string, required: true}
steps:
  - id: answer
    prompt: "Q: {{ params.q }}"
    options: {temperature: 0, num_ctx: 8192}
""",
    "det_nocache": """\
name: det_nocache
model: llama3.2
parameters:
  q: {type: string, required: true}
steps:
  - id: answer
    prompt: "Q: {{ params.q }}"
    options: {temperature: 0}
    cache: false
""",
    "warm": """\
name: warm
model: llama3.2
parameters:
  q: {type: string, required: true}
steps:
  - id: answer
    prompt: "Q: {{ params.q }}"
    options: {temperature: 0.8}
""",
    "person": """\
name: person
model: llama3.2
parameters:
  text: {type: string, required: true}
steps:
  - id: person
    prompt: "Who is in: {{ params.text }}"
    options: {seed: 42}
    format:
      type: object
      properties: {name: {type: string}, age: {type: integer}}
      required: [name, age]
    repair_attempts: 1
""",
}


def chats(fake: FakeOllama) -> list[dict[str, Any]]:
    """The chat requests the fake model server received."""
    return [r for r in fake.requests if "messages" in r]


def with_templates(settings: Settings, folder: Path, cache: CacheSettings) -> Settings:
    folder.mkdir()
    for name, text in TEMPLATES.items():
        (folder / f"{name}.yaml").write_text(text)
    return msgspec.structs.replace(
        settings, templates=TemplateSettings(dirs=[str(folder)]), cache=cache
    )


@pytest.fixture
async def svc(
    settings: Settings, tmp_path: Path, start_service: StartService
) -> AsyncIterator[Service]:
    enabled = with_templates(settings, tmp_path / "templates", CacheSettings(enabled=True))
    async with start_service(enabled) as service:
        yield service


async def submit(svc: Service, template: str, **body: Any) -> dict[str, Any]:
    response = await svc.client.post("/api/v1/tasks", json={"template": template, **body})
    assert response.status_code == 201, response.text
    done = await svc.wait(response.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    return done


def cache_samples(text: str) -> dict[str, float]:
    found = re.findall(
        r'^orchestra_model_cache_requests_total\{result="(\w+)"\} (\S+)$', text, re.M
    )
    return {result: float(value) for result, value in found}


async def test_a_repeated_deterministic_task_is_answered_from_the_cache(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    before = cache_samples((await svc.client.get("/metrics")).text)
    first = await submit(svc, "det", params={"q": "sky"})
    second = await submit(svc, "det", params={"q": "sky"})
    assert len(chats(fake_ollama)) == 1  # the second never reached the model
    assert second["result"] == first["result"] == "ECHO: Q: sky"
    assert "cached" not in first["steps"][0]["usage"]
    usage = second["steps"][0]["usage"]
    assert usage["cached"] is True
    assert usage["completion_tokens"] == first["steps"][0]["usage"]["completion_tokens"]
    assert "total_ms" not in usage  # no model time was spent
    assert second["steps"][0]["model"] == first["steps"][0]["model"]
    after = cache_samples((await svc.client.get("/metrics")).text)
    assert after["hit"] - before.get("hit", 0) == 1
    assert after["miss"] - before.get("miss", 0) == 1


async def test_a_fallbacks_answer_is_not_kept_under_the_first_entrys_key(
    settings: Settings, tmp_path: Path, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    """Two models of one provider in a chain: the first failed (500), the second answered,
    and its answer was kept under the first's key, so the first was never asked again while
    it lasted."""
    enabled = with_templates(settings, tmp_path / "templates", CacheSettings(enabled=True))
    chain = {**enabled.models, "pair": ["ollama/llama3.2", "ollama/qwen2.5"]}
    async with start_service(msgspec.structs.replace(enabled, models=chain)) as service:
        fake_ollama.failure = Failure(500, "model requires more system memory", times=1)
        first = await submit(service, "det", params={"q": "sky"}, model="pair")
        # A good health check clears the first entry's mark: it is first again.
        await service.client.get("/api/v1/models", params={"check": "now"})
        second = await submit(service, "det", params={"q": "sky"}, model="pair")
        third = await submit(service, "det", params={"q": "sky"}, model="pair")
    assert first["steps"][0]["model"] == "ollama/qwen2.5"
    assert second["steps"][0]["model"] == "ollama/llama3.2"  # asked, not the cache
    assert "cached" not in second["steps"][0]["usage"]
    assert third["steps"][0]["usage"]["cached"] is True  # its own answer is kept
    assert [r["model"] for r in chats(fake_ollama)] == ["llama3.2", "qwen2.5", "llama3.2"]


async def test_with_the_cache_off_every_call_reaches_the_model(
    settings: Settings, tmp_path: Path, start_service: StartService, fake_ollama: FakeOllama
) -> None:
    assert Settings().cache.enabled  # on unless [cache] enabled = false
    off_settings = with_templates(settings, tmp_path / "t", CacheSettings(enabled=False))
    async with start_service(off_settings) as off:
        for _ in range(2):
            done = await submit(off, "det", params={"q": "sky"}, cache=True)
            assert "cached" not in done["steps"][0]["usage"]
    assert len(chats(fake_ollama)) == 2
    assert sql_rows(settings.database.url, "SELECT count(*) FROM model_cache") == [(0,)]


async def test_a_changed_option_or_prompt_misses(svc: Service, fake_ollama: FakeOllama) -> None:
    await submit(svc, "det", params={"q": "sky"})
    await submit(svc, "det_wider", params={"q": "sky"})  # num_ctx 8192, not 4096
    await submit(svc, "det", params={"q": "sea"})
    assert [r["options"].get("num_ctx") for r in chats(fake_ollama)] == [4096, 8192, 4096]
    await submit(svc, "det_wider", params={"q": "sky"})
    assert len(chats(fake_ollama)) == 3


async def test_a_hit_streams_its_answer_to_followers_in_one_piece(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    await submit(svc, "det", params={"q": "a b c d"})
    done = await submit(svc, "det", params={"q": "a b c d"})
    events = [e async for e in read_events(svc.client, f"/api/v1/tasks/{done['id']}/events")]
    pieces = [e for e in events if e["event"] == "step.tokens"]
    assert [p["text"] for p in pieces] == ["ECHO: Q: a b c d"]
    assert len(chats(fake_ollama)) == 1


async def test_cache_false_on_a_step_bypasses_it(svc: Service, fake_ollama: FakeOllama) -> None:
    for _ in range(2):
        done = await submit(svc, "det_nocache", params={"q": "sky"})
        assert "cached" not in done["steps"][0]["usage"]
    assert len(chats(fake_ollama)) == 2


async def test_a_task_says_cache_true_for_a_warm_call_and_false_for_a_cold_one(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    await submit(svc, "warm", params={"q": "sky"})
    await submit(svc, "warm", params={"q": "sky"})
    assert len(chats(fake_ollama)) == 2  # temperature 0.8: not cached by itself
    await submit(svc, "warm", params={"q": "sky"}, cache=True)
    hit = await submit(svc, "warm", params={"q": "sky"}, cache=True)
    assert len(chats(fake_ollama)) == 3
    assert hit["steps"][0]["usage"]["cached"] is True
    await submit(svc, "det", params={"q": "sky"})
    fresh = await submit(svc, "det", params={"q": "sky"}, cache=False)
    assert len(chats(fake_ollama)) == 5
    assert "cached" not in fresh["steps"][0]["usage"]


async def test_a_cached_answer_still_passes_format_validation(
    svc: Service, fake_ollama: FakeOllama, db_url: str
) -> None:
    replies = iter(['{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 37}'])
    fake_ollama.reply = lambda _req: next(replies)
    first = await submit(svc, "person", params={"text": "Ada, 36"})
    second = await submit(svc, "person", params={"text": "Ada, 36"})
    assert first["result"] == second["result"] == {"name": "Ada", "age": 36}
    assert second["steps"][0]["usage"]["cached"] is True
    assert len(chats(fake_ollama)) == 1
    # A stored answer that no longer fits the schema is checked like a fresh one: the step
    # shows it to the model and asks for a repair.
    broken = msgspec.json.encode(
        {"text": '{"name": "Ada"}', "model": "llama3.2", "provider": "ollama"}
    ).decode()
    sql_rows(db_url, "UPDATE model_cache SET answer = ?", (broken,))
    third = await submit(svc, "person", params={"text": "Ada, 36"})
    assert third["result"] == {"name": "Ada", "age": 37}
    [_, repair] = chats(fake_ollama)
    assert repair["messages"][-2] == {"role": "assistant", "content": '{"name": "Ada"}'}
    assert "'age' is a required property" in repair["messages"][-1]["content"]


async def test_bad_cache_values_are_refused_with_the_field_named(svc: Service) -> None:
    response = await svc.client.post(
        "/api/v1/tasks", json={"template": "det", "params": {"q": "x"}, "cache": "yes"}
    )
    assert response.status_code == 400, response.text
    assert "cache" in response.text
    text = TEMPLATES["det"].replace("num_ctx: 4096}", "num_ctx: 4096}\n    cache: maybe")
    checked = await svc.client.post("/api/v1/templates/validate", content=text)
    assert "cache must be true or false" in checked.text, checked.text


# -- the cache itself, with an injected clock --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def ollama(fake_ollama: FakeOllama) -> AsyncIterator[OllamaProvider]:
    async with httpx.AsyncClient() as client:
        yield OllamaProvider("ollama", client, fake_ollama.url, timeout=10)


def ask(text: str, **options: Any) -> ChatRequest:
    return ChatRequest(
        model="llama3.2",
        messages=(ChatMessage("user", text),),
        options={"temperature": 0, **options},
    )


async def test_entries_expire_after_the_ttl(
    db: Database, ollama: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    clock = Clock()
    cache = AnswerCache(CacheStore(db), CacheSettings(enabled=True, ttl=60), clock=clock)
    await cache.chat(ollama, ask("hello"))
    clock.now += timedelta(seconds=59)
    assert (await cache.chat(ollama, ask("hello"))).usage.cached
    assert len(fake_ollama.requests) == 1
    clock.now += timedelta(seconds=2)  # 61 s after it was stored
    fresh = await cache.chat(ollama, ask("hello"))
    assert not fresh.usage.cached
    assert len(fake_ollama.requests) == 2


async def test_the_size_cap_deletes_the_oldest_answers(
    db: Database, ollama: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    clock = Clock()
    store = CacheStore(db)
    settings = CacheSettings(enabled=True, max_entries=3)
    cache = AnswerCache(store, settings, clock=clock, evict_every=1)
    for n in range(6):
        clock.now += timedelta(seconds=1)
        await cache.chat(ollama, ask(f"call {n}"))
    assert await store.count() == 3
    assert (await cache.chat(ollama, ask("call 5"))).usage.cached
    assert len(fake_ollama.requests) == 6
    assert not (await cache.chat(ollama, ask("call 0"))).usage.cached  # evicted
    assert len(fake_ollama.requests) == 7


async def test_eviction_runs_every_so_many_writes_not_in_each(
    db: Database, ollama: OllamaProvider
) -> None:
    """A write is one insert; every ``evict_every`` writes (and at the first, and a minute
    after the last eviction), the table is brought back to its cap (that walks the cap's worth
    of the index, too slow for every write)."""
    clock = Clock()
    store = CacheStore(db)
    cache = AnswerCache(
        store, CacheSettings(enabled=True, max_entries=2), clock=clock, evict_every=4
    )
    counts = []
    for n in range(8):
        clock.now += timedelta(seconds=1)
        await cache.chat(ollama, ask(f"call {n}"))
        counts.append(await store.count())
    assert counts == [1, 2, 3, 4, 2, 3, 4, 5]  # the first write evicts too (nothing, here)
    # What came since the last eviction stays, until the next one.
    assert (await cache.chat(ollama, ask("call 7"))).usage.cached
    assert (await cache.chat(ollama, ask("call 6"))).usage.cached
    clock.now += timedelta(seconds=60)  # a minute after the last eviction: the next write evicts
    await cache.chat(ollama, ask("call 8"))
    assert await store.count() == 2


async def test_concurrent_writers_of_one_answer_both_succeed(
    db: Database, ollama: OllamaProvider
) -> None:
    import asyncio

    store = CacheStore(db)
    cache = AnswerCache(store, CacheSettings(enabled=True))
    results = await asyncio.gather(*(cache.chat(ollama, ask("same")) for _ in range(4)))
    assert {r.text for r in results} == {"ECHO: same"}
    assert await store.count() == 1


def test_which_calls_go_through_the_cache() -> None:
    assert applies({"temperature": 0}, None, None)
    assert applies({"seed": 1, "temperature": 0.9}, None, None)
    assert not applies({"temperature": 0.2}, None, None)
    assert not applies({}, None, None)
    assert applies({}, True, None) and applies({}, None, True)
    assert not applies({"temperature": 0}, False, None)
    assert not applies({"temperature": 0}, True, False)  # the task's false wins


async def test_an_ollama_model_pulled_again_is_another_model(db: Database) -> None:
    digests = {"llama3.2:latest": "sha256:aaa"}

    @get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [{"name": n, "digest": d} for n, d in digests.items()]}

    @get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": "0.9.0"}

    async with serve(Litestar([tags, version])) as url, httpx.AsyncClient() as client:
        provider = OllamaProvider("ollama", client, url, timeout=5)
        cache = AnswerCache(CacheStore(db), CacheSettings(enabled=True))
        before = await cache.key(provider, ask("hi"))
        assert before is not None and before.digest == "sha256:aaa"
        digests["llama3.2:latest"] = "sha256:bbb"
        await provider.health()  # the health checks read the listing again
        after = await cache.key(provider, ask("hi"))
        assert after is not None and after.digest == "sha256:bbb"
        assert before.hashed() != after.hashed()
        assert (await cache.key(provider, ask("hi"))) == after


async def test_a_cache_that_fails_is_logged_with_the_task_it_failed_for(
    svc: Service, db_url: str
) -> None:
    """The step is answered by the model; the lines saying that the cache failed carried no
    task_id, so an operator could not tell which task paid for it."""
    sql_rows(db_url, "DROP TABLE model_cache")  # every read and write of the cache fails
    with captured(logging.WARNING) as logged:
        done = await submit(svc, "det", params={"q": "sky"})
    failed = events(logged, "cache.read_failed") + events(logged, "cache.write_failed")
    assert {e["event"] for e in failed} == {"cache.read_failed", "cache.write_failed"}, logged
    assert {e.get("task_id") for e in failed} == {done["id"]}, failed
