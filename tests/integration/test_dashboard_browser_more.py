"""The dashboard in headless Chromium: what the address bar and history hold after a form's
answer, the marker shown while the service cannot be reached, and pages that fit their
screen (long names, narrow phones).

As in test_dashboard_browser.py, each test asks for ``browser`` after the service, so the
browser closes first.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn

from orchestra.api import create_app
from orchestra.config import Settings
from tests.conftest import Service
from tests.fixtures.browser import new_page
from tests.fixtures.servers import QuickServer, free_socket, wait_until

if TYPE_CHECKING:
    from playwright.async_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

#: Playwright's waits, in milliseconds.
WAIT = 15_000
#: A template name of 90 characters, with no place to break a line at.
LONG_NAME = "summarize_" * 9
PHONE = {"width": 375, "height": 800}

_WIDTH = "document.documentElement.scrollWidth"


async def test_after_a_422_reload_and_back_show_the_template_page(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = await new_page(browser)
    form_url = f"{service.url}/ui/templates/summarize"
    await page.goto(form_url)
    await page.click("#run-form button[type=submit]")  # the text is empty: 422
    await expect(page.locator("#param-text-error")).to_contain_text("required", timeout=WAIT)
    assert page.url == form_url
    await page.reload()
    await expect(page.locator("h1")).to_contain_text("summarize", timeout=WAIT)
    await page.fill("#param-text", "now it has text")
    await page.click("#run-form button[type=submit]")
    await expect(page.locator("#task-body h1")).to_contain_text("Task #", timeout=WAIT)
    task_url = page.url
    await page.go_back()
    await page.wait_for_url(form_url, timeout=WAIT)
    await expect(page.locator("h1")).to_contain_text("summarize", timeout=WAIT)
    await expect(page.locator("#run-form")).to_have_count(1)
    await page.go_forward()
    await page.wait_for_url(task_url, timeout=WAIT)
    await expect(page.locator("#task-body h1")).to_contain_text("Task #", timeout=WAIT)
    assert [e for e in page.errors if "status of 422" not in e] == []


def _socket_on(port: int) -> socket.socket:
    """A socket to serve on ``port`` again (the one the stopped service had)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@asynccontextmanager
async def _serving(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    """``app`` served on ``sock`` for the block (stopped after a second's grace)."""
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=1)
    server = QuickServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), timeout=15)
        yield
    finally:
        server.stop()
        await asyncio.wait_for(task, timeout=30)
        sock.close()


async def test_a_stopped_service_is_shown_as_disconnected_until_it_is_back(
    settings: Settings, browser: Browser
) -> None:
    from playwright.async_api import expect

    sock = free_socket()
    port = sock.getsockname()[1]
    page = await new_page(browser)
    marker = page.locator("#offline")
    async with _serving(create_app(settings), sock):
        await page.goto(f"http://127.0.0.1:{port}/ui/")
        await expect(page.locator("h1")).to_have_text("Overview")
        await expect(marker).to_be_hidden()
    await expect(marker).to_be_visible(timeout=WAIT)
    await expect(marker).to_contain_text("Disconnected")
    async with _serving(create_app(settings), _socket_on(port)):
        await expect(marker).to_be_hidden(timeout=WAIT)  # the live stream is back
        await page.close()


async def test_long_names_wrap_instead_of_widening_the_page(
    service: Service, browser: Browser
) -> None:
    template = (
        f"name: {LONG_NAME}\nparameters:\n  x: {{type: string}}\n"
        "steps:\n  - id: a\n    kind: render\n    text: '{{ params.x }}'\n"
    )
    registered = await service.client.post("/api/v1/templates", content=template)
    assert registered.status_code == 201, registered.text
    task = await service.submit(LONG_NAME, x="y" * 300)
    await service.wait(task["id"])
    page = await new_page(browser, viewport={"width": 1280, "height": 800})
    for path in (f"/ui/templates/{LONG_NAME}", f"/ui/tasks/{task['id']}"):
        await page.goto(f"{service.url}{path}")
        assert await page.evaluate(_WIDTH) <= 1280, path
    await page.set_viewport_size(PHONE)
    for path in (f"/ui/templates/{LONG_NAME}", f"/ui/tasks/{task['id']}"):
        await page.goto(f"{service.url}{path}")
        assert await page.evaluate(_WIDTH) <= 375, path
    assert page.errors == []


async def test_narrow_screens_fit_the_keys_page_and_show_each_tasks_status(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    task = await service.submit("summarize", text="narrow")
    await service.wait(task["id"])
    page = await new_page(browser, viewport=PHONE)
    await page.goto(f"{service.url}/ui/keys")
    keys_width = await page.evaluate(_WIDTH)
    await page.goto(f"{service.url}/ui/tasks")
    await page.check("#live-pause")  # a live refresh would replace the row mid-measure
    await expect(page.locator("#rows .status").first).to_have_text("succeeded")
    status = await page.locator("#rows .status").first.bounding_box()
    row = await page.locator("#rows tr").first.bounding_box()
    # Nothing to scroll to sideways: the table fits its wrapper.
    table_fits = await page.evaluate(
        "() => { const w = document.querySelector('.table-wrap');"
        " return w.scrollWidth <= w.clientWidth; }"
    )
    assert status is not None and row is not None
    measured = {
        "keys page width": keys_width,
        "status's right edge": status["x"] + status["width"],
        "row height": row["height"],
        "table fits": table_fits,
    }
    assert keys_width <= 375, measured
    assert status["x"] + status["width"] <= 375, measured
    assert table_fits and row["height"] < 70, measured
    assert page.errors == []


async def test_the_filter_form_leaves_empty_fields_out_of_the_address(
    service: Service, browser: Browser
) -> None:
    page = await new_page(browser)
    await page.goto(f"{service.url}/ui/tasks")
    await page.select_option("select[name=status]", "cancelled")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(f"{service.url}/ui/tasks?status=cancelled", timeout=WAIT)
    assert page.errors == []
