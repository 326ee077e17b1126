"""The classic stack doing Orchestra's job: FastAPI for the API, Celery workers, Redis as broker
and result backend. It runs the same template text (templates/summarize.yaml, rendered with
Jinja) against the same fake model, so the two are compared on the same work.

    uvicorn app:api --port P          (REDIS_URL and MODEL_URL in the environment)
    celery -A app worker --pool prefork -c 2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import jinja2
import yaml
from celery import Celery
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException

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


api = FastAPI()


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
def get(task_id: str) -> dict[str, Any]:
    result = AsyncResult(task_id, app=celery)
    return {"id": task_id, "status": result.status.lower(), "result": result.result}
