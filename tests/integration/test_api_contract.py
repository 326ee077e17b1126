"""What an API-contract review found: answers and an OpenAPI document that said less than, or
other than, what the service does (HEAD, operation ids, response schemas, a body's BOM, the
error body under /schema)."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from tests.conftest import Service


async def _document(service: Service) -> dict:
    answer = await service.client.get("/schema/openapi.json")
    assert answer.status_code == 200
    document: dict = answer.json()
    return document


async def test_the_models_check_says_what_it_checks(service: Service) -> None:
    """``GET /api/v1/models?check=now`` checks the providers only (the database is /health's)."""
    document = await _document(service)
    models = document["paths"]["/api/v1/models"]["get"]["parameters"]
    check = next(p for p in models if p["name"] == "check")
    assert "provider" in check["description"] and "database" not in check["description"]
    health = document["paths"]["/health"]["get"]["parameters"]
    assert "database" in next(p for p in health if p["name"] == "check")["description"]


async def test_a_json_body_may_begin_with_a_byte_order_mark(service: Service) -> None:
    """RFC 8259 lets a reader ignore a UTF-8 BOM (some Windows tools write one): it was a 400
    "JSON is malformed: invalid character (byte 0)"."""
    bom = b"\xef\xbb\xbf"
    task = b'{"template": "summarize", "params": {"text": "Queues."}}'
    submitted = await service.client.post("/api/v1/tasks", content=bom + task)
    assert submitted.status_code == 201, submitted.text
    schedule = b'{"name": "s", "template": "summarize", "params": {"text": "x"}, "every": "1h"}'
    made = await service.client.post("/api/v1/schedules", content=bom + schedule)
    assert made.status_code == 201, made.text
    changed = await service.client.patch("/api/v1/schedules/s", content=bom + b'{"every": "2h"}')
    assert changed.status_code == 200, changed.text
    # Only a BOM is left out: anything else before the JSON is still malformed.
    refused = await service.client.post("/api/v1/tasks", content=b"\xef\xbb" + task)
    assert refused.status_code == 400, refused.text


async def test_an_unknown_path_under_schema_is_the_json_404(service: Service) -> None:
    """Errors always have the JSON body: under /schema, Litestar answered an HTML page."""
    for path in ("/schema/redoc", "/schema/nope", "/schema/nope.json", "/schema/static/nope.js"):
        answer = await service.client.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("application/json"), path
        body = answer.json()
        assert (body["status"], body["code"]) == (404, "not_found"), (path, body)
    for path in ("/schema", "/schema/", "/schema/swagger"):  # the page itself stays
        page = await service.client.get(path)
        assert page.status_code == 200 and "swagger-ui" in page.text, path


async def test_every_operation_that_takes_a_body_declares_413(service: Service) -> None:
    """A body over ``[limits] max_body_bytes`` is a 413 wherever a body is read."""
    document = await _document(service)
    taking = [
        (method, path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if "requestBody" in operation
    ]
    assert len(taking) >= 7
    for method, path in taking:
        assert "413" in document["paths"][path][method]["responses"], (method, path)
    # The body is read (and refused) before the subscription is looked up.
    limit = service.app.runtime.settings.limits.max_body_bytes
    huge = b'{"url": "https://example.com/' + b"x" * limit + b'"}'
    refused = await service.client.patch("/api/v1/webhooks/1", content=huge)
    assert refused.status_code == 413, refused.text


async def test_every_get_answers_head_as_its_get_without_the_body(service: Service) -> None:
    """HTTP says a resource that answers GET answers HEAD: every GET of the document, and the
    document itself, answered 405. An event stream answers its headers and ends (it would
    not end as a GET)."""
    done = await service.wait((await service.submit("summarize", text="Queues."))["id"])
    waiting = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "x"}, "delay": 3600}
    )
    batch = await service.client.post(
        "/api/v1/batches",
        params={"template": "summarize", "format": "csv"},
        content=b"text\nx\n",
    )
    assert waiting.status_code == batch.status_code == 201, (waiting.text, batch.text)
    values = {
        "task_id": str(done["id"]),
        "name": "summarize",
        "ref": "nope",
        "webhook_id": "1",
        "batch_id": str(batch.json()["batch"]["id"]),
    }
    document = await _document(service)
    asked = ["/schema/openapi.json", "/schema/openapi.yaml", "/schema/swagger"]
    streams = [f"/api/v1/tasks/{waiting.json()['id']}/events"]
    for path, item in document["paths"].items():
        if "get" not in item:
            continue
        url = path.format(**values)
        content = item["get"]["responses"]["200"].get("content", {})
        (streams if "text/event-stream" in content else asked).append(url)
    assert len(asked) >= 17 and len(streams) == 3, (asked, streams)
    for url in asked:
        got = await service.client.get(url)
        head = await service.client.head(url)
        assert (head.status_code, head.content) == (got.status_code, b""), url
        for name in ("content-type", "content-length"):
            assert head.headers.get(name) == got.headers.get(name), (url, name)
    for url in streams:  # headers, then the end, however long the stream would run
        async with asyncio.timeout(10):
            head = await service.client.head(url)
        assert (head.status_code, head.content) == (200, b""), url
        assert head.headers["content-type"].startswith("text/event-stream"), url
    missing = await service.client.head("/api/v1/tasks/424242")
    assert (missing.status_code, missing.content) == (404, b"")


