"""Hostile values in every date and number the API reads: never a 5xx, and a 4xx is JSON that
names the field. Idempotency keys belong to the API key that used them, and refuse control
characters.

The property tests run hypothesis on a worker thread with a sync client, against one service
running on the test's event loop, so every example costs one loopback request.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Connection

from orchestra.config import AuthSettings, Settings, TemplateSettings
from orchestra.db import Database, schema
from orchestra.db.store import TaskStore
from orchestra.domain import NewTask
from tests.conftest import Service, StartService, make_keys

ECHO = """name: echo
parameters:
  text: {type: string}
steps:
  - id: say
    kind: render
    text: "{{ params.text }}"
"""
STAMP = "2026-01-01T00:00:00.000000Z"
#: A well-formed submit; each example changes one field of it.
BASE = {"template": "echo", "params": {"text": "hi"}}
PROPERTY = hsettings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture
async def svc(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> AsyncIterator[Service]:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "echo.yaml").write_text(ECHO)
    templates = TemplateSettings(dirs=[str(folder)])
    # Webhooks to this machine (a port nobody serves), for the routes that need one.
    hooks = msgspec.structs.replace(settings.webhooks, allow_private=True)
    changed = msgspec.structs.replace(settings, templates=templates, webhooks=hooks)
    async with start_service(changed) as service:
        yield service


def _names(body: dict[str, Any], field: str) -> bool:
    """Whether an error body names ``field`` (in ``fields``, or in its message); a header may
    be named as written (Last-Event-ID) or as its parameter (last_event_id)."""

    def norm(name: str) -> str:
        return name.lower().replace("-", "_")

    named = [norm(f["field"]) for f in body.get("fields", [])]
    field = norm(field)
    return any(n == field or n.startswith(f"{field}.") for n in named) or (
        field in norm(body.get("message", ""))
    )


def _judge(response: httpx.Response, field: str, *, not_found_ok: bool = False) -> None:
    """The property: below 500; a 4xx is a JSON error body that names ``field`` (where
    ``not_found_ok``, a 404, 405 or 409 may instead speak of the resource the value names)."""
    assert response.status_code < 500, (field, response.status_code, response.text)
    if response.status_code < 400:
        return
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert body["status"] == response.status_code and body["message"], body
    if response.status_code in (404, 405, 409) and not_found_ok:
        return
    assert _names(body, field), (field, body)


async def _in_thread(check: Callable[[httpx.Client], None], url: str) -> None:
    """Run a sync hypothesis test on a thread, so the service on this loop keeps serving."""

    def run() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            check(client)

    await asyncio.to_thread(run)


# -- strategies ---------------------------------------------------------------------------------

_RAW_NUMBERS = [
    "1e400",
    "-1e400",
    "1e-400",
    "1E308",
    "-0",
    "0.0",
    "5e-324",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "123456789012345678901234567890123456789",
]

#: Numbers as JSON text: any size of integer, any finite float, and text JSON can carry but
#: Python's float cannot (1e400, which is inf; 1e-400, which is 0).
json_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(_RAW_NUMBERS),
)
#: Anything else a field may be sent.
json_others = st.one_of(
    st.text(max_size=20).map(json.dumps),
    st.sampled_from(["true", "false", "null", "[]", "{}", '"1"', '"1e400"', '"NaN"']),
)

_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
#: Every moment Python can hold, with any offset it allows (or none).
moments = st.datetimes(timezones=st.none() | _offsets | st.just(UTC)).map(
    lambda moment: moment.isoformat()
)


@st.composite
def iso_texts(draw: st.DrawFn) -> str:
    """ISO-8601-looking text with every part possibly out of range."""
    year = draw(st.sampled_from(["0000", "0001", "9999", "10000", "-0001", "2026"]))
    parts = [draw(st.integers(min_value=0, max_value=99)) for _ in range(5)]
    fraction = draw(st.sampled_from(["", ".5", ".999999", ".9999999999", "."]))
    zone = draw(
        st.sampled_from(["", "Z", "z", "+14:00", "-14:00", "+23:59", "-23:59", "+24:00", "+99:99"])
    )
    separator = draw(st.sampled_from(["T", " ", "t"]))
    month, day, hour, minute, second = parts
    return (
        f"{year}-{month:02d}-{day:02d}{separator}{hour:02d}:{minute:02d}:{second:02d}"
        f"{fraction}{zone}"
    )


json_dates = st.one_of(
    moments.map(json.dumps),
    iso_texts().map(json.dumps),
    st.sampled_from(
        [
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59.999999-14:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01",
            "2026-02-30T00:00:00Z",
        ]
    ).map(json.dumps),
    json_numbers,
    json_others,
)

#: The submit body's fields that carry numbers or dates.
SUBMIT_FIELDS = {
    "run_at": json_dates,
    "delay": st.one_of(json_numbers, json_others),
    "priority": st.one_of(json_numbers, json_others),
    "max_attempts": st.one_of(json_numbers, json_others),
    "timeout": st.one_of(json_numbers, json_others),
    "template_version": st.one_of(json_numbers, json_others),
}


def _submit_body(field: str, raw: str) -> bytes:
    """BASE with ``field`` set to ``raw`` JSON text (which may be a number no float holds)."""
    body = json.dumps({**BASE, field: "\x00raw"})
    return body.replace(json.dumps("\x00raw"), raw).encode()


#: Query values as text: numbers, dates, nonsense.
query_values = st.one_of(
    json_numbers,
    moments,
    iso_texts(),
    st.text(max_size=30),
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "Infinity", "0x10", "1_000", " 1", "+1"]),
)


# -- item 6: dates out of range -----------------------------------------------------------------


async def test_a_run_at_outside_years_1_to_9999_in_utc_is_refused_and_the_edges_are_kept(
    svc: Service,
) -> None:
    # 0001-01-01T00:00+14:00 is a time in year 0 in UTC: converting it was a 500.
    for run_at in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.999999-14:00"):
        response = await svc.client.post("/api/v1/tasks", json={**BASE, "run_at": run_at})
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["code"] == "invalid_request"
        assert [f["field"] for f in body["fields"]] == ["run_at"]
        assert "out of range" in body["fields"][0]["message"]
    for run_at, stored in (
        ("0001-01-01T00:00:00+00:00", "0001-01-01T00:00:00.000000Z"),
        ("0001-01-01T14:00:00+14:00", "0001-01-01T00:00:00.000000Z"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),
        ("9999-12-31T09:59:59.999999-14:00", "9999-12-31T23:59:59.999999Z"),
    ):
        response = await svc.client.post("/api/v1/tasks", json={**BASE, "run_at": run_at})
        assert response.status_code == 201, response.text
        assert response.json()["next_run_at"] == stored


async def test_no_date_or_number_in_a_submit_gets_a_5xx(svc: Service) -> None:
    fields = st.sampled_from(sorted(SUBMIT_FIELDS)).flatmap(
        lambda name: st.tuples(st.just(name), SUBMIT_FIELDS[name])
    )

    def check(client: httpx.Client) -> None:
        @PROPERTY
        @given(fields)
        @example(("run_at", '"0001-01-01T00:00:00+14:00"'))
        @example(("run_at", '"9999-12-31T23:59:59.999999-14:00"'))
        @example(("delay", "1e400"))
        @example(("template_version", "9223372036854775808"))
        def prop(case: tuple[str, str]) -> None:
            field, raw = case
            response = client.post(
                "/api/v1/tasks",
                content=_submit_body(field, raw),
                headers={"content-type": "application/json"},
            )
            # An unknown template_version is a 404 that names the version, not a field.
            _judge(response, field, not_found_ok=field == "template_version")

        prop()

    await _in_thread(check, svc.url)


#: (method, path, where the value goes, the field an error names, whether an answer about
#: the resource it names (404, 405, 409) will do); {tid} is a finished task's id.
QUERY_TARGETS = [
    ("GET", "/api/v1/tasks", "limit", "limit", False),
    ("GET", "/api/v1/tasks", "cursor", "cursor", False),
    ("GET", "/api/v1/tasks/{tid}", "wait", "wait", False),
    ("GET", "/api/v1/tasks/{tid}/events", "after", "after", False),
    ("GET", "/api/v1/tasks/{tid}/events", "header:Last-Event-ID", "Last-Event-ID", False),
    ("GET", "/api/v1/templates/echo", "version", "version", True),
    ("GET", "/api/v1/tasks/{}", "path", "task_id", True),
    ("GET", "/api/v1/tasks/{}/events", "path", "task_id", True),
    ("POST", "/api/v1/tasks/{}/cancel", "path", "task_id", True),
    ("POST", "/api/v1/tasks/{}/retry", "path", "task_id", True),
]


async def test_no_number_in_a_query_or_path_gets_a_5xx(svc: Service) -> None:
    task = await svc.submit("echo", text="done")
    done = await svc.wait(task["id"])
    assert done["status"] == "succeeded"
    cases = st.tuples(st.sampled_from(QUERY_TARGETS), query_values)

    def check(client: httpx.Client) -> None:
        @PROPERTY
        @given(cases)
        # Past 2**63 - 1 the event stream's query overflowed SQLite after its 200 was sent.
        @example((QUERY_TARGETS[3], "9223372036854775808"))
        # A NUL in a path is refused before routing, naming the path (a fresh-clone run).
        @example((QUERY_TARGETS[6], "\x00"))
        def prop(case: tuple[tuple[str, str, str, str, bool], str]) -> None:
            (method, path, where, field, not_found_ok), value = case
            path = path.replace("{tid}", str(task["id"]))
            params: dict[str, str] = {}
            headers: dict[str, str] = {}
            if where == "path":
                path = path.format(quote(value, safe="") or "0")
                if "\x00" in value:  # refused before routing, naming where: the path
                    field = "path"
            elif where.startswith("header:"):
                if not value.isascii() or not value.isprintable():
                    return  # not sendable as a header value
                headers[where.removeprefix("header:")] = value.strip()
            else:
                params[where] = value
            response = client.request(method, path, params=params, headers=headers)
            _judge(response, field, not_found_ok=not_found_ok)

        prop()

    await _in_thread(check, svc.url)


#: Every other route with an id in its path (or a number in its query), {hid} a webhook.
ID_TARGETS = [
    ("GET", "/api/v1/webhooks/{}", "path"),
    ("DELETE", "/api/v1/webhooks/{}", "path"),
    ("POST", "/api/v1/webhooks/{}/roll-secret", "path"),
    ("GET", "/api/v1/webhooks/{}/deliveries", "path"),
    ("POST", "/api/v1/webhooks/{hid}/deliveries/{}/redeliver", "path"),
    ("GET", "/api/v1/webhooks/{hid}/deliveries", "cursor"),
    ("GET", "/api/v1/batches/{}", "path"),
    ("GET", "/api/v1/batches/{}/results", "path"),
    ("POST", "/api/v1/batches/{}/cancel", "path"),
    ("POST", "/api/v1/batches/{}/retry", "path"),
    ("GET", "/api/v1/batches", "cursor"),
    ("GET", "/api/v1/schedules/{}", "path"),
    ("POST", "/api/v1/schedules/{}/run", "path"),
    ("DELETE", "/api/v1/schedules/{}", "path"),
]
#: Past the 64-bit integers a database column holds, and around its edge.
EDGE_IDS = ["9223372036854775807", "9223372036854775808", "2138479133549277216768", "-1", "0"]


@pytest.mark.parametrize(("method", "path", "where"), ID_TARGETS)
async def test_no_id_past_64_bits_gets_a_5xx_on_any_route(
    svc: Service, method: str, path: str, where: str
) -> None:
    """Schemathesis found POST /webhooks/2138479133549277216768/roll-secret answering 500 on
    PostgreSQL (the number overflowed its bigint): every id route answers a 4xx instead."""
    made = await svc.client.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
    assert made.status_code == 201, made.text
    path = path.replace("{hid}", str(made.json()["id"]))
    for value in EDGE_IDS:
        target = path.format(value) if where == "path" else path
        params = {where: value} if where != "path" else {}
        response = await svc.client.request(method, target, params=params)
        assert response.status_code < 500, (target, params, response.text)
        # An id no resource has is a 4xx; a cursor of 0 is a page (an empty one).
        assert where != "path" or response.status_code >= 400, (target, response.text)


#: Template parts that carry numbers (and YAML's own dates), each with {} for the value.
TEMPLATE_SLOTS = [
    "timeout: {}",
    "retry: {{max_attempts: {}}}",
    "retry: {{max_attempts: 2, initial_delay: {}}}",
    "retry: {{max_attempts: 2, max_delay: {}}}",
    "version: {}",
]
PARAM_SLOTS = ["minimum", "maximum", "min_length", "max_length", "default"]
STEP_SLOTS = ["timeout"]
yaml_values = st.one_of(
    json_numbers,
    st.sampled_from(
        [".inf", "-.inf", ".nan", ".NaN", "0o777", "0x7fffffffffffffffff", "1_000", "0b101"]
    ),
    st.sampled_from(["2001-12-14t21:59:43.10-05:00", "0001-01-01 00:00:00+14:00", "2002-12-14"]),
    moments,
)


@st.composite
def hostile_templates(draw: st.DrawFn) -> str:
    value = draw(yaml_values)
    where = draw(st.sampled_from(["top", "param", "step"]))
    top, param, step = "", "", ""
    if where == "top":
        top = draw(st.sampled_from(TEMPLATE_SLOTS)).format(value) + "\n"
    elif where == "param":
        param = f"    {draw(st.sampled_from(PARAM_SLOTS))}: {value}\n"
    else:
        step = f"    {draw(st.sampled_from(STEP_SLOTS))}: {value}\n"
    return (
        f"name: numbers\n{top}parameters:\n  n:\n    type: number\n{param}"
        f'steps:\n  - id: say\n    kind: render\n    text: "{{{{ params.n }}}}"\n{step}'
    )


async def test_no_number_in_a_template_gets_a_5xx(svc: Service) -> None:
    seen: list[str] = []

    def check(client: httpx.Client) -> None:
        @hsettings(PROPERTY, max_examples=40)
        @given(hostile_templates(), json_numbers)
        def prop(text: str, n: str) -> None:
            validated = client.post("/api/v1/templates/validate", content=text)
            assert validated.status_code == 200, validated.text
            registered = client.post("/api/v1/templates", content=text)
            seen.append(f"registered {registered.status_code}")
            assert registered.status_code < 500, (text, registered.text)
            if registered.status_code >= 400:
                assert registered.json()["errors"] or registered.json()["fields"], registered.text
                return
            # A task of it: its retry and timeout settings reach the queue, its param the
            # parameter checks.
            body = b'{"template": "numbers", "params": {"n": %s}}' % n.encode()
            submitted = client.post(
                "/api/v1/tasks", content=body, headers={"content-type": "application/json"}
            )
            # msgspec says where a number too large for a float is as far as "params".
            seen.append(f"submitted {submitted.status_code}")
            _judge(submitted, "params")

        prop()

    await _in_thread(check, svc.url)
    # Some of them were good templates, whose tasks reached the queue.
    assert Counter(seen)["submitted 201"] > 0, Counter(seen)


# -- item 8: idempotency keys per API key -------------------------------------------------------


async def test_each_api_key_has_its_own_idempotency_keys(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    tokens = await make_keys(db_url, "submit", "admin")
    anonymous = AuthSettings(allow_anonymous=True, anonymous_scope="submit")
    async with start_service(msgspec.structs.replace(settings, auth=anonymous)) as svc:

        async def submit(token: str | None, **headers: str) -> httpx.Response:
            if token:
                headers["Authorization"] = f"Bearer {token}"
            return await svc.client.post(
                "/api/v1/tasks",
                json={"template": "summarize", "params": {"text": "x"}},
                headers={"Idempotency-Key": "order-1", **headers},
            )

        alice = await submit(tokens["submit"])
        bob = await submit(tokens["admin"])
        nobody = await submit(None)
        assert (alice.status_code, bob.status_code, nobody.status_code) == (201, 201, 201)
        ids = {alice.json()["id"], bob.json()["id"], nobody.json()["id"]}
        assert len(ids) == 3, "one key's idempotency key reached another key's task"
        # Each key replays its own task, and only its own.
        for token, first in ((tokens["submit"], alice), (tokens["admin"], bob), (None, nobody)):
            again = await submit(token)
            assert again.status_code == 200, again.text
            assert again.json()["id"] == first.json()["id"]
        # A conflict names only the caller's own task.
        changed = await svc.client.post(
            "/api/v1/tasks",
            json={
                "template": "summarize",
                "params": {"text": "other"},
                "idempotency_key": "order-1",
            },
            headers={"Authorization": f"Bearer {tokens['admin']}"},
        )
        assert changed.status_code == 409
        assert f"task {bob.json()['id']} " in changed.json()["message"]


@pytest.mark.empty_database
async def test_keys_stored_before_scoping_stay_in_the_anonymous_scope(db_url: str) -> None:
    """Migration 7 keeps every stored key: it lands in the anonymous scope, where a request
    without an API key still finds it, and an API key's own use of it makes its own task."""
    old = Database(db_url)

    def version_6(conn: Connection) -> None:
        schema.current_version(conn)
        for number, migration in enumerate(schema.MIGRATIONS[:6], start=1):
            migration(conn)
            conn.exec_driver_sql(f"INSERT INTO schema_version VALUES ({number}, '{STAMP}')")
        conn.exec_driver_sql(
            "INSERT INTO tasks (template, template_version, status, params, run_at, "
            "created_at, idempotency_key, request_hash) "
            f"VALUES ('echo', 1, 'queued', '{{}}', '{STAMP}', '{STAMP}', 'order-7', 'h')"
        )

    await old.transaction(version_6)
    try:
        assert await schema.upgrade(old) == schema.LATEST
        store = TaskStore(old)
        new = NewTask("echo", 1, {}, idempotency_key="order-7", request_hash="h")
        legacy = await store.enqueue(new)
        assert (legacy.created, legacy.same_request, legacy.task.id) == (False, True, 1)
        mine = await store.enqueue(msgspec.structs.replace(new, idempotency_scope="abcd1234"))
        assert mine.created and mine.task.id != 1
        again = await store.enqueue(msgspec.structs.replace(new, idempotency_scope="abcd1234"))
        assert (again.created, again.task.id) == (False, mine.task.id)
    finally:
        await old.close()


