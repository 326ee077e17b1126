"""The dashboard behind a reverse proxy that serves it under a sub-path and strips it, in a real
Chromium: the proxy is a small ASGI app on its own loopback port that forwards
``/orchestra/...`` to the service as ``/...`` with ``X-Forwarded-Prefix: /orchestra`` (what
Traefik's StripPrefix and nginx setups send), streaming answers through, event streams too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Service
from tests.fixtures.browser import new_page
from tests.fixtures.servers import serve

if TYPE_CHECKING:
    from playwright.async_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

PREFIX = "/orchestra"
#: Playwright's waits, in milliseconds.
WAIT = 15_000
#: Headers that belong to one hop, not passed on.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"content-length"}


def stripping_proxy(upstream: str, client: httpx.AsyncClient) -> Any:
    """An ASGI reverse proxy: ``PREFIX/path`` to ``upstream/path``, answers streamed back."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope["path"]
        if not path.startswith(PREFIX + "/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not behind the proxy"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode("latin-1")
        url = upstream + path[len(PREFIX) :] + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        headers.append((b"x-forwarded-prefix", PREFIX.encode()))
        request = client.build_request(scope["method"], url, headers=headers, content=body)
        answer = await client.send(request, stream=True)

        async def pump() -> None:
            back = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in answer.headers.multi_items()
                if k.lower().encode() not in _HOP
            ]
            await send(
                {"type": "http.response.start", "status": answer.status_code, "headers": back}
            )
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        async def hung_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        # An event stream never ends by itself: stop forwarding when the browser hangs up.
        tasks = [asyncio.create_task(pump()), asyncio.create_task(hung_up())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await answer.aclose()

    return app


@asynccontextmanager
async def behind_proxy(service: Service) -> AsyncIterator[str]:
    """The service behind :func:`stripping_proxy`; yields the proxy's base URL."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        async with serve(stripping_proxy(service.url, client)) as url:
            yield url


async def test_the_dashboard_works_under_a_stripped_sub_path_behind_a_proxy(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    async with behind_proxy(service) as proxy:
        page = await new_page(browser)
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        await page.goto(f"{proxy}{PREFIX}/ui/")
        succeeded = page.locator('.n[data-status="succeeded"]')
        await expect(succeeded).to_have_text("0", timeout=WAIT)
        # Live counts: the overview's event stream runs through the proxy.
        task = await service.submit("summarize", text="through the proxy")
        await service.wait(task["id"])
        await expect(succeeded).to_have_text("1", timeout=WAIT)
        # Links, a form post and its redirect, a task page: all under the prefix.
        await page.click("nav >> text=Templates")
        await page.click("a[href$='/ui/templates/summarize']")
        await page.fill("#param-text", "submitted behind the proxy")
        await page.click("#run-form button[type=submit]")
        await page.wait_for_url(f"{proxy}{PREFIX}/ui/tasks/*")
        await expect(page.locator("#task-body h1 .status")).to_have_text("succeeded", timeout=WAIT)
        await expect(page.locator("#params")).to_contain_text("submitted behind the proxy")
        await page.click("nav >> text=Tasks")
        await expect(page.locator("#rows tr")).to_have_count(2, timeout=WAIT)
        assert page.errors == []
        await page.close()  # its event streams end before the proxy and the service stop
    outside = [url for url in asked if not urlsplit(url).path.startswith(PREFIX + "/")]
    assert asked and outside == []


async def test_the_apis_locations_are_under_the_prefix_behind_a_proxy(service: Service) -> None:
    """A submit's ``Location`` (and a template's, a schedule's, a webhook's, a batch's) was
    the path without the prefix: followed through the proxy, a 404 (helper-135)."""
    async with behind_proxy(service) as proxy, httpx.AsyncClient(base_url=proxy) as client:
        body = {"template": "summarize", "params": {"text": "x"}, "delay": 600}
        made = await client.post(f"{PREFIX}/api/v1/tasks", json=body)
        assert made.status_code == 201, made.text
        where = made.headers["location"]
        assert where == f"{PREFIX}/api/v1/tasks/{made.json()['id']}", where
        assert (await client.get(where)).json()["id"] == made.json()["id"]
