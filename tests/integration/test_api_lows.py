"""Small things the API answered wrongly (a redelivery's empty answer is tested with the
redelivery, in test_webhooks.py): a generic 404 for an id
that is not a number, a webhook URL reported as a template parameter, a string taken for a
number, an out-of-range number in params named by its parent, a feed filtered by a template
that does not exist, and time zone names that depend on the host."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import Service, sql_rows
from tests.integration.test_webhooks import loopback_service as loopback_service
from tests.integration.test_webhooks import receiver as receiver

SCHEDULE = {"name": "s", "template": "summarize", "params": {"text": "the news"}}


# -- 2. an id that is not a number is the resource's own 404 ------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "code", "message"),
    [
        ("GET", "/api/v1/tasks/abc", "task_not_found", "no task 'abc' (the task id is an integer)"),
        ("GET", "/api/v1/tasks/1.5/events", "task_not_found", "no task '1.5'"),
        ("POST", "/api/v1/tasks/abc/cancel", "task_not_found", "no task 'abc'"),
        ("POST", "/api/v1/tasks/abc/retry", "task_not_found", "no task 'abc'"),
        ("GET", "/api/v1/webhooks/abc", "webhook_not_found", "no webhook 'abc'"),
        ("DELETE", "/api/v1/webhooks/abc", "webhook_not_found", "no webhook 'abc'"),
        ("GET", "/api/v1/webhooks/abc/deliveries", "webhook_not_found", "no webhook 'abc'"),
        (
            "POST",
            "/api/v1/webhooks/1/deliveries/x/redeliver",
            "webhook_not_found",
            "webhook 1 has no delivery 'x' (the delivery id is an integer)",
        ),
        ("GET", "/api/v1/batches/abc", "batch_not_found", "no batch 'abc'"),
        ("GET", "/api/v1/batches/abc/results", "batch_not_found", "no batch 'abc'"),
    ],
)
async def test_an_id_that_is_not_a_number_is_the_resources_own_404(
    service: Service, method: str, path: str, code: str, message: str
) -> None:
    response = await service.client.request(method, path)
    assert response.status_code == 404, response.text
    body = response.json()
    assert (body["status"], body["code"]) == (404, code), body
    assert body["message"].startswith(message), body


async def test_every_route_with_an_integer_id_answers_a_word_with_its_resources_404(
    service: Service,
) -> None:
    """Every API route with an integer id, as the OpenAPI document lists them, so that a
    route added later is covered by itself."""
    spec = (await service.client.get("/schema/openapi.json")).json()
    asked = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            ids = [
                p["name"]
                for p in operation.get("parameters", [])
                if p["in"] == "path" and p["schema"].get("type") == "integer"
            ]
            for word in ids:  # this id a word, the others numbers
                url = path
                for name in ids:
                    url = url.replace("{" + name + "}", "abc" if name == word else "1")
                response = await service.client.request(method.upper(), url)
                body = response.json()
                assert response.status_code == 404, (method, url, body)
                assert body["code"].endswith("_not_found"), (method, url, body)
                assert "'abc'" in body["message"], (method, url, body)
                asked += 1
    assert asked >= 15  # the tasks', batches' and webhooks' routes


async def test_a_task_id_that_is_not_a_number_answers_as_a_missing_number_does(
    service: Service,
) -> None:
    numeric = (await service.client.get("/api/v1/tasks/424242")).json()
    word = (await service.client.get("/api/v1/tasks/abc")).json()
    assert set(word) == set(numeric)
    assert (word["status"], word["code"], word["fields"]) == (
        numeric["status"],
        numeric["code"],
        numeric["fields"],
    )
    # Other paths keep the generic answer.
    other = await service.client.get("/api/v1/tasks/abc/nothing")
    assert (other.status_code, other.json()["code"]) == (404, "not_found")


# -- 3. a bad webhook URL is a request error, not a template parameter's ------------------------


@pytest.mark.parametrize(
    "url", ["not a url", "ftp://example.com/x", "http:///nohost", "http://127.0.0.1:9/hook"]
)
async def test_a_bad_webhook_url_has_the_code_of_other_body_fields(
    service: Service, url: str
) -> None:
    response = await service.client.post("/api/v1/webhooks", json={"url": url})
    # Malformed: a 400 as any bad field; well formed but a refused place: 422.
    assert response.status_code == (422 if url.endswith("/hook") else 400), response.text
    body = response.json()
    assert body["code"] == "invalid_request", body
    assert [f["field"] for f in body["fields"]] == ["url"]
    # The same code as a bad field of another body (a schedule's).
    schedule = await service.client.post(
        "/api/v1/schedules", json={**SCHEDULE, "every": "1m", "timezone": "Atlantis/Capital"}
    )
    assert schedule.json()["code"] == body["code"]


async def test_a_bad_callback_url_has_the_code_of_other_body_fields(service: Service) -> None:
    body = {"template": "summarize", "params": {"text": "x"}, "callback_url": "not a url"}
    response = await service.client.post("/api/v1/tasks", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_request"
    assert [f["field"] for f in response.json()["fields"]] == ["callback_url"]


# -- 4. a string is not a number -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("template_version", "1", "must be an integer"),
        ("priority", "5", "must be an integer"),
        ("max_attempts", "2", "must be an integer"),
        ("delay", "1.5", "must be a number"),
        ("timeout", "30", "must be a number"),
        ("cache", "true", "must be true or false"),
        ("template_version", 1.5, "must be an integer"),
        ("priority", True, "must be an integer"),
    ],
)
async def test_a_submit_field_of_the_wrong_json_type_is_refused_not_converted(
    service: Service, field: str, value: Any, says: str
) -> None:
    body = {"template": "summarize", "params": {"text": "x"}, field: value}
    response = await service.client.post("/api/v1/tasks", json=body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == "invalid_request"
    [problem] = answer["fields"]
    assert problem["field"] == field
    assert says in problem["message"], problem
    assert (await service.client.get("/api/v1/tasks")).json()["items"] == []


async def test_a_whole_float_is_an_integer_in_nested_options_too(service: Service) -> None:
    """JSON Schema (the OpenAPI document) counts 53.0 as an integer, at any depth: a
    schedule's options.max_attempts as a task's own max_attempts (Schemathesis found the
    nested one refused). A params value keeps its own type (the template's to judge)."""
    made = await service.client.post(
        "/api/v1/schedules",
        json={**SCHEDULE, "every": "1h", "priority": 3.0, "options": {"max_attempts": 2.0}},
    )
    assert made.status_code == 201, made.text
    assert made.json()["options"]["max_attempts"] == 2
    changed = await service.client.patch(
        f"/api/v1/schedules/{made.json()['id']}", json={"options": {"max_attempts": 53.0}}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["options"]["max_attempts"] == 53
    fraction = await service.client.patch(
        f"/api/v1/schedules/{made.json()['id']}", json={"options": {"max_attempts": 5.5}}
    )
    assert fraction.status_code == 400, fraction.text
    assert fraction.json()["fields"][0]["field"] == "options.max_attempts"


async def test_a_submit_with_every_field_of_its_own_type_is_still_accepted(
    service: Service,
) -> None:
    body = {
        "template": "summarize",
        "params": {"text": "x", "sentences": 2},
        "template_version": 1,
        "priority": 5,
        "max_attempts": 2,
        "delay": 1,  # an integer is a number
        "timeout": 30.5,
        "cache": False,
        "model": "llama3.2",
        "idempotency_key": "k-1",
    }
    response = await service.client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    task = response.json()
    assert (task["template_version"], task["priority"], task["max_attempts"]) == (1, 5, 2)
    timed = {"template": "summarize", "params": {"text": "x"}, "run_at": "2030-01-01T00:00:00Z"}
    assert (await service.client.post("/api/v1/tasks", json=timed)).status_code == 201


async def test_a_webhook_change_of_the_wrong_json_type_is_refused_not_converted(
    loopback_service: Service,
) -> None:
    svc = loopback_service
    made = await svc.client.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
    assert made.status_code == 201, made.text
    path = f"/api/v1/webhooks/{made.json()['id']}"
    response = await svc.client.patch(path, json={"enabled": "false"})
    assert response.status_code == 400, response.text
    assert response.json()["fields"] == [
        {"field": "enabled", "message": "must be true or false, not a string"}
    ]
    assert (await svc.client.get(path)).json()["enabled"] is True


# -- 5. a number out of range is named by its own path -------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"i": 1e400}', "params.i"),
        ('{"text": "x", "i": -1e400}', "params.i"),
        ('{"a": {"b": [1, 2, 1E999]}}', "params.a.b[2]"),
        # Past the 4,300 digits an integer may have in JSON here (msgspec's limit).
        ('{"text": "x", "n": [0, ' + "7" * 5000 + "]}", "params.n[1]"),
    ],
)
async def test_a_number_out_of_range_in_params_is_named_by_its_path(
    service: Service, raw: str, field: str
) -> None:
    content = b'{"template": "summarize", "params": ' + raw.encode() + b"}"
    response = await service.client.post(
        "/api/v1/tasks", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "invalid_request"
    [problem] = body["fields"]
    assert problem["field"] == field, body
    assert "out of range" in problem["message"]
    assert body["message"].startswith(f"{field}: ")
    assert len(response.content) < 2000  # the number is described, not repeated


# -- 6. the feed of a template that does not exist -----------------------------------------------


async def test_the_feed_of_an_unknown_template_is_a_404_before_the_stream(
    service: Service,
) -> None:
    async with asyncio.timeout(10):
        async with service.client.stream("GET", "/api/v1/events?template=nope") as response:
            assert response.status_code == 404
            body = json.loads(await response.aread())
    assert body["code"] == "template_not_found"
    assert "nope" in body["message"]
    # As a webhook filtered by that template answers.
    hook = await service.client.post(
        "/api/v1/webhooks", json={"url": "https://example.com/x", "template": "nope"}
    )
    assert (hook.status_code, hook.json()["code"]) == (404, body["code"])


async def test_the_feed_of_a_known_template_still_streams(service: Service) -> None:
    async with asyncio.timeout(10):
        async with service.client.stream(
            "GET", "/api/v1/events?template=summarize&after=0"
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")


# -- 7. time zones --------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["localtime", "posix/Europe/Paris", "right/UTC", "posixrules"])
async def test_a_time_zone_that_is_no_iana_name_is_refused(service: Service, zone: str) -> None:
    response = await service.client.post(
        "/api/v1/schedules", json={**SCHEDULE, "cron": "0 9 * * *", "timezone": zone}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "invalid_request"
    [problem] = body["fields"]
    assert problem["field"] == "timezone"
    assert "IANA" in problem["message"] and "Europe/Paris" in problem["message"]


@pytest.mark.parametrize("zone", ["Europe/Paris", "UTC", "America/Argentina/Buenos_Aires"])
async def test_iana_time_zones_are_accepted(service: Service, zone: str) -> None:
    response = await service.client.post(
        "/api/v1/schedules", json={**SCHEDULE, "cron": "0 9 * * *", "timezone": zone}
    )
    assert response.status_code == 201, response.text
    assert response.json()["timezone"] == zone


async def test_every_keeps_a_time_zone_it_ignores(service: Service) -> None:
    """Kept, not refused: a cron schedule changed to ``every`` by PATCH keeps its zone."""
    made = await service.client.post(
        "/api/v1/schedules", json={**SCHEDULE, "cron": "0 9 * * *", "timezone": "Europe/Paris"}
    )
    assert made.status_code == 201, made.text
    changed = await service.client.patch("/api/v1/schedules/s", json={"every": "1h"})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["every"], changed.json()["cron"]) == ("1h", None)
    assert changed.json()["timezone"] == "Europe/Paris"


# -- a query value of the wrong kind is quoted as sent -----------------------------------------


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        # Every query value is text: "not a string" said nothing of what was wrong (nor "or
        # null", which no query value is).
        ("/api/v1/events?after=1.5", "after", "must be an integer, not '1.5'"),
        ("/api/v1/events?after=abc", "after", "must be an integer, not 'abc'"),
        ("/api/v1/tasks?limit=1.5", "limit", "must be an integer, not '1.5'"),
        ("/api/v1/tasks?limit=" + "x" * 60, "limit", "must be an integer, not '" + "x" * 40 + "…'"),
        # NaN passes no bound, and said "must be at least 0"; past a float's range, msgspec's
        # own "Number out of range".
        ("/api/v1/tasks/1?wait=nan", "wait", "must be a finite number, not 'nan'"),
        ("/api/v1/tasks/1?wait=1.5e400", "wait", "must be a finite number, not '1.5e400'"),
    ],
)
async def test_a_query_value_of_the_wrong_kind_is_quoted_as_sent(
    service: Service, query: str, field: str, message: str
) -> None:
    response = await service.client.get(query)
    assert response.status_code == 400, response.text
    assert response.json()["fields"] == [{"field": field, "message": message}]


