"""What a web page in the user's browser, or a stranger who knows a key's id, can do to the
API: an anonymous caller's writes are refused from another site's page (as the dashboard's
are), a made-up token naming a key spends no budget of that key's, and a revoked key's event
stream ends. Real service over loopback HTTP, a real database, a real Chromium."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest

from orchestra.config import AuthSettings, CorsSettings, Settings
from tests.conftest import Service, StartService, make_keys, revoke_key, with_workers
from tests.fixtures.browser import new_page
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until

if TYPE_CHECKING:
    from playwright.async_api import Browser

BODY = {"template": "summarize", "params": {"text": "from a page"}}
#: What a browser sends with a request from the dashboard's own pages.
SAME_SITE = {"sec-fetch-site": "same-origin"}


async def _tasks(svc: Service) -> list[Any]:
    items: list[Any] = (await svc.client.get("/api/v1/tasks")).json()["items"]
    return items


@asynccontextmanager
async def elsewhere_page(page_html: str) -> AsyncIterator[str]:
    """The URL of a page served from 127.0.0.2: another origin, on this machine."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = page_html.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    server = await asyncio.start_server(serve, "127.0.0.2", 0)
    try:
        yield f"http://127.0.0.2:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()


# -- an anonymous caller's writes from another site's page ------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},  # no preflight
    ],
)
async def test_an_anonymous_write_from_another_sites_page_is_refused(
    service: Service, headers: dict[str, str]
) -> None:
    """On loopback with no keys, every anonymous caller is admin: a page on another site
    must not be one (it could subscribe its own server to every task's output)."""
    for method, path, body in (
        ("POST", "/api/v1/tasks", BODY),
        ("POST", "/api/v1/webhooks", {"url": "https://example.com/hook"}),
        ("POST", "/api/v1/templates/reload", None),
    ):
        answer = await service.client.request(
            method, path, content=json.dumps(body) if body else None, headers=headers
        )
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["code"] == "forbidden"
        assert "another site's web page" in answer.json()["message"]
    assert await _tasks(service) == []
    assert (await service.client.get("/api/v1/webhooks")).json()["items"] == []
    # Reading is no write: the browser keeps another site's page from seeing the answer.
    assert (await service.client.get("/api/v1/tasks", headers=headers)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a program: curl, the client
        {"Sec-Fetch-Site": "same-origin"},  # this site's own page (/schema/swagger)
        {"Sec-Fetch-Site": "none"},  # typed by the user
        {"Origin": "SELF"},  # an older browser, on this site's page
    ],
)
async def test_an_anonymous_write_from_a_program_or_this_sites_page_is_served(
    service: Service, headers: dict[str, str]
) -> None:
    if headers.get("Origin") == "SELF":
        headers = {"Origin": service.url}
    answer = await service.client.post("/api/v1/tasks", json=BODY, headers=headers)
    assert answer.status_code == 201, answer.text


