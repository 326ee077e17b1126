"""The dashboard over real HTTP (no browser): pages, access, CSRF, sub-paths, forms, bulk.

What needs a browser (live updates, scripts, the CSP in force) is in test_dashboard_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import unescape

import httpx
import msgspec
import pytest

from orchestra.config import ServerSettings, Settings, UiSettings
from tests.conftest import Service, StartService, make_keys, with_provider, with_workers
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.servers import free_port, wait_until

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
SAME_SITE = {"sec-fetch-site": "same-origin"}


@asynccontextmanager
async def _login(svc: Service, token: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client holding a dashboard session for ``token``."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=30, headers=SAME_SITE) as client:
        answer = await client.post("/ui/login", data={"key": token, "next": "/ui/tasks"})
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/ui/tasks"
        yield client


def _links(html: str) -> list[str]:
    """Every URL a page links to, loads or calls (but in-page anchors and data: URLs)."""
    found = [
        unescape(h)
        for h in re.findall(r'(?:href|action|src|sse-connect|hx-get|hx-post)="([^"]+)"', html)
    ]
    return [link for link in found if not link.startswith(("#", "data:"))]


@pytest.fixture
async def keyed(
    settings: Settings, db_url: str, start_service: StartService
) -> AsyncIterator[tuple[Service, dict[str, str]]]:
    """A service whose database has a read, a submit and an admin key."""
    tokens = await make_keys(db_url, "read", "submit", "admin")
    async with start_service(settings) as svc:
        yield svc, tokens


async def test_every_page_renders_open_on_loopback_with_its_security_headers(
    service: Service,
) -> None:
    task = await service.submit("summarize", text="hello")
    await service.wait(task["id"])
    for path in (
        "/ui/",
        "/ui/tasks",
        f"/ui/tasks/{task['id']}",
        "/ui/templates",
        "/ui/templates/summarize",
        "/ui/templates/new",
        "/ui/templates/summarize/edit",
        "/ui/providers",
        "/ui/keys",
        "/ui/login",
    ):
        page = await service.client.get(path)
        assert page.status_code == 200, (path, page.text[:500])
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["cache-control"] == "no-store"
        assert "app;dur=" in page.headers["server-timing"]
        assert "<script>" not in page.text.replace("<script src=", "")  # no inline script


async def test_static_files_are_served_from_the_package(service: Service) -> None:
    for name in ("vendor/htmx.min.js", "vendor/sse.min.js", "vendor/pico.min.css", "dashboard.js"):
        answer = await service.client.get(f"/ui/static/{name}")
        assert answer.status_code == 200, name
        assert len(answer.content) > 1000


async def test_values_from_tasks_are_text_never_markup(service: Service) -> None:
    task = await service.submit("summarize", text=HOSTILE)
    done = await service.wait(task["id"])
    assert HOSTILE in str(done["result"])  # the fake model echoed it into the result
    page = (await service.client.get(f"/ui/tasks/{task['id']}")).text
    assert "<script>window.pwned" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page


async def test_a_stranger_is_sent_to_the_login_page_and_a_bad_key_is_refused(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, _ = keyed
    page = await svc.client.get("/ui/tasks", params={"status": "failed"})
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login?next=%2Fui%2Ftasks%3Fstatus%3Dfailed"
    htmx = await svc.client.get("/ui/overview/body", headers={"hx-request": "true"})
    assert htmx.status_code == 401 and htmx.headers["hx-redirect"].startswith("/ui/login")
    # A write without a session, from a program (no htmx): the API's error body, whole.
    post = await svc.client.post("/ui/tasks/1/cancel", headers=SAME_SITE)
    assert post.status_code == 401
    assert post.json() == {
        "status": 401,
        "code": "unauthorized",
        "message": "log in first",
        "fields": [],
    }
    wrong = await svc.client.post("/ui/login", data={"key": "orc_nothere_" + "x" * 43})
    assert wrong.status_code == 401
    assert "not valid" in wrong.text
    assert "set-cookie" not in wrong.headers


async def test_login_sets_a_lax_http_only_cookie_and_logout_ends_it(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    client = httpx.AsyncClient(base_url=svc.url, headers=SAME_SITE)
    async with client:
        answer = await client.post("/ui/login", data={"key": tokens["admin"], "next": "/ui/"})
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and "Path=/ui" in cookie
        assert "Max-Age=43200" in cookie
        assert "Secure" not in cookie  # plain HTTP here
        assert tokens["admin"] not in cookie  # the cookie holds the key's id, never its secret
        assert (await client.get("/ui/tasks")).status_code == 200
        out = await client.post("/ui/logout")
        assert out.status_code == 303
        assert (await client.get("/ui/tasks")).status_code == 303


async def test_a_login_behind_https_gets_a_secure_cookie(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    answer = await svc.client.post(
        "/ui/login",
        data={"key": tokens["read"]},
        headers={**SAME_SITE, "x-forwarded-proto": "https"},
    )
    assert "Secure" in answer.headers["set-cookie"]


async def test_login_never_redirects_to_another_site(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    for target in ("https://evil.example/", "//evil.example/ui", "/api/v1/tasks"):
        answer = await svc.client.post(
            "/ui/login", data={"key": tokens["read"], "next": target}, headers=SAME_SITE
        )
        assert answer.headers["location"] == "/ui/"


async def test_a_forged_or_expired_session_cookie_is_refused(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    async with _login(svc, tokens["admin"]) as client:
        value = client.cookies["orchestra_session"]
        key_id, _, rest = value.partition(".")
        forged = httpx.AsyncClient(
            base_url=svc.url, cookies={"orchestra_session": "aaaaaaaa." + rest}
        )
        async with forged:
            assert (await forged.get("/ui/tasks")).status_code == 303
        assert (await client.get("/ui/tasks")).status_code == 200


async def test_revoking_a_key_ends_its_dashboard_sessions(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    async with _login(svc, tokens["admin"]) as admin, _login(svc, tokens["read"]) as reader:
        assert (await reader.get("/ui/tasks")).status_code == 200
        keys = (await admin.get("/ui/keys")).text
        read_id = re.search(r"<td>k-read</td><td><code>([a-z0-9]{8})</code>", keys)
        assert read_id, keys
        revoked = await admin.post(f"/ui/keys/{read_id.group(1)}/revoke")
        assert revoked.status_code == 303
        assert (await reader.get("/ui/tasks")).status_code == 303


async def test_a_read_key_sees_no_write_controls_and_its_writes_get_403(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    task = (
        await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "x"}},
            headers={"authorization": f"Bearer {tokens['submit']}"},
        )
    ).json()
    async with _login(svc, tokens["read"]) as reader:
        tasks_page = (await reader.get("/ui/tasks")).text
        assert "Cancel selected" not in tasks_page and 'name="id"' not in tasks_page
        template_page = (await reader.get("/ui/templates/summarize")).text
        assert 'id="run-form"' not in template_page
        assert "API keys" not in tasks_page
        for path, data in (
            (f"/ui/tasks/{task['id']}/cancel", {}),
            ("/ui/tasks/bulk", {"action": "cancel", "scope": "matching"}),
            ("/ui/templates/summarize/run", {"text": "x"}),
            ("/ui/templates", {"yaml": "name: x"}),
            ("/ui/keys", {"name": "mine", "scope": "admin"}),
        ):
            answer = await reader.post(path, data=data)
            assert answer.status_code == 403, (path, answer.status_code)
        assert (await reader.get("/ui/keys")).status_code == 403


async def test_cross_site_writes_are_refused_even_with_a_valid_session(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    async with _login(svc, tokens["admin"]) as admin:
        for headers in (
            {"sec-fetch-site": "cross-site"},
            {"sec-fetch-site": "same-site"},
            {"sec-fetch-site": "", "origin": "https://evil.example"},
        ):
            if not headers["sec-fetch-site"]:
                del headers["sec-fetch-site"]
                admin.headers.pop("sec-fetch-site", None)
            answer = await admin.post(
                "/ui/keys", data={"name": "x", "scope": "admin"}, headers=headers
            )
            assert answer.status_code == 403, headers
        keys = (await admin.get("/ui/keys")).text
        assert "<td>x</td>" not in keys


async def test_links_follow_the_proxy_prefix(service: Service) -> None:
    page = await service.client.get("/ui/tasks", headers={"x-forwarded-prefix": "/orchestra/"})
    links = _links(page.text)
    assert links and all(
        link.startswith("/orchestra/") or link.startswith("data:") for link in links
    ), [link for link in links if not link.startswith("/orchestra/")]
    # A header that is not a plain path is ignored.
    odd = await service.client.get("/ui/tasks", headers={"x-forwarded-prefix": '/"><script>'})
    assert all(link.startswith(("/ui/", "/schema")) for link in _links(odd.text))


async def test_root_path_prefixes_links_and_the_login_redirect(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    await make_keys(db_url, "admin")
    behind = msgspec.structs.replace(
        settings,
        server=ServerSettings(root_path="/orch"),
        ui=UiSettings(path="/dash"),
    )
    async with start_service(behind) as svc:
        answer = await svc.client.get("/dash/tasks")
        assert answer.headers["location"] == "/orch/dash/login?next=%2Forch%2Fdash%2Ftasks"
        login = await svc.client.get("/dash/login")
        assert all(
            link.startswith("/orch/") or link.startswith("data:") for link in _links(login.text)
        )


async def test_the_run_form_shows_a_422_beside_its_field_and_submits_when_fixed(
    service: Service,
) -> None:
    page = await service.client.get("/ui/templates/summarize")
    assert 'name="text"' in page.text and 'name="sentences"' in page.text
    bad = await service.client.post(
        "/ui/templates/summarize/run", data={"text": "", "sentences": "0"}, headers=SAME_SITE
    )
    assert bad.status_code == 422
    errors = dict(
        re.findall(r'id="param-([a-z_]+)-error" class="error field-error">([^<]+)<', bad.text)
    )
    assert "text" in errors and "required" in errors["text"]
    assert "sentences" in errors
    good = await service.client.post(
        "/ui/templates/summarize/run", data={"text": "fine", "sentences": "5"}, headers=SAME_SITE
    )
    assert good.status_code == 303
    task_id = int(good.headers["location"].rsplit("/", 1)[1])
    done = await service.wait(task_id)
    assert done["params"]["sentences"] == 5


async def test_the_run_form_says_which_json_does_not_parse_and_keeps_it_as_typed(
    service: Service,
) -> None:
    """An object field's bad JSON was passed on as text: the form said "'{...}' is not of
    type 'object'", and showed the text JSON-quoted, so each try quoted it once more. Its
    heading counted the parameters' problems alone, not the priority's."""
    yaml = (
        "name: withmeta\nparameters:\n  meta: {type: object, default: {}}\n"
        "  n: {type: integer, minimum: 1}\n"
        "steps:\n  - id: s\n    kind: render\n    text: '{{ params.meta }}'\n"
    )
    made = await service.client.post("/api/v1/templates", content=yaml)
    assert made.status_code == 201, made.text
    typed = '{"k": 1,}'
    bad = await service.client.post(
        "/ui/templates/withmeta/run",
        data={"meta": typed, "n": "0", "opt.priority": "5000"},
        headers=SAME_SITE,
    )
    assert bad.status_code == 422
    found = re.findall(r'id="param-([a-z_]+)-error" class="error field-error">([^<]+)<', bad.text)
    errors = {name: unescape(text) for name, text in found}
    assert errors["meta"].startswith("not valid JSON: "), errors
    assert "line 1 column 9" in errors["meta"], errors
    assert "minimum" in errors["n"] or "at least" in errors["n"], errors
    [shown] = re.findall(r'<textarea[^>]*name="meta"[^>]*>([^<]*)</textarea>', bad.text)
    assert unescape(shown).strip() == typed  # as typed, not JSON-quoted
    # JSON of the wrong type is shown as typed too: a JSON string kept its quotes (it came
    # back bare, and sent again unchanged made an object of it).
    for other in ('"just a string"', "[1,2]"):
        again = await service.client.post(
            "/ui/templates/withmeta/run", data={"meta": other, "n": "1"}, headers=SAME_SITE
        )
        assert again.status_code == 422
        [shown] = re.findall(r'<textarea[^>]*name="meta"[^>]*>([^<]*)</textarea>', again.text)
        assert unescape(shown).strip() == other
    assert "2 invalid parameter(s)" in bad.text and "priority must be" in bad.text
    assert (await service.client.get("/api/v1/tasks")).json()["items"] == []


async def test_recent_failures_are_the_latest_to_fail_not_the_latest_made(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """The overview listed the failed tasks with the highest ids: an old task retried that
    failed again a moment ago (or a delayed one, a schedule's) never showed."""
    fake_ollama.failure = Failure(400, "bad request: no such option")
    made = []
    for i in range(6):  # one after another: they fail in this order
        made.append(await service.submit("summarize", text=f"fails {i}"))
        assert (await service.wait(made[-1]["id"]))["status"] == "failed"
    oldest = made[0]["id"]
    retried = await service.client.post(f"/api/v1/tasks/{oldest}/retry")
    assert retried.status_code == 200, retried.text
    await wait_until(lambda: task_finished_again(service, oldest), timeout=20)
    page = (await service.client.get("/ui/overview/body")).text
    listed = [int(n) for n in re.findall(r'id="failure-link-(\d+)"', page)]
    assert listed[0] == oldest, listed
    assert listed == [oldest, *[t["id"] for t in reversed(made[2:])]], listed


async def task_finished_again(service: Service, task_id: int) -> bool:
    task = (await service.client.get(f"/api/v1/tasks/{task_id}")).json()
    return bool(task["status"] == "failed" and len(task["attempts"]) == 2)


async def test_run_again_fills_the_form_with_the_tasks_parameters(service: Service) -> None:
    task = await service.submit("summarize", text="remember me", sentences=7)
    page = (await service.client.get("/ui/templates/summarize", params={"from": task["id"]})).text
    assert "remember me" in page
    assert 'value="7"' in page


async def test_the_editor_reports_line_and_column_then_registers_a_version(
    service: Service,
) -> None:
    broken = "name: mine\nsteps:\n  - id: a\n    txet: hi\n"
    answer = await service.client.post(
        "/ui/templates/validate", data={"yaml": broken}, headers=SAME_SITE
    )
    assert answer.status_code == 200
    assert re.search(r'data-line="4" data-column="5"', answer.text), answer.text
    good = (
        "name: mine\nparameters:\n  x: {type: string}\n"
        "steps:\n  - id: a\n    kind: render\n    text: '{{ params.x }}'\n"
    )
    ok = await service.client.post("/ui/templates/validate", data={"yaml": good}, headers=SAME_SITE)
    assert 'id="valid"' in ok.text
    saved = await service.client.post("/ui/templates", data={"yaml": good}, headers=SAME_SITE)
    assert saved.status_code == 303
    assert saved.headers["location"] == "/ui/templates/mine?version=1"
    api = await service.client.get("/api/v1/templates/mine")
    assert api.status_code == 200


async def test_bulk_cancel_of_a_filter_states_n_and_cancels_only_those(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 30  # nothing finishes while the test runs
    idle = with_workers(settings, concurrency=1)
    async with start_service(idle) as svc:
        mine = [await svc.submit("summarize", text=f"bulk {i}") for i in range(5)]
        other = await svc.submit("translate", text="keep", target_language="French")
        await wait_until(lambda: fake_ollama.in_flight == 1)
        confirm = await svc.client.get(
            "/ui/tasks/confirm", params={"action": "cancel", "template": "summarize"}
        )
        assert confirm.status_code == 200
        assert "Cancel 5 tasks?" in confirm.text
        done = await svc.client.post(
            "/ui/tasks/bulk",
            data={"action": "cancel", "scope": "matching", "template": "summarize"},
            headers=SAME_SITE,
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/ui/tasks?template=summarize"
        said = (await svc.client.get(done.headers["location"])).text
        # The running one is asked to stop; the four queued ones are cancelled at once.
        assert "Cancelled: 4 tasks; 1 running asked to stop (one may still finish first)." in said
        for task in mine:
            assert (await svc.wait(task["id"]))["status"] == "cancelled"
        assert (await svc.client.get(f"/api/v1/tasks/{other['id']}")).json()["status"] in (
            "queued",
            "running",
        )
        await svc.client.post(f"/api/v1/tasks/{other['id']}/cancel")


async def test_bulk_retry_of_selected_rows(service: Service, fake_ollama: FakeOllama) -> None:
    fake_ollama.models.clear()  # every call fails: the tasks fail
    failed = [await service.submit("summarize", text=f"r{i}") for i in range(2)]
    for task in failed:
        assert (await service.wait(task["id"], 30))["status"] == "failed"
    fake_ollama.models.add("llama3.2")
    answer = await service.client.post(
        "/ui/tasks/bulk",
        data={"action": "retry", "id": [str(t["id"]) for t in failed]},
        headers=SAME_SITE,
    )
    assert answer.status_code == 303
    assert "Queued again: 2 tasks." in (await service.client.get("/ui/tasks")).text
    for task in failed:
        assert (await service.wait(task["id"]))["status"] == "succeeded"


async def test_task_filters_and_keyset_pages(service: Service) -> None:
    ids = [(await service.submit("summarize", text=f"needle-{i}"))["id"] for i in range(3)]
    await service.submit("summarize", text="haystack")
    page = (await service.client.get("/ui/tasks", params={"q": "needle"})).text
    shown = [int(i) for i in re.findall(r'href="/ui/tasks/(\d+)"', page)]
    assert shown == sorted(ids, reverse=True)
    bad = await service.client.get("/ui/tasks", params={"status": "bogus"})
    assert bad.status_code == 400 and "not a task status" in bad.text


async def test_a_time_window_the_filter_does_not_offer_is_refused_not_ignored(
    service: Service,
) -> None:
    # Ignored, "since=20m" meant no bound at all: a bulk cancel's confirmation then covered
    # every task.
    await service.submit("summarize", text="old enough")
    for path in ("/ui/tasks", "/ui/tasks/confirm"):
        bad = await service.client.get(path, params={"action": "cancel", "since": "20m"})
        assert bad.status_code == 400, (path, bad.text)
        assert "since" in bad.text and "15m" in bad.text
    shown = await service.client.get("/ui/tasks", params={"since": "15m"})
    assert shown.status_code == 200


async def test_keys_page_shows_a_new_token_once(service: Service) -> None:
    made = await service.client.post(
        "/ui/keys", data={"name": "ci", "scope": "read", "confirm": "auth-on"}, headers=SAME_SITE
    )
    assert made.status_code == 200
    token = re.search(r'id="new-token">(orc_[^<]+)<', made.text)
    assert token
    # A key exists now: the open dashboard asks for one, as the API does.
    assert (await service.client.get("/ui/keys")).status_code == 303
    async with _login(service, token.group(1)) as reader:
        assert (await reader.get("/ui/tasks")).status_code == 200
        assert (await reader.get("/ui/keys")).status_code == 403  # a read key


async def test_an_unknown_task_is_an_html_404(service: Service) -> None:
    answer = await service.client.get("/ui/tasks/999999")
    assert answer.status_code == 404
    assert "text/html" in answer.headers["content-type"]
    assert "no task with id 999999" in answer.text


async def test_the_overview_shows_queue_workers_chart_providers_and_failures_with_their_errors(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama
) -> None:
    """Page 1 as served: queue depth and its oldest task's age, busy slots, the last hour as
    an inline SVG, each provider's availability with the reason when one is down, and the
    recent failures with their errors. Page 5: the chain and the entry serving now."""
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    one = with_provider(with_workers(settings, concurrency=1), "spare", kind="ollama", url=down)
    one = msgspec.structs.replace(
        one, models={**one.models, "fast": ["spare/llama3.2", "ollama/llama3.2"]}
    )
    async with start_service(one) as svc:
        fake_ollama.failure = Failure(400, "the prompt is too long", times=1)
        failed = await svc.submit("summarize", text="doomed")
        assert (await svc.wait(failed["id"]))["status"] == "failed"
        fake_ollama.latency = 60  # the next task holds the only slot; two more wait
        held = [await svc.submit("summarize", text=f"held {i}") for i in range(3)]
        await wait_until(lambda: fake_ollama.in_flight == 1)

        page = (await svc.client.get("/ui/")).text
        assert re.search(r'id="queue-depth">2<', page), page
        assert re.search(r'id="queue-age">\d+(\.\d+)? (ms|s)<', page)
        assert 'id="slots">1 of 1 <small class="muted">(this process)</small><' in page
        assert 'id="running-now">1<' in page
        chart = re.search(r"<svg [^>]*>(.*?)</svg>", page, re.S)
        assert chart and '<rect class="bad"' in chart.group(1)
        assert re.search(r"<title [^>]*>[^<]* UTC: 0 succeeded, 1 failed</title>", chart.group(1))
        failures = page.split('id="failures-h"', 1)[1]
        assert re.search(rf'/ui/tasks/{failed["id"]}"[^>]*>#{failed["id"]}<', failures)
        assert "the prompt is too long" in failures
        spare = re.search(r"<strong>spare</strong>.*?</li>", page, re.S)
        assert spare and "unavailable" in spare.group(0)
        reason = re.search(r'class="reason">([^<]+)<', spare.group(0))
        assert reason and reason.group(1).strip(), spare.group(0)
        ollama = re.search(r"<strong>ollama</strong>.*?</li>", page, re.S)
        assert ollama and "available" in ollama.group(0) and "unavailable" not in ollama.group(0)

        providers = (await svc.client.get("/ui/providers")).text
        fast = re.search(r"<code>fast</code>.*?</tr>", providers, re.S)
        assert fast, providers
        assert "spare/llama3.2 → ollama/llama3.2" in fast.group(0)
        assert re.search(r"<td><code>ollama/llama3.2</code><br>", fast.group(0))  # serves now
        assert "passed over: <code>spare/llama3.2</code>, " in fast.group(0)  # why not spare
        assert "Last checked: <time" in providers

        fake_ollama.latency = 0
        for task in held:
            await svc.client.post(f"/api/v1/tasks/{task['id']}/cancel")


async def test_a_task_page_shows_each_step_and_each_attempt_with_its_error(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """Page 3 as served: the prompt as rendered, provider and model, tokens, duration and the
    truncated flag of each step; every attempt with its error and times; the params."""
    fake_ollama.failure = Failure(500, "the model fell over", times=1)  # the first try fails
    fake_ollama.done_reason = "length"  # the answer was cut off at its token limit
    task = await service.submit("summarize", text="try twice")
    done = await service.wait(task["id"], 60)
    assert done["status"] == "succeeded" and len(done["attempts"]) == 2, done
    page = (await service.client.get(f"/ui/tasks/{task['id']}")).text
    step = re.search(r'<article class="step" id="step-[^"]+">(.*?)</article>', page, re.S)
    assert step, page
    assert "ollama/llama3.2" in step.group(1)  # provider and model
    assert re.search(r"\d+ tokens in, \d+ out", step.group(1))
    assert "truncated: output" in step.group(1)
    assert re.search(r'<span class="muted">\d+(\.\d+)? (ms|s)</span>', step.group(1))
    prompt = step.group(1).split("Prompt as rendered", 1)[1]
    assert "try twice" in prompt  # the text the template put into the prompt
    attempts = page.split('id="attempts-h"', 1)[1]
    rows = re.findall(r"<tr><td>(\d)</td>(.*?)</tr>", attempts, re.S)
    assert [number for number, _ in rows] == ["1", "2"]
    assert "the model fell over" in rows[0][1] and "status-failed" in rows[0][1]
    assert "status-succeeded" in rows[1][1]
    assert all(row.count("<time datetime=") == 2 for _, row in rows)  # started, finished
    assert '"text": "try twice"' in unescape(page.split('id="params"', 1)[1])