async def test_a_query_number_past_its_bounds_keeps_its_words(service: Service) -> None:
    response = await service.client.get("/api/v1/tasks/1?wait=61")
    assert response.json()["fields"] == [{"field": "wait", "message": "must be at most 60"}]
    response = await service.client.get("/api/v1/tasks?limit=" + "9" * 60)
    assert response.json()["fields"] == [{"field": "limit", "message": "must be at most 500"}]
    # A word that reads as a number, where no number goes, is not called one.
    response = await service.client.get("/api/v1/tasks?status=nan")
    [problem] = response.json()["fields"]
    assert problem["message"].startswith("'nan' is not one of queued"), problem


# -- a query value is read as written, and once --------------------------------------------


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        # "null" was no value at all, and "1e3" or "5.0" an integer: a query is text, and an
        # integer is written in digits.
        ("/api/v1/events?after=null", "after", "must be an integer, not 'null'"),
        ("/api/v1/tasks?limit=1e3", "limit", "must be an integer, not '1e3'"),
        ("/api/v1/tasks?limit=5.0", "limit", "must be an integer, not '5.0'"),
        ("/api/v1/tasks?limit=%EF%BC%95", "limit", "must be an integer, not '５'"),
        ("/api/v1/tasks/1?wait=null", "wait", "must be a number, not 'null'"),
        ("/api/v1/batches?template=t&timeout=null", "timeout", "must be a number, not 'null'"),
        # In any case: msgspec's lenient conversion took NULL and Null for null too.
        ("/api/v1/batches?template=t&timeout=Null", "timeout", "must be a number, not 'Null'"),
        ("/api/v1/events?after=NULL", "after", "must be an integer, not 'NULL'"),
        # Each value of a list: the second was not read.
        (
            "/api/v1/batches/1/retry?statuses=failed&statuses=NULL",
            "statuses",
            "'NULL' is not one of failed, cancelled",
        ),
        # Empty, a type filter was no filter (an empty template is refused already).
        ("/api/v1/events?type=", "type", "must name an event type (leave it out for all)"),
        ("/api/v1/events?type=,%20", "type", "must name an event type (leave it out for all)"),
        # Repeated, one of them was taken without a word.
        ("/api/v1/tasks?limit=1&limit=2", "limit", "is given 2 times; send it once"),
        (
            "/api/v1/tasks?template=a&template=b&template=c",
            "template",
            "is given 3 times; send it once",
        ),
        ("/health?probe=live&probe=live", "probe", "is given 2 times; send it once"),
    ],
)
async def test_a_query_value_is_read_as_written_and_once(
    service: Service, query: str, field: str, message: str
) -> None:
    method = "POST" if query.startswith("/api/v1/batches") else "GET"  # upload, retry
    # Streamed: taken as no value, ``after=null`` opened the live feed.
    async with service.client.stream(method, query) as response:
        assert response.status_code == 400, response.headers
        body = json.loads(await response.aread())
    assert body["fields"] == [{"field": field, "message": message}]
    assert body["message"] == f"{field}: {message}"


