"""The browser plumbing works: Debian's Chromium, driven by Playwright, against an app served
in the test's event loop, enforcing a Content-Security-Policy header."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from litestar import Litestar, Response, get

from tests.fixtures.browser import new_page
from tests.fixtures.servers import serve, wait_until

if TYPE_CHECKING:
    from playwright.async_api import Browser

CSP = "default-src 'self'; script-src 'self'"
PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>smoke</title><link rel="icon" href="/favicon.ico"></head>
<body>
<button id="go" type="button">Go</button>
<p id="out">waiting</p>
<script src="/app.js"></script>
<script>window.inlineRan = true;</script>
</body>
</html>
"""
SCRIPT = """document.getElementById("go").addEventListener("click", () => {
  document.getElementById("out").textContent = "clicked";
});
"""


@get("/", sync_to_thread=False)
def index() -> Response[str]:
    return Response(PAGE, media_type="text/html", headers={"Content-Security-Policy": CSP})


@get("/app.js", sync_to_thread=False)
def app_js() -> Response[str]:
    return Response(SCRIPT, media_type="text/javascript")


@get("/favicon.ico", sync_to_thread=False)
def favicon() -> Response[bytes]:
    return Response(b"", status_code=204, media_type="image/x-icon")


app = Litestar([index, app_js, favicon])


@pytest.mark.browser
async def test_same_origin_script_runs_and_csp_blocks_the_inline_one(browser: Browser) -> None:
    from playwright.async_api import expect

    async with serve(app) as url:
        page = await new_page(browser)
        await page.goto(url)
        await page.click("#go")
        await expect(page.locator("#out")).to_have_text("clicked")
        assert await page.evaluate("() => window.inlineRan") is None

        def csp_reported() -> bool:
            return any("Content Security Policy" in e for e in page.errors)

        await wait_until(csp_reported, timeout=5)
        assert page.errors and all("Content Security Policy" in e for e in page.errors), page.errors
        await page.close()
