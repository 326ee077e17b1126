"""The dashboard over real HTTP (no browser): addresses a browser may come back to (a POST's
URL, empty filter fields, a bulk action's notice), HTML errors on every unknown address,
scheduled tasks, failed rows, the first API key and revoking one, and text that could reorder
itself."""

from __future__ import annotations

import asyncio
import re
from html import unescape

import httpx
import msgspec
import pytest

from orchestra.config import ServerSettings, Settings, UiSettings
from orchestra.web import task_pages
from orchestra.web.headers import SECURITY_HEADERS
from tests.conftest import Service, StartService, make_keys
from tests.fixtures.fake_ollama import Failure, FakeOllama

SAME_SITE = {"sec-fetch-site": "same-origin"}
#: What htmx sends with a boosted form.
HTMX = {**SAME_SITE, "hx-request": "true", "hx-boosted": "true"}


# -- addresses ---------------------------------------------------------------------------------


async def test_a_forms_answer_keeps_the_address_and_its_post_url_redirects_on_get(
    service: Service,
) -> None:
    """A 422 (or any page answering a POST) tells htmx not to record the POST's URL; a GET of
    any such URL (a reload, Back) goes to the page the form belongs to."""
    refused = await service.client.post("/ui/templates/summarize/run", data={}, headers=HTMX)
    assert refused.status_code == 422
    assert refused.headers["hx-push-url"] == "false"
    checked = await service.client.post("/ui/providers/check", headers=HTMX)
    assert checked.status_code == 200 and checked.headers["hx-push-url"] == "false"
    # Pages answering a GET are recorded as usual.
    assert "hx-push-url" not in (await service.client.get("/ui/providers")).headers
    for path, target in (
        ("/ui/templates/summarize/run", "/ui/templates/summarize"),
        ("/ui/tasks/bulk", "/ui/tasks"),
        ("/ui/tasks/7/cancel", "/ui/tasks/7"),
        ("/ui/tasks/7/retry", "/ui/tasks/7"),
        ("/ui/providers/check", "/ui/providers"),
        ("/ui/logout", "/ui/"),
    ):
        answer = await service.client.get(path)
        assert answer.status_code == 303, (path, answer.status_code, answer.text[:200])
        assert answer.headers["location"] == target, path


