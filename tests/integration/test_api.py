from __future__ import annotations

import time

import pytest

from tests.conftest import BUILTINS, Service
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import load_slack


async def test_submit_returns_201_with_location_and_the_task(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "Hello there."}}
    )
    assert response.status_code == 201
    task = response.json()
    assert response.headers["location"] == f"/api/v1/tasks/{task['id']}"
    assert task["status"] == "queued"
    assert task["template"] == "summarize" and task["template_version"] == 1
    assert task["params"] == {"text": "Hello there.", "sentences": 3, "style": "paragraph"}


async def test_finished_task_shows_result_steps_usage_and_times(
    service: Service, fake_ollama: FakeOllama
) -> None:
    task = await service.submit("summarize", text="The cat sat on the mat.", sentences=2)
    done = await service.wait(task["id"])
    assert done["status"] == "succeeded"
    [attempt] = done["attempts"]
    assert attempt["number"] == 1 and attempt["status"] == "succeeded"
    assert attempt["worker"].count(":") == 2 and attempt["error"] is None
    assert done["result"].startswith("ECHO: Summarize the text below in at most 2 sentences")
    [step] = done["steps"]
    assert step["id"] == "summary" and step["status"] == "succeeded"
    assert step["model"] == "ollama/llama3.2"
    assert step["usage"]["prompt_tokens"] > 0 and step["usage"]["completion_tokens"] > 0
    assert step["usage"]["generation_ms"] == 2.5
    assert step["duration_ms"] >= 0
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    [request] = fake_ollama.requests
    assert request["messages"][0] == {
        "role": "system",
        "content": "You are a careful editor. You never add facts that are not in the text.",
    }
    assert request["options"] == {"temperature": 0}
    # The step keeps the messages exactly as they were sent.
    assert step["prompt"] == request["messages"]
    assert request["stream"] is True  # streamed, so its text can be followed live


async def test_a_failed_llm_step_keeps_the_prompt_it_sent(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models.clear()  # the model is missing: the call fails
    task = await service.submit("summarize", text="Lost words.")
    done = await service.wait(task["id"], 30)
    assert done["status"] == "failed"
    [step] = done["steps"]
    assert step["status"] == "failed"
    assert step["prompt"][1]["role"] == "user" and "Lost words." in step["prompt"][1]["content"]


async def test_task_may_override_the_model(service: Service, fake_ollama: FakeOllama) -> None:
    response = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"text": "x"}, "model": "qwen2.5"},
    )
    done = await service.wait(response.json()["id"])
    assert done["steps"][0]["model"] == "ollama/qwen2.5"
    assert fake_ollama.requests[-1]["model"] == "qwen2.5"


async def test_unknown_template_is_404(service: Service) -> None:
    response = await service.client.post("/api/v1/tasks", json={"template": "nope"})
    assert response.status_code == 404
    assert response.json() == {
        "status": 404,
        "code": "template_not_found",
        "message": "no template named 'nope'",
        "fields": [],
    }


@pytest.mark.parametrize(
    ("path", "body", "field", "message"),
    [
        ("/api/v1/tasks", b"", "body", "is empty: send a JSON object"),
        ("/api/v1/webhooks", b"", "body", "is empty: send a JSON object"),
        ("/api/v1/schedules", b"", "body", "is empty: send a JSON object"),
        ("/api/v1/tasks", b"{}", "template", "is required"),
        (
            "/api/v1/tasks",
            b'{"template": "summarize", "params": {"text": "x"}, "bogus": 1}',
            "bogus",
            "unknown field",
        ),
        (
            "/api/v1/schedules",
            b'{"name": "n", "template": "summarize", "every": "1m", "options": {"colour": 1}}',
            "options.colour",
            "unknown field",
        ),
    ],
)
async def test_a_body_that_is_empty_or_has_a_wrong_field_names_it(
    service: Service, path: str, body: bytes, field: str, message: str
) -> None:
    # Not the handler's parameter "data" with the message "'data'".
    response = await service.client.post(
        path, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["fields"] == [{"field": field, "message": message}]


async def test_a_whole_number_given_as_a_float_is_an_integer_parameter(
    service: Service, fake_ollama: FakeOllama
) -> None:
    # JSON Schema counts 2.0 as an integer; the prompt said "at most 2.0 sentences".
    response = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"text": "x", "sentences": 2.0}},
    )
    assert response.status_code == 201, response.text
    assert response.json()["params"]["sentences"] == 2
    await service.wait(response.json()["id"])
    prompt = str(fake_ollama.requests[-1]["messages"])
    assert "at most 2 sentences" in prompt, prompt
    refused = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"text": "x", "sentences": 2.5}},
    )
    assert refused.status_code == 422