async def test_a_site_the_settings_allow_and_a_caller_with_a_key_may_write(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    allowed = msgspec.structs.replace(
        settings, cors=CorsSettings(allow_origins=["https://app.example"])
    )
    async with start_service(allowed) as svc:
        from_app = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
        assert (await svc.client.post("/api/v1/tasks", json=BODY, headers=from_app)).is_success
        evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
        assert (await svc.client.post("/api/v1/tasks", json=BODY, headers=evil)).status_code == 403
    tokens = await make_keys(db_url, "submit")
    async with start_service(settings) as svc:
        keyed = {**evil, "Authorization": f"Bearer {tokens['submit']}"}
        assert (await svc.client.post("/api/v1/tasks", json=BODY, headers=keyed)).is_success


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_a_page_on_another_site_cannot_submit_through_the_browser(
    service: Service, browser: Browser
) -> None:
    """What the browser really sends: a page served from 127.0.0.2 (another origin, on this
    machine) posts a task to the service on 127.0.0.1, as a form or a fetch would."""
    page_html = f"""<!doctype html><title>elsewhere</title><script>
      fetch("{service.url}/api/v1/tasks", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}}, body: {json.dumps(json.dumps(BODY))}}})
        .then(() => document.title = "sent", () => document.title = "failed");
    </script>"""

    async with elsewhere_page(page_html) as elsewhere:
        page = await new_page(browser)
        await page.goto(elsewhere)
        await page.wait_for_function("document.title !== 'elsewhere'", timeout=15_000)
        assert await page.title() == "sent"
    assert await _tasks(service) == []


# -- the rate limit counts a key only once it is checked --------------------------------------


async def test_a_made_up_token_naming_a_key_does_not_spend_that_keys_budget(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    tokens = await make_keys(db_url, "read")
    real = tokens["read"]
    key_id = real.split("_")[1]
    limited = msgspec.structs.replace(settings, auth=AuthSettings(rate_limit_per_minute=3))
    async with start_service(limited) as svc:
        ok = {"Authorization": f"Bearer {real}"}
        assert (await svc.client.get("/api/v1/tasks", headers=ok)).status_code == 200
        fake = {"Authorization": f"Bearer orc_{key_id}_{'w' * 43}"}
        codes = [
            (await svc.client.get("/api/v1/tasks", headers=fake)).status_code for _ in range(5)
        ]
        # Counted against the address they come from: refused past its budget...
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429], codes
        # ...and the key's own budget untouched (one of three spent above).
        assert (await svc.client.get("/api/v1/tasks", headers=ok)).status_code == 200
        assert (await svc.client.get("/api/v1/tasks", headers=ok)).status_code == 200


# -- a revoked key's event stream ends --------------------------------------------------------


@pytest.fixture
async def keyed_service(
    settings: Settings, db_url: str, start_service: StartService
) -> AsyncIterator[tuple[Service, dict[str, str]]]:
    tokens = await make_keys(db_url, "read", "submit")
    async with start_service(with_workers(settings, concurrency=1)) as svc:
        yield svc, tokens


async def _streaming_task(svc: Service, fake_ollama: FakeOllama, submit: dict[str, str]) -> None:
    """Task 1, whose model streams its answer for 40 s (400 words, one every 0.1 s)."""
    fake_ollama.word_delay = 0.1
    long_text = {**BODY, "params": {"text": " ".join(f"w{i}" for i in range(400))}}
    made = await svc.client.post("/api/v1/tasks", json=long_text, headers=submit)
    assert made.status_code == 201, made.text


def _read_lines(stream: httpx.Response, seen: list[str]) -> asyncio.Task[None]:
    """Read ``stream``'s lines into ``seen`` until it ends."""

    async def read_all() -> None:
        async for line in stream.aiter_lines():
            seen.append(line)

    return asyncio.create_task(read_all())


@pytest.mark.parametrize("path", ["/api/v1/events?after=0", "/api/v1/tasks/1/events"])
async def test_a_revoked_keys_event_stream_ends(
    keyed_service: tuple[Service, dict[str, str]],
    db_url: str,
    fake_ollama: FakeOllama,
    path: str,
) -> None:
    """A stream opened before its key was revoked ends while its events still come (a task
    streaming its answer), not when they stop."""
    svc, tokens = keyed_service
    submit = {"Authorization": f"Bearer {tokens['submit']}"}
    reader = {"Authorization": f"Bearer {tokens['read']}"}
    await _streaming_task(svc, fake_ollama, submit)
    seen: list[str] = []
    async with svc.client.stream("GET", path, headers=reader, timeout=60) as stream:
        assert stream.status_code == 200
        reading = _read_lines(stream, seen)
        await wait_until(lambda: "event: step.tokens" in seen, timeout=15)
        await revoke_key(db_url, "k-read")
        await asyncio.wait_for(reading, timeout=15)
    task = (await svc.client.get("/api/v1/tasks/1", headers=submit)).json()
    assert task["status"] == "running", task  # ended by the revocation, not by the task
    assert (await svc.client.get("/api/v1/tasks", headers=reader)).status_code == 401


@pytest.mark.parametrize("ending", ["logout", "revoke"])
async def test_a_dashboard_stream_ends_with_its_session(
    keyed_service: tuple[Service, dict[str, str]],
    db_url: str,
    fake_ollama: FakeOllama,
    ending: str,
) -> None:
    """A task page's live text, followed by a session that then logs out (or whose key is
    revoked), stops coming while the task still streams."""
    svc, tokens = keyed_service
    submit = {"Authorization": f"Bearer {tokens['submit']}"}
    await _streaming_task(svc, fake_ollama, submit)
    login = await svc.client.post("/ui/login", data={"key": tokens["read"]}, headers=SAME_SITE)
    assert login.status_code == 303, login.text
    cookies = {"orchestra_session": login.cookies["orchestra_session"]}
    seen: list[str] = []
    async with (
        httpx.AsyncClient(base_url=svc.url, headers=SAME_SITE, cookies=cookies) as browser,
        browser.stream("GET", "/ui/tasks/1/live", timeout=60) as stream,
    ):
        assert stream.status_code == 200
        reading = _read_lines(stream, seen)
        await wait_until(lambda: "event: tokens" in seen, timeout=15)
        if ending == "logout":
            assert (await browser.post("/ui/logout")).status_code == 303
        else:
            await revoke_key(db_url, "k-read")
        await asyncio.wait_for(reading, timeout=15)
    task = (await svc.client.get("/api/v1/tasks/1", headers=submit)).json()
    assert task["status"] == "running", task


# -- a link from elsewhere to a dashboard page ------------------------------------------------


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_a_link_from_another_site_opens_the_page_but_its_form_changes_nothing(
    keyed_service: tuple[Service, dict[str, str]], browser: Browser
) -> None:
    """A link to a task's page in a chat, a mail or an alert (another site) landed on the
    login page although the reader was logged in (a SameSite=Strict cookie is not sent on
    such a visit). The Lax cookie is; a form on that site that posts to the dashboard is
    still refused, and changes nothing."""
    svc, tokens = keyed_service
    submit = {"Authorization": f"Bearer {tokens['submit']}"}
    made = await svc.client.post("/api/v1/tasks", json={**BODY, "delay": 3600}, headers=submit)
    task = made.json()["id"]
    page_html = f"""<!doctype html><title>chat</title>
      <a id="link" href="{svc.url}/ui/tasks/{task}">task</a>
      <form id="cancel" method="post" action="{svc.url}/ui/tasks/{task}/cancel">
        <button id="send">send</button></form>"""

    async with elsewhere_page(page_html) as elsewhere:
        page = await new_page(browser)
        await page.goto(f"{svc.url}/ui/login")
        await page.fill("#key", tokens["submit"])
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{svc.url}/ui/", timeout=15_000)
        await page.goto(elsewhere)
        await page.click("#link")
        await page.wait_for_url(f"{svc.url}/ui/tasks/{task}", timeout=15_000)
        assert f"Task #{task}" in (await page.locator("h1").text_content() or "")
        await page.goto(elsewhere)
        async with page.expect_navigation() as sent:
            await page.click("#send")
        answer = await sent.value
        assert answer is not None and answer.status in (401, 403), answer.status
    assert (await svc.client.get(f"/api/v1/tasks/{task}", headers=submit)).json()[
        "status"
    ] == "queued"