async def test_empty_filter_fields_are_dropped_from_the_address(service: Service) -> None:
    answer = await service.client.get(
        "/ui/tasks?status=cancelled&template=&model=&since=&from=&to=&q=%20"
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/tasks?status=cancelled"
    assert (await service.client.get("/ui/tasks?status=cancelled")).status_code == 200
    everything = await service.client.get("/ui/tasks?status=&template=")
    assert everything.headers["location"] == "/ui/tasks"


async def test_a_bulk_actions_notice_shows_once_and_never_from_the_address(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models.clear()  # every call fails: the task fails
    task = await service.submit("summarize", text="again")
    assert (await service.wait(task["id"], 30))["status"] == "failed"
    fake_ollama.models.add("llama3.2")
    done = await service.client.post(
        "/ui/tasks/bulk",
        data={"action": "retry", "id": [str(task["id"])], "status": "failed"},
        headers=SAME_SITE,
    )
    assert done.status_code == 303
    assert done.headers["location"] == "/ui/tasks?status=failed"  # no count in the address
    shown = await service.client.get(done.headers["location"])
    assert "Queued again: 1 task." in shown.text
    again = await service.client.get(done.headers["location"])  # a reload
    assert 'class="notice"' not in again.text
    forged = await service.client.get("/ui/tasks", params={"done": "cancel", "n": "9999"})
    assert 'class="notice"' not in forged.text


async def test_a_bulk_actions_notice_says_how_many_it_skipped_and_why(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models.clear()  # every call fails: the task fails
    failed = await service.submit("summarize", text="fails")
    assert (await service.wait(failed["id"], 30))["status"] == "failed"
    fake_ollama.models.add("llama3.2")
    done = [await service.submit("summarize", text=f"succeeds {i}") for i in range(2)]
    for task in done:
        assert (await service.wait(task["id"]))["status"] == "succeeded"
    ids = [str(t["id"]) for t in (failed, *done)]

    async def notice_after(action: str) -> str:
        answer = await service.client.post(
            "/ui/tasks/bulk", data={"action": action, "id": ids}, headers=SAME_SITE
        )
        assert answer.status_code == 303, answer.text
        shown = await service.client.get(answer.headers["location"])
        notice = re.search(r'<p class="notice" role="status">([^<]*)</p>', shown.text)
        assert notice, shown.text
        return unescape(notice.group(1))

    assert await notice_after("retry") == (
        "Queued again: 1 task; 2 skipped (not failed or cancelled)."
    )
    assert (await service.wait(failed["id"]))["status"] == "succeeded"
    assert await notice_after("cancel") == (
        "Cancelled: 0 tasks; 3 skipped (not queued or running)."
    )


# -- errors ------------------------------------------------------------------------------------


async def test_unknown_dashboard_addresses_are_html_pages_and_the_apis_stay_json(
    service: Service,
) -> None:
    for method, path, status in (
        ("GET", "/ui/nonexistent", 404),
        ("GET", "/ui/tasks/abc", 404),
        ("GET", "/ui/batches/abc", 404),
        ("GET", "/ui/tasks/1/nothing", 404),
        ("POST", "/ui/tasks", 405),
        ("DELETE", "/ui/templates/summarize/run", 405),
    ):
        answer = await service.client.request(method, path, headers=SAME_SITE)
        assert answer.status_code == status, (path, answer.text[:200])
        if "%00" in path and method != "HEAD":
            assert answer.headers["content-type"].startswith("text/html"), (path, answer.text)
            assert "holds a NUL character" in answer.text, answer.text
        assert answer.headers["content-type"].startswith("text/html"), path
        assert f"Error {status}" in answer.text and 'href="/ui/tasks"' in answer.text, path
        if status == 404:  # the address named, not a bare "Not Found"
            said = re.search(r'<p id="error-message">(.*?)</p>', answer.text)
            assert said and unescape(said[1]) == f"there is no page at {path}", (path, said)
    api = await service.client.get("/api/v1/nonexistent")
    assert api.status_code == 404 and api.headers["content-type"] == "application/json"
    # Behind a proxy, the page's links carry its prefix.
    proxied = await service.client.get(
        "/ui/nonexistent", headers={"x-forwarded-prefix": "/orchestra"}
    )
    assert 'href="/orchestra/ui/tasks"' in proxied.text


async def test_error_pages_carry_the_security_headers_and_server_timing(
    service: Service,
) -> None:
    """Routing's own 404 and 405 (the gate never runs), a handler's 404 and 400, and the
    gate's own refusal: each answer carries what every dashboard answer does, once."""
    wrong: list[tuple[str, str, str, list[str]]] = []
    for method, path, status, headers in (
        ("GET", "/ui/nope", 404, SAME_SITE),
        ("DELETE", "/ui/tasks", 405, SAME_SITE),
        ("GET", "/ui/tasks/9999999", 404, SAME_SITE),
        ("GET", "/ui/tasks?status=bogus", 400, SAME_SITE),
        # A NUL anywhere in the address: refused before routing, as the dashboard's page.
        ("GET", "/ui/tasks?q=%00", 400, SAME_SITE),
        ("GET", "/ui/%00", 400, SAME_SITE),
        ("GET", "/ui/live?seen=%00", 400, SAME_SITE),
        ("HEAD", "/ui/tasks?q=%00", 400, SAME_SITE),
        ("POST", "/ui/tasks/1/cancel?x=%00", 400, SAME_SITE),
        ("POST", "/ui/tasks/1/cancel", 403, {"sec-fetch-site": "cross-site"}),
        ("GET", "/ui/static/dashboard.css", 200, SAME_SITE),
        ("GET", "/ui/tasks", 200, SAME_SITE),
    ):
        answer = await service.client.request(method, path, headers=headers)
        assert answer.status_code == status, (path, answer.text[:200])
        if "%00" in path and method != "HEAD":
            assert answer.headers["content-type"].startswith("text/html"), (path, answer.text)
            assert "holds a NUL character" in answer.text, answer.text
        for name, value in SECURITY_HEADERS.items():
            if answer.headers.get_list(name) != [value]:
                wrong.append((method, path, name, answer.headers.get_list(name)))
        timing = answer.headers.get_list("server-timing")
        if len(timing) != 1 or not re.fullmatch(r"app;dur=\d+\.\d\d", timing[0]):
            wrong.append((method, path, "server-timing", timing))
    assert wrong == []


async def test_unknown_addresses_under_a_configured_path_and_root_path_are_html(
    settings: Settings, start_service: StartService
) -> None:
    moved = msgspec.structs.replace(
        settings,
        ui=UiSettings(path="/console"),
        server=msgspec.structs.replace(settings.server, root_path="/o"),
    )
    assert isinstance(moved.server, ServerSettings)
    async with start_service(moved) as svc:
        answer = await svc.client.get("/console/nope")
        assert answer.status_code == 404 and "text/html" in answer.headers["content-type"]
        assert 'href="/o/console/tasks"' in answer.text
        assert (await svc.client.get("/ui/nope")).headers["content-type"] == "application/json"
        refused = await svc.client.get("/console/tasks?q=%00")
        assert refused.status_code == 400 and "text/html" in refused.headers["content-type"]
        assert 'href="/o/console/tasks"' in refused.text and "NUL" in refused.text
        assert refused.headers["x-frame-options"] == "DENY"
        api = await svc.client.get("/ui/tasks?q=%00")  # not the dashboard's: the API's JSON
        assert api.status_code == 400 and api.json()["fields"][0]["field"] == "q"


# -- scheduled tasks ---------------------------------------------------------------------------


async def test_delayed_tasks_show_when_they_run_and_are_not_counted_as_ready(
    service: Service,
) -> None:
    ids = []
    for _ in range(3):
        made = await service.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "tomorrow"}, "delay": 86400},
        )
        assert made.status_code == 201, made.text
        ids.append(made.json()["id"])
    overview = (await service.client.get("/ui/")).text
    assert re.search(r'id="queue-depth">3<', overview)
    assert re.search(r'id="queue-ready">0<', overview), overview
    assert re.search(r'id="queue-scheduled">3<', overview)
    rows = (await service.client.get("/ui/tasks")).text
    assert len(re.findall(r'class="due">due in 23 h 59 min<', rows)) == 3, rows
    page = (await service.client.get(f"/ui/tasks/{ids[0]}")).text
    due = re.search(r'<dt>Scheduled for</dt><dd id="due"><time datetime="([^"]+)"', page)
    api = (await service.client.get(f"/api/v1/tasks/{ids[0]}")).json()
    assert due and due.group(1) == api["next_run_at"]
    assert "(in 23 h 59 min)" in page


