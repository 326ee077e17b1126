"""Hostile input: each answered by a clear 4xx naming the limit or the field, and the service
still runs a normal task afterwards."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from orchestra.config import LimitSettings, Settings
from tests.conftest import Service, StartService
from tests.fixtures.servers import load_slack, wait_until

BOMB = "\n".join(
    [
        'name: bomb\nx0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *[f"x{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)],
        "steps: []",
    ]
)

DEEP = json.loads("[" * 12 + "]" * 12)


@pytest.fixture
async def hardened(settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    limits = LimitSettings(max_string_length=1000, max_params_depth=8)
    async with start_service(msgspec.structs.replace(settings, limits=limits)) as svc:
        yield svc


async def _still_serves(svc: Service) -> None:
    task = await svc.submit("summarize", text="Still here.")
    assert (await svc.wait(task["id"]))["status"] == "succeeded"


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["message"]
    assert "Traceback" not in response.text
    return body


async def test_an_alias_bomb_is_refused_before_it_expands(hardened: Service) -> None:
    assert len(BOMB) < 1000
    for path in ("/api/v1/templates", "/api/v1/templates/validate"):
        response = await hardened.client.post(path, content=BOMB)
        body = response.json()
        errors = body["errors"]
        assert response.status_code in (200, 422), response.text
        assert "yaml_max_nodes" in errors[0]["message"] and errors[0]["line"] >= 3
    await _still_serves(hardened)


async def test_deep_yaml_and_oversized_templates_are_refused(hardened: Service) -> None:
    deep = "name: deep\nsteps: " + "[" * 200 + "]" * 200
    body = _error(await hardened.client.post("/api/v1/templates", content=deep), 422)
    assert "yaml_max_depth" in body["errors"][0]["message"]
    big = "name: big\ndescription: |\n" + "  words words words\n" * 20_000
    body = _error(await hardened.client.post("/api/v1/templates", content=big), 413)
    assert "max_template_bytes" in body["message"]
    # Named as the field it is about, as the body's own limit is (fields were empty).
    [problem] = body["fields"]
    assert problem["field"] == "body" and "max_template_bytes" in problem["message"], problem
    latin = "name: x\ndescription: caf\xe9\n".encode("latin-1")
    body = _error(await hardened.client.post("/api/v1/templates/validate", content=latin), 400)
    assert body["fields"] == [{"field": "body", "message": "is not UTF-8 text"}], body
    await _still_serves(hardened)


async def test_an_oversized_body_gets_413(hardened: Service) -> None:
    payload = {"template": "summarize", "params": {"text": "x" * (3 * 1024 * 1024)}}
    body = _error(await hardened.client.post("/api/v1/tasks", json=payload), 413)
    assert body["code"] == "too_large"
    # It names the limit, as every other limit's answer does.
    assert "[limits] max_body_bytes" in body["message"], body
    reason = body["message"].removeprefix("the request body ")
    assert body["fields"] == [{"field": "body", "message": reason}]
    await _still_serves(hardened)


@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({"text": "x" * 1001}, "params.text", "max_string_length"),
        ({"text": "a\x00b"}, "params.text", "NUL"),
        ({"text": "ok", "extra": {"k" * 1001: 1}}, "params.extra", "max_string_length"),
        (
            {"text": "ok", "deep": json.loads("[" * 12 + "]" * 12)},
            "params.deep",
            "max_params_depth",
        ),
    ],
)
async def test_bad_params_name_the_field_and_the_limit(
    hardened: Service, params: dict[str, Any], field: str, reason: str
) -> None:
    response = await hardened.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": params}
    )
    body = _error(response, 422)
    assert any(f["field"].startswith(field) and reason in f["message"] for f in body["fields"])
    await _still_serves(hardened)


async def test_a_value_over_the_templates_limit_is_not_echoed_back(service: Service) -> None:
    # jsonschema's message quotes the value: a 150,000-character text came back whole.
    text = "a" * 150_000  # under [limits] max_string_length; over summarize's max_length
    response = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": text}}
    )
    body = _error(response, 422)
    assert len(response.content) < 2000, len(response.content)
    [problem] = body["fields"]
    assert problem == {
        "field": "params.text",
        "message": "is 150000 characters; the template allows at most 100000",
    }


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # a lone surrogate
        (b'{"template": "summarize", "params": {"text": "\\ud800"}}', "is not valid JSON"),
        (b'{"template": "summarize", "params": {"text": "\\udc00"}}', "is not valid JSON"),
        (
            b'{"template": "summarize", "params": {"text": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            "nests too deeply",
        ),
        (b'{"template": "summarize", "params": {"text": "\xff\xfe"}}', "is not UTF-8 text"),
        (b'{"template": "summarize", "params": ', "is not valid JSON"),
        (b'{"template": "summarize", "params": {]', "is not valid JSON"),
        # The parser's words as it spells them ("JSON is malformed", not "jSON").
        (b"not json", "is not valid JSON: JSON is malformed"),
    ],
)
async def test_undecodable_bodies_get_400_naming_the_body(
    hardened: Service, raw: bytes, reason: str
) -> None:
    response = await hardened.client.post(
        "/api/v1/tasks", content=raw, headers={"content-type": "application/json"}
    )
    body = _error(response, 400)
    assert body["message"].startswith(f"the request body {reason}"), body
    [problem] = body["fields"]
    assert problem["field"] == "body" and problem["message"].startswith(reason), body
    await _still_serves(hardened)


@pytest.mark.parametrize(
    "query",
    [
        "limit=abc",
        "limit=0",
        "limit=100000000000000000000000",
        "limit=-1",
        "cursor=abc",
        "cursor=-5",
        "cursor=99999999999999999999999999",
        "status=exploded",
    ],
)
async def test_nonsense_list_queries_get_400(hardened: Service, query: str) -> None:
    _error(await hardened.client.get(f"/api/v1/tasks?{query}"), 400)


@pytest.mark.parametrize("wait", ["abc", "-1", "1e309", "nan", "100000"])
async def test_nonsense_wait_gets_400(hardened: Service, wait: str) -> None:
    task = await hardened.submit("summarize", text="x")
    _error(await hardened.client.get(f"/api/v1/tasks/{task['id']}?wait={wait}"), 400)
    _error(await hardened.client.get("/api/v1/tasks/99999999999999999999999?wait=1"), 404)


HOSTILE = """name: hostile
parameters:
  text: {type: string}