@pytest.mark.parametrize("null", ["null", "NULL"])
async def test_null_is_no_word_for_a_choice_either(service: Service, null: str) -> None:
    response = await service.client.get(f"/api/v1/tasks?status={null}")
    assert response.status_code == 400, response.text
    [problem] = response.json()["fields"]
    assert problem["message"].startswith(f"'{null}' is not one of queued"), problem
    # Where a parameter is text, null is the text.
    response = await service.client.get(f"/api/v1/tasks?template={null}")
    assert response.status_code == 200, response.text


async def test_a_query_that_takes_a_list_may_be_repeated_and_a_negative_integer_meets_its_bound(
    service: Service,
) -> None:
    # ``type`` is a list: repeating it is how it is written (test_feed streams with it).
    async with service.client.stream(
        "GET", "/api/v1/events?after=0&type=task.queued&type=task.finished"
    ) as response:
        assert response.status_code == 200
    response = await service.client.get("/api/v1/tasks?limit=-1")
    assert response.json()["fields"] == [{"field": "limit", "message": "must be at least 1"}]


# -- a model's name is checked where it is given ---------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (" default", "must not begin or end with a space"),
        ("llama3.2\n", "must not begin or end with a space"),
        ("ollama/", "ends with '/': name the model after its provider (ollama/llama3.2)"),
        ("{{ params.m }}", "is a model's name, not a template: it is not rendered"),
    ],
)
async def test_a_submitted_model_name_that_names_no_model_is_refused(
    service: Service, model: str, message: str
) -> None:
    """Such names were queued (201) and failed only when a worker asked for them."""
    body = {"template": "summarize", "params": {"text": "x"}, "model": model}
    response = await service.client.post("/api/v1/tasks", json=body)
    assert response.status_code in (400, 422), response.text
    assert response.json()["fields"] == [{"field": "model", "message": message}]


