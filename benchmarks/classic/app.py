"""The classic stack doing Orchestra's job: FastAPI for the API, Celery workers, Redis as broker
and result backend. It runs the same template text (templates/summarize.yaml, rendered with
Jinja) against the same fake model, so the two are compared on the same work.

    uvicorn app:api --port P          (REDIS_URL and MODEL_URL in the environment)
    celery -A app worker --pool prefork -c 2

Its API mirrors the part of Orchestra's the benchmarks use: `POST /api/v1/tasks` and
`GET /api/v1/tasks/{id}?wait=S`, which answers as soon as the task has finished, or after S
seconds with what it is then.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import jinja2
import redis.asyncio as aioredis
import yaml
from celery import Celery
from fastapi import FastAPI, HTTPException, Query

REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
MODEL = os.environ.get("MODEL_URL", "http://127.0.0.1:11434")
TEMPLATE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "templates" / "summarize.yaml").read_text()
)
STEP = TEMPLATE["steps"][0]
ENV = jinja2.Environment(autoescape=False)
SYSTEM = ENV.from_string(STEP["system"])
PROMPT = ENV.from_string(STEP["prompt"])

celery = Celery("classic", broker=f"{REDIS}/0", backend=f"{REDIS}/1")
celery.conf.update(task_acks_late=True, worker_hijack_root_logger=False, result_expires=None)
_client: httpx.Client | None = None


@celery.task(name="summarize")
def summarize(params: dict[str, Any]) -> str:
    """Render the prompt, ask the model, return its answer."""
    global _client
    if _client is None:
        _client = httpx.Client(base_url=MODEL, timeout=300)
    scope = {"params": params}
    body = {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": SYSTEM.render(scope)},
            {"role": "user", "content": PROMPT.render(scope)},
        ],
        "stream": False,
        "options": STEP.get("options", {}),
    }
    reply = _client.post("/api/chat", json=body)
    reply.raise_for_status()
    return str(reply.json()["message"]["content"]).strip()


#: Celery's Redis backend stores a result under this prefix and the task id, and publishes it
#: on a channel of the same name as it stores it.
RESULT_KEY = "celery-task-meta-"
#: The longest ``wait`` a read takes, as Orchestra's.
MAX_WAIT = 60.0


class Results:
    """Celery's stored results, read without blocking the event loop, and waited for the way
    Orchestra's reads wait: one subscriber to the channels results are published on wakes
    every reader waiting for that task (as Celery's own `AsyncResult.get` is woken, but
    without a thread per waiting request)."""

    def __init__(self, url: str) -> None:
        self.redis = aioredis.from_url(url)
        self.waiting: dict[str, set[asyncio.Future[bytes]]] = {}

    async def listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Hand each published result to the readers waiting for it."""
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            task_id = message["channel"].decode().removeprefix(RESULT_KEY)
            for future in self.waiting.get(task_id, ()):
                if not future.done():
                    future.set_result(message["data"])

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Subscribed before the first request, listening until the app stops."""
        pubsub = self.redis.pubsub()
        await pubsub.psubscribe(f"{RESULT_KEY}*")
        listener = asyncio.create_task(self.listen(pubsub))
        try:
            yield
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await pubsub.aclose()
            await self.redis.aclose()

    async def read(self, task_id: str, wait: float) -> dict[str, Any] | None:
        """The task's stored result (Celery's meta: status, result, …), None while it has none;
        with ``wait`` > 0, answer as soon as it has one or after ``wait`` seconds."""
        future = asyncio.get_running_loop().create_future()
        waiting = self.waiting.setdefault(task_id, set())
        waiting.add(future)
        try:
            stored = await self.redis.get(f"{RESULT_KEY}{task_id}")
            if stored is None and wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        stored = await future
                except TimeoutError:
                    pass
        finally:
            waiting.discard(future)
            if not waiting:
                del self.waiting[task_id]
        return None if stored is None else dict(json.loads(stored))


results = Results(f"{REDIS}/1")


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    async with results.running():
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/api/v1/tasks", status_code=201)
def submit(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("template") != "summarize":
        raise HTTPException(404, "unknown template")
    params = {"sentences": 3, "style": "paragraph", **body.get("params", {})}
    if not isinstance(params.get("text"), str):
        raise HTTPException(422, "params.text is required")
    task = summarize.delay(params)
    return {"id": task.id, "status": "queued"}


@api.get("/api/v1/tasks/{task_id}")
async def get(
    task_id: str, wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0
) -> dict[str, Any]:
    """The task's status (Celery's, in lower case: pending until it has a result) and
    result; with ``wait``, answers as soon as it has finished."""
    meta = await results.read(task_id, wait)
    if meta is None:
        return {"id": task_id, "status": "pending", "result": None}
    return {"id": task_id, "status": str(meta["status"]).lower(), "result": meta["result"]}