async def test_invalid_params_are_422_naming_every_field(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"sentences": 99, "style": "poem", "x": 1}},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "invalid_params"
    fields = {f["field"]: f["message"] for f in body["fields"]}
    assert set(fields) == {"params.text", "params.sentences", "params.style", "params.x"}
    assert fields["params.text"] == "is required"
    assert "maximum of 10" in fields["params.sentences"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"template": "summarize", "priority": "high"}', "priority"),
        (b'{"template": "summarize", "priority": 5000}', "priority"),
        (b'{"template": "summarize", "colour": "red"}', "colour"),
        (b'{"params": {}}', "template"),
        (b'{"template": "summarize", "params": [1]}', "params"),
    ],
)
async def test_malformed_requests_are_400_naming_the_field(
    service: Service, body: bytes, field: str
) -> None:
    response = await service.client.post(
        "/api/v1/tasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["code"] == "invalid_request"
    assert field in payload["message"]


async def test_body_that_is_not_json_is_400(service: Service) -> None:
    response = await service.client.post(
        "/api/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


@pytest.mark.parametrize("path", ["/api/v1/tasks/424242", "/api/v1/tasks/99999999999999999999"])
async def test_unknown_task_is_404(service: Service, path: str) -> None:
    response = await service.client.get(path)
    assert response.status_code == 404
    assert response.json()["status"] == 404


@pytest.mark.parametrize(
    "query",
    [{"wait": "61"}, {"wait": "-1"}, {"wait": "soon"}],
)
async def test_bad_wait_is_400(service: Service, query: dict[str, str]) -> None:
    task = await service.submit("summarize", text="x")
    response = await service.client.get(f"/api/v1/tasks/{task['id']}", params=query)
    assert response.status_code == 400
    assert "wait" in response.json()["message"]


@pytest.mark.parametrize(
    ("path", "field", "reason"),
    [
        (
            "/api/v1/tasks?status=done",
            "status",
            "'done' is not one of queued, running, succeeded, failed, cancelled",
        ),
        (
            "/api/v1/tasks?status=queued,failed",
            "status",
            "'queued,failed' is not one of queued, running, succeeded, failed, cancelled"
            " (one value, not a list)",
        ),
        ("/health?probe=ready", "probe", "'ready' is not one of live"),
    ],
)
async def test_a_value_outside_a_parameters_choices_names_them(
    service: Service, path: str, field: str, reason: str
) -> None:
    """msgspec said "Invalid enum value 'done'", which left the caller to guess the values."""
    response = await service.client.get(path)
    assert response.status_code == 400
    assert response.json()["fields"] == [{"field": field, "message": reason}]


async def test_a_body_field_outside_its_choices_names_them(service: Service) -> None:
    schedule = {"name": "x", "template": "summarize", "params": {"text": "a"}, "every": "1h"}
    response = await service.client.post("/api/v1/schedules", json={**schedule, "catch_up": "all"})
    assert response.status_code == 400
    assert response.json()["fields"] == [
        {"field": "catch_up", "message": "'all' is not one of none, latest"}
    ]


async def test_wait_answers_as_soon_as_the_task_finishes(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 0.3
    task = await service.submit("summarize", text="x")
    started = time.perf_counter()
    done = await service.wait(task["id"], seconds=30)
    elapsed = time.perf_counter() - started
    assert done["status"] == "succeeded"
    assert elapsed < 2.0 * load_slack()


async def test_wait_gives_up_after_its_time(service: Service, fake_ollama: FakeOllama) -> None:
    fake_ollama.latency = 2
    task = await service.submit("summarize", text="x")
    started = time.perf_counter()
    response = await service.client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 0.4})
    elapsed = time.perf_counter() - started
    assert response.json()["status"] in ("queued", "running")
    assert 0.35 < elapsed < 2.0 * load_slack()


async def test_list_pages_newest_first(service: Service) -> None:
    ids = [(await service.submit("summarize", text=f"t{i}"))["id"] for i in range(5)]
    ids += [(await service.submit("sentiment", text="good"))["id"]]
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await service.client.get("/api/v1/tasks", params=params)).json()
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    only = (await service.client.get("/api/v1/tasks", params={"template": "sentiment"})).json()
    assert [t["id"] for t in only["items"]] == [ids[-1]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"status": "sleeping"}, "status"),
    ],
)
async def test_bad_list_queries_are_400(
    service: Service, query: dict[str, str], field: str
) -> None:
    response = await service.client.get("/api/v1/tasks", params=query)
    assert response.status_code == 400
    assert field in response.json()["message"]