async def test_control_characters_in_an_idempotency_key_are_refused(svc: Service) -> None:
    for key in ("a\x00b", "\x00", "a\x01", "line\nbreak", "tab\there", "del\x7f"):
        response = await svc.client.post("/api/v1/tasks", json={**BASE, "idempotency_key": key})
        assert response.status_code == 400, response.text
        body = response.json()
        assert [f["field"] for f in body["fields"]] == ["idempotency_key"]
        assert "control character" in body["fields"][0]["message"]
    # A tab is legal inside an HTTP header value, so it reaches the service.
    response = await svc.client.post(
        "/api/v1/tasks", json=BASE, headers={"Idempotency-Key": "a\tb"}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert [f["field"] for f in body["fields"]] == ["Idempotency-Key"]
    assert "control character" in body["fields"][0]["message"]
    # Other control characters, sent raw: the HTTP parser refuses them, or the service does.
    address = urlsplit(svc.url)
    payload = json.dumps(BASE).encode()
    for char in (b"\x00", b"\x01", b"\x1f", b"\x7f"):
        request = (
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nIdempotency-Key: a" + char + b"b\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload
        )
        answer = await asyncio.to_thread(_exchange, address.hostname or "", address.port, request)
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", answer
        if b"application/json" in head:
            assert b'"field":"Idempotency-Key"' in content, answer
    assert (await svc.client.get("/api/v1/tasks")).json()["items"] == []


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/api/v1/batches?template=summarize"])
async def test_an_idempotency_key_sent_twice_is_refused(svc: Service, path: str) -> None:
    """Two Idempotency-Key headers: the first was taken and the second dropped, so a key a
    proxy added beside the caller's defeated the de-duplication in silence (helper-143)."""
    body = json.dumps(BASE).encode() if "tasks" in path else b"text\nhello\n"
    kind = b"application/json" if "tasks" in path else b"text/csv"
    address = urlsplit(svc.url)
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: %s\r\nIdempotency-Key: a\r\nIdempotency-Key: b\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), kind, len(body))
    ) + body
    answer = await asyncio.to_thread(_exchange, address.hostname or "", address.port, request)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", answer
    assert b'"field":"Idempotency-Key"' in content and b"more than once" in content, answer
    assert (await svc.client.get("/api/v1/tasks")).json()["items"] == []