# -- the task list -----------------------------------------------------------------------------


async def test_failed_rows_show_their_error_and_later_pages_link_to_the_newest(
    service: Service, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_pages, "PAGE_SIZE", 1)
    fake_ollama.models.clear()  # every call fails
    failed = [await service.submit("summarize", text=f"f{i}") for i in range(2)]
    for task in failed:
        assert (await service.wait(task["id"], 30))["status"] == "failed"
    error = (await service.client.get(f"/api/v1/tasks/{failed[1]['id']}")).json()["error"]
    first = (await service.client.get("/ui/tasks?status=failed")).text
    cell = re.search(r'<span class="row-error error-text" title="([^"]*)">([^<]*)<', first)
    assert cell, first
    assert unescape(cell.group(1)) == f"{error['type']}: {error['message']}"
    assert unescape(cell.group(2)).startswith(f"{error['type']}: ")
    assert 'rel="first"' not in first
    older = re.search(r'<a href="([^"]+)" rel="next"[^>]*>', first)
    assert older
    second = (await service.client.get(unescape(older.group(1)))).text
    newest = re.search(r'<a href="([^"]+)" rel="first"[^>]*>', second)
    assert newest and unescape(newest.group(1)) == "/ui/tasks?status=failed"


async def test_direction_controls_in_values_are_shown_escaped(service: Service) -> None:
    text = "say \u202edesrever\u202c and \u2067isolated\u2069"
    task = await service.submit("summarize", text=text)
    await service.wait(task["id"])
    page = (await service.client.get(f"/ui/tasks/{task['id']}")).text
    params = re.search(r'<pre class="output" id="params">([^<]*)</pre>', page, re.S)
    assert params, page
    shown = unescape(params.group(1))
    assert "\\u202edesrever\\u202c" in shown and "\\u2067isolated\\u2069" in shown
    assert not re.search("[\u202a-\u202e\u2066-\u2069]", page)