async def test_list_filters_by_status(service: Service) -> None:
    task = await service.submit("summarize", text="x")
    await service.wait(task["id"])
    page = (await service.client.get("/api/v1/tasks", params={"status": "succeeded"})).json()
    assert [t["id"] for t in page["items"]] == [task["id"]]
    queued = (await service.client.get("/api/v1/tasks", params={"status": "queued"})).json()
    assert queued["items"] == []


async def test_templates_are_listed_and_described(service: Service) -> None:
    listing = (await service.client.get("/api/v1/templates")).json()
    names = [t["name"] for t in listing["items"]]
    assert names == sorted(names)
    assert BUILTINS <= set(names)
    one = (await service.client.get("/api/v1/templates/summarize")).json()
    assert one["parameters"]["required"] == ["text"]
    assert one["parameters"]["properties"]["sentences"] == {
        "type": "integer",
        "description": "How many sentences the summary may have.",
        "minimum": 1,
        "maximum": 10,
        "default": 3,
    }
    assert one["steps"] == [{"id": "summary", "kind": "llm", "model": None}]
    missing = await service.client.get("/api/v1/templates/nope")
    assert missing.status_code == 404


async def test_validate_endpoint_reports_problems_with_positions(service: Service) -> None:
    bad = "name: x\nsteps:\n  - id: a\n    prompt: '{{ oops'\n    temprature: 1\n"
    response = await service.client.post("/api/v1/templates/validate", content=bad)
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False
    by_path = {e["path"]: e for e in body["errors"]}
    assert by_path["steps[0].temprature"]["line"] == 5
    assert by_path["steps[0].prompt"]["line"] == 4
    good = "name: x\nsteps:\n  - id: a\n    prompt: hi\n"
    ok = (await service.client.post("/api/v1/templates/validate", content=good)).json()
    assert ok == {"valid": True, "errors": [], "name": "x"}
    binary = await service.client.post("/api/v1/templates/validate", content=b"\xff\xfe")
    assert binary.status_code == 400


async def test_health_reports_database_and_ollama(service: Service) -> None:
    response = await service.client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    ollama = body["providers"]["ollama"]
    assert ollama["detail"].startswith("ok (Ollama 0.9.0-fake")
    assert ollama["available"] is True and "llama3.2:latest" in ollama["models"]
    assert (await service.client.get("/api/v1/health")).status_code == 200


async def test_health_answers_from_the_last_check_unless_asked_to_check_now(
    service: Service, fake_ollama: FakeOllama
) -> None:
    before = fake_ollama.listings
    for path in ("/health", "/api/v1/health", "/api/v1/models"):
        assert (await service.client.get(path)).status_code == 200
    assert fake_ollama.listings == before  # the background check's result, not a new call
    checked = (await service.client.get("/health")).json()["providers"]["ollama"]["checked_at"]
    fresh = await service.client.get("/health", params={"check": "now"})
    assert fake_ollama.listings == before + 1
    assert fresh.json()["providers"]["ollama"]["checked_at"] > checked
    # Asked again within a second: that check's answer (test_health_cached.py).
    models = await service.client.get("/api/v1/models", params={"check": "now"})
    assert models.status_code == 200 and fake_ollama.listings == before + 1
    assert (await service.client.get("/health", params={"check": "later"})).status_code == 400


async def test_openapi_document_is_served(service: Service) -> None:
    response = await service.client.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {
        "/api/v1/tasks",
        "/api/v1/tasks/{task_id}",
        "/api/v1/templates",
        "/api/v1/templates/validate",
        "/health",
    } <= set(paths)


async def test_unknown_route_is_a_json_404(service: Service) -> None:
    response = await service.client.get("/api/v1/nothing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
