"""Many dashboard tabs in one browser: a hidden tab closes its live stream and opens it again
when seen, so tabs in the background do not hold the browser's six connections to the
service (over HTTP/1.1) and the tab in front, and new pages, still work.

As in test_dashboard_browser.py, each test asks for ``browser`` after the service, so the
browser closes first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Service
from tests.fixtures.browser import TrackedPage, new_page
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.integration.test_dashboard_browser_more import (
    _COUNT_REFRESHES,
    _refreshed_by_a_change,
)

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

#: Playwright's waits, in milliseconds.
WAIT = 15_000
#: A new page loads within this (it waited for good, behind six streams, before).
QUICK = 5_000

#: Counts the live streams each page opens (an init script: before the page's own scripts).
_COUNT_OPENED = (
    "document.addEventListener('htmx:sseOpen', () => {window.opened = (window.opened || 0) + 1;});"
)


#: Make the page hidden (another tab in front) or shown, as the browser would say it.
_SHOWN = """hidden => {
  Object.defineProperty(document, 'hidden', {configurable: true, get: () => hidden});
  Object.defineProperty(document, 'visibilityState', {configurable: true,
    get: () => hidden ? 'hidden' : 'visible'});
  document.dispatchEvent(new Event('visibilitychange')); }"""
#: Count the live part's refreshes asked for, and those held back, on ``target``.
_COUNT_ASKED = """target => { window.asked = 0; window.held = 0;
  document.body.addEventListener('htmx:confirm', e => {
    if (e.detail.elt.id !== target) return;
    window.asked += 1;
    setTimeout(() => { if (e.defaultPrevented) window.held += 1; }, 0); }); }"""


async def _tab(context: BrowserContext, url: str, live: bool = True) -> TrackedPage:
    """A new tab of ``context`` at ``url``, its live stream open if ``live``."""
    tab = TrackedPage(await context.new_page())
    tab.page.on("console", tab._on_console)
    tab.page.on("pageerror", tab._on_pageerror)
    await tab.goto(url, timeout=QUICK)
    if live:
        await wait_until(lambda: tab.evaluate("(window.opened || 0) > 0"), timeout=10)
    return tab


async def test_hidden_tabs_leave_connections_for_the_tab_in_front_and_new_pages(
    service: Service, browser: Browser
) -> None:
    """Six live tabs held the browser's six connections to the service: a seventh page never
    loaded and the open tabs' refreshes never went out. Hidden tabs close their streams; the
    one in front still follows, a new page loads, and a hidden tab seen again catches up."""
    from playwright.async_api import expect

    context = await browser.new_context()
    await context.add_init_script(_COUNT_OPENED)
    hidden = []
    for n in range(8):
        tab = await _tab(context, f"{service.url}{'/ui/tasks' if n % 2 else '/ui/'}")
        await tab.evaluate(_SHOWN, True)
        hidden.append(tab)
    front = await _tab(context, f"{service.url}/ui/tasks")
    task = await service.submit("summarize", text="seen in front")
    await service.wait(task["id"])
    row = f"#rows a[href$='/tasks/{task['id']}']"
    await expect(front.locator(row)).to_have_count(1, timeout=WAIT)
    page = await _tab(context, f"{service.url}/ui/tasks/{task['id']}", live=False)
    await expect(page.locator("#task-body h1")).to_contain_text("succeeded")
    # A tab hidden before the task was submitted: seen again, it shows it.
    behind = hidden[1]
    assert await behind.locator(row).count() == 0
    await behind.evaluate(_SHOWN, False)
    await expect(behind.locator(row)).to_have_count(1, timeout=WAIT)
    overview = hidden[0]
    await overview.evaluate(_SHOWN, False)
    await expect(overview.locator('.n[data-status="succeeded"]')).to_have_text("1", timeout=WAIT)
    for tab in [*hidden, front, page]:
        assert tab.errors == []
    await context.close()


async def test_a_running_task_seen_again_goes_on_where_its_text_stopped(
    service: Service, fake_ollama: FakeOllama, browser: Browser
) -> None:
    """A task's page hidden while its text streams: seen again, the text goes on from where
    it stopped, each word once, and the page follows the task to its end."""
    from playwright.async_api import expect

    # About 5 s of text: the provider's whole call may take 10 (a run under load
    # took longer than that with 9 s of it, and the task was retried).
    fake_ollama.word_delay = 0.02
    words = [f"w{i}" for i in range(240)]
    context = await browser.new_context()
    await context.add_init_script(_COUNT_OPENED)
    task = await service.submit("summarize", text=" ".join(words))
    page = await _tab(context, f"{service.url}/ui/tasks/{task['id']}", live=False)
    live = page.locator("#live-text")
    await expect(live).to_contain_text("w10", timeout=WAIT)
    await page.evaluate(_SHOWN, True)
    sent = fake_ollama.words_sent
    await wait_until(lambda: fake_ollama.words_sent > sent + 30, timeout=10)
    await page.evaluate(_SHOWN, False)
    await expect(live).to_contain_text("w200", timeout=WAIT)
    text = re.findall(r"\bw\d+\b", await live.text_content() or "")
    assert text == words[: len(text)], text
    await expect(page.locator("#task-body h1 .status")).to_have_text("succeeded", timeout=WAIT)
    assert page.errors == []
    await context.close()


async def test_a_hidden_tab_does_not_refresh_and_catches_up_when_seen(
    service: Service, browser: Browser
) -> None:
    """A background tab refreshed its list at every change, each one a table rendered by the
    server for nobody (helper-128). Hidden, it asks for none (its live stream is closed);
    seen again, it refreshes once."""
    page, other = await new_page(browser), await new_page(browser)
    for tab in (page, other):
        await tab.goto(f"{service.url}/ui/tasks")
        await tab.evaluate(_COUNT_REFRESHES, "rows")
    await page.evaluate(_COUNT_ASKED, "rows")
    await _refreshed_by_a_change(service, page)  # the live connection is open
    await page.evaluate(_SHOWN, True)
    refreshed = await page.evaluate("window.refreshes")
    shown = await other.evaluate("window.refreshes")
    task = await service.submit("summarize", text="while hidden")
    await service.wait(task["id"])
    # The tab in front is told, and refreshes; the hidden one asks for nothing.
    await wait_until(lambda: other.evaluate(f"window.refreshes > {shown}"), timeout=10)
    asked = await page.evaluate("window.asked")
    assert await page.evaluate("window.refreshes") == refreshed
    assert await page.locator(f"#rows a[href$='/tasks/{task['id']}']").count() == 0
    await page.evaluate(_SHOWN, False)
    await wait_until(lambda: page.evaluate(f"window.refreshes > {refreshed}"), timeout=10)
    assert await page.locator(f"#rows a[href$='/tasks/{task['id']}']").count() == 1
    assert (
        await page.evaluate("window.held") == 0 and asked == await page.evaluate("window.asked") - 1
    )
    assert page.errors == [] and other.errors == []