async def test_an_idempotency_key_beyond_ascii_is_read_as_utf_8_in_the_header(
    svc: Service,
) -> None:
    """Header values arrive as bytes; a key typed in a terminal (curl) is UTF-8. It is the
    same key as in the body, stored as typed; bytes that are not UTF-8 are refused by name."""
    first = await svc.client.post(
        "/api/v1/tasks", json=BASE, headers={"Idempotency-Key": "café-1".encode()}
    )
    assert first.status_code == 201, first.text
    assert first.json()["idempotency_key"] == "café-1"
    both = await svc.client.post(
        "/api/v1/tasks",
        json={**BASE, "idempotency_key": "café-1"},
        headers={"Idempotency-Key": "café-1".encode()},
    )
    assert both.status_code == 200, both.text
    assert both.json()["id"] == first.json()["id"]
    body_only = await svc.client.post("/api/v1/tasks", json={**BASE, "idempotency_key": "café-1"})
    assert body_only.status_code == 200, body_only.text
    assert body_only.json()["id"] == first.json()["id"]
    # 255 characters is the limit, counted as characters, not bytes.
    wide = "é" * 255
    response = await svc.client.post(
        "/api/v1/tasks", json=BASE, headers={"Idempotency-Key": wide.encode()}
    )
    assert response.status_code == 201, response.text
    assert response.json()["idempotency_key"] == wide
    for raw in (b"caf\xe9", b"\xff\xfe", b"a\xc3"):
        response = await svc.client.post(
            "/api/v1/tasks", json=BASE, headers={"Idempotency-Key": raw}
        )
        assert response.status_code == 400, response.text
        fields = response.json()["fields"]
        assert [f["field"] for f in fields] == ["Idempotency-Key"]
        assert "UTF-8" in fields[0]["message"]
    assert len((await svc.client.get("/api/v1/tasks")).json()["items"]) == 2