async def test_every_operation_has_a_meaningful_unique_camel_case_id(service: Service) -> None:
    """Code generators name their methods after operationId: it was Litestar's path string
    (``ApiV1TasksTaskIdCancelCancel``)."""
    document = await _document(service)
    ids = {
        (method, path): operation["operationId"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert len(set(ids.values())) == len(ids)
    for where, name in ids.items():
        assert re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", name), (where, name)
        assert not name.startswith("api"), (where, name)
    assert ids["post", "/api/v1/tasks"] == "submitTask"
    assert ids["get", "/api/v1/tasks/{task_id}"] == "getTask"
    assert ids["post", "/api/v1/tasks/{task_id}/cancel"] == "cancelTask"
    assert ids["get", "/health"] == "getHealth"
    redeliver = "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
    assert ids["post", redeliver] == "redeliverWebhookDelivery"
    linked = [
        link["operationId"]
        for item in document["paths"].values()
        for operation in item.values()
        for answer in operation["responses"].values()
        for link in answer.get("links", {}).values()
    ]
    assert len(linked) >= 7 and set(linked) <= set(ids.values())


def _time(value: object) -> bool:
    """RFC 3339's date-time: a date, ``T``, a time and an offset (``Z``)."""
    if not isinstance(value, str):
        return True
    moment = datetime.fromisoformat(value)
    return "T" in value and moment.tzinfo is not None


def _answers_as_declared(document: dict, path: str, body: Any, status: str = "200") -> None:
    """``body`` fits the schema ``document`` declares for ``path``'s GET answer (formats too)."""
    operation = document["paths"][path]["get"]
    schema = operation["responses"][status]["content"]["application/json"]["schema"]
    checker = FormatChecker()
    checker.checks("date-time", raises=ValueError)(_time)
    root = {**schema, "components": document["components"]}
    Draft202012Validator(root, format_checker=checker).validate(body)


async def test_the_answers_schemas_say_their_times_and_words(service: Service) -> None:
    """For code generators: times are ``format: date-time``, a field of a few words has their
    ``enum``, a subscription's event types are ``EventType``'s, the two attempts have names
    of their own, and a page's ``next_cursor`` is required (it is always sent)."""
    document = await _document(service)
    schemas = document["components"]["schemas"]

    def field(component: str, name: str) -> dict:
        found: dict = schemas[component]["properties"][name]
        return next((a for a in found.get("oneOf", ()) if a.get("type") == "string"), found)

    times = {
        "TaskOut": ("created_at", "started_at", "finished_at", "next_run_at"),
        "StepOut": ("started_at", "finished_at"),
        "BatchOut": ("created_at", "loaded_at", "cancelled_at"),
        "ScheduleOut": ("next_fire_at", "created_at", "updated_at"),
        "WebhookOut": ("created_at", "previous_secret_until"),
        "DeliveryOut": ("created_at", "next_attempt_at", "finished_at"),
        "TaskAttemptOut": ("started_at", "finished_at"),
        "DeliveryAttemptOut": ("time",),
        "FireOut": ("fire_at",),
        "ProviderOut": ("checked_at",),
    }
    for component, names in times.items():
        for name in names:
            assert field(component, name).get("format") == "date-time", (component, name)
    words = {
        ("BatchOut", "status"): "loaded",
        ("DeliveryOut", "status"): "delivered",
        ("StepOut", "status"): "succeeded",
        ("TaskAttemptOut", "status"): "handed_back",
        ("TemplateOut", "origin"): "builtin",
        ("FireOut", "outcome"): "skipped",
        ("ProviderOut", "kind"): "ollama",
    }
    for (component, name), word in words.items():
        assert word in field(component, name).get("enum", ()), (component, name)
    event_type = {"$ref": "#/components/schemas/EventType"}
    assert schemas["WebhookOut"]["properties"]["event_types"]["items"] == event_type
    assert not [name for name in schemas if "_" in name]  # schemas_AttemptOut, webhooks_…
    for page in ("TaskList", "ScheduleList", "WebhookList", "DeliveryList", "BatchList"):
        assert "next_cursor" in schemas[page]["required"], page

    # Real answers fit (formats too): the service sends what the document now says.
    done = await service.wait((await service.submit("summarize", text="Queues."))["id"])
    assert done["attempts"] and done["steps"]
    _answers_as_declared(document, "/api/v1/tasks/{task_id}", done)
    schedule = {"name": "s", "template": "summarize", "params": {"text": "x"}, "every": "1h"}
    assert (await service.client.post("/api/v1/schedules", json=schedule)).status_code == 201
    assert (await service.client.post("/api/v1/schedules/s/run")).status_code == 201
    batch = await service.client.post(
        "/api/v1/batches", params={"template": "summarize", "format": "csv"}, content=b"text\nx\n"
    )
    assert batch.status_code == 201, batch.text
    for path, url in [
        ("/api/v1/tasks", "/api/v1/tasks"),
        ("/api/v1/schedules", "/api/v1/schedules"),
        ("/api/v1/schedules/{ref}", "/api/v1/schedules/s"),
        ("/api/v1/batches/{batch_id}", f"/api/v1/batches/{batch.json()['batch']['id']}"),
        ("/api/v1/batches", "/api/v1/batches"),
        ("/api/v1/webhooks", "/api/v1/webhooks"),
        ("/api/v1/templates", "/api/v1/templates"),
        ("/api/v1/models", "/api/v1/models"),
        ("/health", "/health"),
    ]:
        answer = await service.client.get(url)
        assert answer.status_code == 200, (url, answer.text)
        _answers_as_declared(document, path, answer.json())