async def test_a_templated_model_name_in_a_template_is_refused_with_its_line(
    service: Service,
) -> None:
    text = (
        "name: templated\nparameters:\n  m: {type: string}\n"
        'steps:\n  - id: a\n    model: "{{ params.m }}"\n    prompt: hi\n'
    )
    response = await service.client.post("/api/v1/templates/validate", content=text)
    found = [(e["path"], e["line"], e["message"]) for e in response.json()["errors"]]
    assert found == [
        (
            "steps[0].model",
            6,
            "model is a model's name, not a template: it is not rendered (a task's model "
            "field chooses one per task)",
        )
    ], found


async def test_a_batch_with_a_model_that_names_none_is_refused_whole(
    service: Service, db_url: str
) -> None:
    """Not each of its rows, refused one by one for the same reason."""
    response = await service.client.post(
        "/api/v1/batches",
        params={"template": "summarize", "model": "ollama/"},
        content=b"text\nrow 1\nrow 2\n",
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 400, response.text
    message = "ends with '/': name the model after its provider (ollama/llama3.2)"
    assert response.json()["fields"] == [{"field": "model", "message": message}]
    assert sql_rows(db_url, "SELECT count(*) FROM batches") == [(0,)]


async def test_the_services_address_says_where_the_dashboard_is(service: Service) -> None:
    """A browser pointed at the service's address got "there is nothing at / (the API's
    paths: /schema)", with no word of the dashboard."""
    answer = await service.client.get("/")
    assert answer.status_code == 404
    assert answer.json()["message"] == (
        "there is nothing at / (the dashboard: /ui/; the API's paths: /schema)"
    )