async def test_a_json_body_is_read_whatever_its_content_type_as_curl_d_sends_it(
    svc: Service,
) -> None:
    """`curl -d '{…}'` without -H says form-urlencoded; Ollama's API reads such a body as
    JSON, and so does this one (documented). What is not JSON is a 400, never a task."""
    body = json.dumps(BASE).encode()
    for kind in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"Content-Type": kind} if kind else {}
        response = await svc.client.post("/api/v1/tasks", content=body, headers=headers)
        assert response.status_code == 201, (kind, response.text)
    refused = await svc.client.post(
        "/api/v1/tasks",
        content=b"template=echo&params=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "invalid_request"
    assert len((await svc.client.get("/api/v1/tasks")).json()["items"]) == 3


@pytest.mark.parametrize(
    ("method", "path", "body", "field", "said"),
    [
        ("GET", "/api/v1/tasks?limit=9999", None, "limit", "must be at most 500"),
        ("GET", "/api/v1/tasks?limit=0", None, "limit", "must be at least 1"),
        ("GET", "/api/v1/tasks?cursor=abc", None, "cursor", "must be a next_cursor value"),
        ("GET", "/api/v1/schedules?cursor=1a", None, "cursor", "must be a next_cursor value"),
        (
            "POST",
            "/api/v1/schedules",
            {"name": "9 lives", "template": "echo", "every": 60},
            "name",
            "must be a letter followed by up to 99",
        ),
        ("POST", "/api/v1/tasks", {**BASE, "priority": 10**5}, "priority", "at most 1000"),
        ("POST", "/api/v1/tasks", {**BASE, "timeout": 0}, "timeout", "must be more than 0"),
        ("POST", "/api/v1/tasks", {**BASE, "template": ""}, "template", "must not be empty"),
        # Not the template's model in silence: leave the field out for that.
        ("POST", "/api/v1/tasks", {**BASE, "model": ""}, "model", "must not be empty"),
        (
            "POST",
            "/api/v1/tasks",
            {**BASE, "model": "m" * 300},
            "model",
            "must be at most 255 characters",
        ),
        # A NUL: stored on SQLite, and a 500 on PostgreSQL (whose text refuses it).
        (
            "POST",
            "/api/v1/tasks",
            {**BASE, "model": "m\u0000"},
            "model",
            "must not hold a control character",
        ),
        (
            "POST",
            "/api/v1/schedules",
            {"name": "nul", "template": "echo", "every": 60, "model": "m\u0000"},
            "model",
            "must not hold a control character",
        ),
        # The parameter is named (a property test drew limit=%00: the field said "query").
        ("GET", "/api/v1/tasks?template=a%00", None, "template", "holds a NUL character"),
        ("GET", "/api/v1/tasks?a%00=1", None, "query", "holds a NUL character"),
        ("GET", "/api/v1/schedules/abc%00", None, "path", "holds a NUL character"),
        ("DELETE", "/api/v1/schedules/abc%00", None, "path", "holds a NUL character"),
        # A date alone: its time would be a guess (it said "Invalid RFC3339 encoded datetime").
        (
            "POST",
            "/api/v1/tasks",
            {**BASE, "run_at": "2030-01-01"},
            "run_at",
            "must be a date and time such as 2030-01-01T09:00:00Z",
        ),
    ],
)
async def test_a_value_out_of_bounds_is_said_in_words_not_in_msgspec_s(
    svc: Service, method: str, path: str, body: Any, field: str, said: str
) -> None:
    response = await svc.client.request(method, path, json=body)
    assert response.status_code == 400, response.text
    answer = response.json()
    [problem] = answer["fields"]
    assert problem["field"] == field and said in problem["message"], answer
    assert "Expected `" not in response.text and "regex" not in response.text, answer
    assert "RFC3339" not in response.text, answer


def _exchange(host: str, port: int | None, request: bytes) -> bytes:
    """Send raw bytes, read the whole answer (the request asks to close the connection)."""
    with socket.create_connection((host, port or 80), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