async def test_direction_controls_in_an_attempts_error_are_shown_escaped(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.failure = Failure(400, "model \u202edesrever\u202c", times=1)  # not retried
    task = await service.submit("summarize", text="fails")
    assert (await service.wait(task["id"]))["status"] == "failed"
    page = (await service.client.get(f"/ui/tasks/{task['id']}")).text
    attempts = page.split('id="attempts-h"', 1)[1]
    assert "\\u202edesrever\\u202c" in unescape(attempts)
    assert not re.search("[\u202a-\u202e\u2066-\u2069]", page)


#: A template whose free texts (description, a parameter's, a step's model) hold direction
#: controls.
REVERSED_TEMPLATE = """\
name: reversed
description: "say \\u202eRTL\\u202c here"
parameters:
  text: {type: string, required: true, description: "the \\u2067text\\u2069"}
steps:
  - id: ask
    model: "m\\u202e"
    prompt: '{{ params.text }}'
"""


async def test_direction_controls_in_free_text_fields_are_shown_escaped(service: Service) -> None:
    """A task's model (free text from anyone who may submit) and a template's description
    were shown as they were, reversing what followed them, where a task's error was escaped."""
    bidi = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
    body = {"template": "summarize", "params": {"text": "m"}, "model": "x\u202e"}
    task = (await service.client.post("/api/v1/tasks", json=body)).json()
    await service.wait(task["id"])
    registered = await service.client.post("/api/v1/templates", content=REVERSED_TEMPLATE)
    assert registered.status_code == 201, registered.text
    schedule = {"name": "s", "template": "summarize", "params": {"text": "t"}, "model": "y\u202e"}
    made = await service.client.post("/api/v1/schedules", json={**schedule, "every": "1h"})
    assert made.status_code == 201, made.text
    for path, shown in (
        (f"/ui/tasks/{task['id']}", "x\\u202e"),
        ("/ui/tasks", "x\\u202e"),
        ("/ui/templates/reversed", "say \\u202eRTL\\u202c here"),
        ("/ui/templates/reversed", "the \\u2067text\\u2069"),
        ("/ui/templates/reversed", "m\\u202e"),
        ("/ui/templates", "say \\u202eRTL\\u202c here"),
        (f"/ui/schedules/{made.json()['id']}", "y\\u202e"),
    ):
        page = (await service.client.get(path)).text
        assert shown in unescape(page), (path, shown)
        assert not bidi.search(page), (path, bidi.findall(page))


# -- API keys ----------------------------------------------------------------------------------


async def test_the_first_key_is_made_only_after_a_warning_is_confirmed(service: Service) -> None:
    page = (await service.client.get("/ui/keys")).text
    assert 'id="first-key-warning"' in page and "401" in page
    refused = await service.client.post(
        "/ui/keys", data={"name": "first", "scope": "admin"}, headers=SAME_SITE
    )
    assert refused.status_code == 422 and "confirm" in refused.text
    assert (await service.client.get("/api/v1/tasks")).status_code == 200  # still open
    made = await service.client.post(
        "/ui/keys",
        data={"name": "first", "scope": "admin", "confirm": "auth-on"},
        headers=SAME_SITE,
    )
    assert made.status_code == 200
    assert 'id="auth-on"' in made.text and "open access" not in made.text
    assert "Log in with this key" in made.text
    assert (await service.client.get("/api/v1/tasks")).status_code == 401


async def test_revoking_a_key_asks_first(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    keys = await make_keys(db_url, "admin", "read")
    async with start_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, headers=SAME_SITE) as client:
            login = await client.post("/ui/login", data={"key": keys["admin"], "next": "/ui/"})
            assert login.status_code == 303
            page = (await client.get("/ui/keys")).text
            assert 'id="first-key-warning"' not in page  # keys exist already
            assert "<form" not in page.split('id="list-h"')[1]  # no one-click revoke
            links = re.findall(r'href="(/ui/keys/[^"/]+/revoke)"', page)
            assert len(links) == 2
            pages = {link: (await client.get(link)).text for link in links}
            [read_link] = [link for link, text in pages.items() if "k-read?" in text]
            confirm = pages[read_link]
            assert "Revoke the key k-read?" in confirm and "401" in confirm
            assert "you will be logged out" not in confirm
            done = await client.post(read_link)
            assert done.status_code == 303
            listed = (await client.get("/ui/keys")).text
            assert len(re.findall(r'href="/ui/keys/[^"/]+/revoke"', listed)) == 1
            own = re.findall(r'href="(/ui/keys/[^"/]+/revoke)"', listed)[0]
            assert "you will be logged out" in (await client.get(own)).text


async def test_too_many_requests_under_the_dashboard_get_its_page_and_headers(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    """The rate limiter runs before any route: its 429 under the dashboard's path is the
    dashboard's HTML error page, with the security headers and when to come back."""
    keys = await make_keys(db_url, "read")
    limited = msgspec.structs.replace(
        settings, auth=msgspec.structs.replace(settings.auth, rate_limit_per_minute=2)
    )
    async with start_service(limited) as svc:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, headers=SAME_SITE) as client:
            login = await client.post("/ui/login", data={"key": keys["read"], "next": "/ui/"})
            assert login.status_code == 303
            codes = [(await client.get("/ui/tasks")).status_code for _ in range(3)]
            assert codes[-1] == 429, codes
            refused = await client.get("/ui/tasks")
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("text/html")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    for name, value in SECURITY_HEADERS.items():
        assert refused.headers[name] == value, name
    assert "<h1" in refused.text and "429" in refused.text


async def test_head_of_a_page_answers_as_its_get_without_the_body(service: Service) -> None:
    """Uptime monitors ask with HEAD: a dashboard page and /metrics answer it as their GET
    does, without the body (it was 405); an event stream answers its headers and ends."""
    for path in ("/ui/", "/ui/schedules", "/ui/batches", "/ui/tasks?status=failed", "/metrics"):
        got = await service.client.get(path)
        head = await service.client.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    missing = await service.client.head("/ui/no-such-page")
    assert missing.status_code == 404
    async with asyncio.timeout(10):
        live = await service.client.head("/ui/live")
    assert (live.status_code, live.content) == (200, b"")
    assert live.headers["content-type"].startswith("text/event-stream")