steps:
  - id: spin
    kind: render
    text: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
"""
ESCAPE = """name: escape
parameters:
  text: {type: string}
steps:
  - id: peek
    kind: render
    text: "{{ ''.__class__.__mro__[1].__subclasses__() }}"
"""


async def test_a_hostile_template_fails_its_task_and_the_service_goes_on(
    settings: Settings, start_service: StartService
) -> None:
    limits = LimitSettings(render_timeout=0.5)
    async with start_service(msgspec.structs.replace(settings, limits=limits)) as svc:
        for body in (HOSTILE, ESCAPE):
            assert (await svc.client.post("/api/v1/templates", content=body)).status_code == 201
        spin = await svc.submit("hostile", text="x")
        peek = await svc.submit("escape", text="x")
        failed = await svc.wait(spin["id"])
        assert failed["status"] == "failed"
        assert "render_timeout" in failed["error"]["message"]
        escaped = await svc.wait(peek["id"])
        assert escaped["status"] == "failed"
        assert "unsafe" in escaped["error"]["message"] or "undefined" in escaped["error"]["message"]
        await _still_serves(svc)


async def test_the_api_keeps_serving_while_a_hostile_template_renders(
    settings: Settings, start_service: StartService
) -> None:
    limits = LimitSettings(render_timeout=1.5)
    async with start_service(msgspec.structs.replace(settings, limits=limits)) as svc:
        assert (await svc.client.post("/api/v1/templates", content=HOSTILE)).status_code == 201
        quiet = [await _health_time(svc) for _ in range(30)]
        spin = await svc.submit("hostile", text="x")

        async def status() -> str:
            body = (await svc.client.get(f"/api/v1/tasks/{spin['id']}")).json()
            return str(body["status"])

        await wait_until(lambda: status_is(status, "running"))
        during = []
        while await status() == "running":
            during.append(await _health_time(svc))
        failed = await svc.wait(spin["id"])
        assert "render_timeout" in failed["error"]["message"]
        p95 = statistics.quantiles(during, n=20)[18] if len(during) > 1 else 9.9
        quiet_p95 = statistics.quantiles(quiet, n=20)[18]
        print(
            f"/health p95: {p95 * 1000:.1f} ms during a hostile render ({len(during)} requests), "
            f"{quiet_p95 * 1000:.1f} ms before it"
        )
        # Rendering on the loop held the requests for the whole 1.5 s (two got through).
        # Typical figures are 350 requests, p95 6 ms. The 95th percentile, not the worst:
        # this process is the client as well as the service, and on a CI machine busy with
        # the suite's other processes one request of 60 once waited 1.3 s for a CPU (p99
        # stands for the worst of so few); a held loop slows every request. The bound
        # stretches with the machine's load per core, as tests/fixtures/hostile.py's do.
        slack = load_slack()
        assert len(during) > 20, during
        assert p95 < 0.5 * slack and statistics.median(during) < 0.05 * slack, during
        await _still_serves(svc)


async def _health_time(svc: Service) -> float:
    started = time.perf_counter()
    assert (await svc.client.get("/health")).status_code == 200
    return time.perf_counter() - started


async def status_is(status: Any, wanted: str) -> bool:
    return bool(await status() == wanted)


async def test_templates_registered_under_raised_limits_load_again_after_a_restart(
    settings: Settings, start_service: StartService
) -> None:
    roomy = msgspec.structs.replace(settings, limits=LimitSettings(max_template_bytes=400_000))
    big = ESCAPE.replace("name: escape", "name: big\ndescription: |\n" + "  words\n" * 40_000)
    assert len(big) > LimitSettings().max_template_bytes
    async with start_service(roomy) as svc:
        assert (await svc.client.post("/api/v1/templates", content=big)).status_code == 201
    async with start_service(roomy) as svc:
        assert (await svc.client.get("/api/v1/templates/big")).status_code == 200
