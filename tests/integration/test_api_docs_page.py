"""The API's documentation under /schema: Swagger UI from the package's own files, over real
HTTP and in a real headless Chromium, with nothing fetched from another origin.

Each browser test asks for ``browser`` after the service, so the browser closes first.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from importlib.resources import files
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx
import msgspec
import pytest

from orchestra.config import Settings
from tests.conftest import Service, StartService, make_keys
from tests.fixtures.browser import new_page

if TYPE_CHECKING:
    from playwright.async_api import Browser, Request

#: Where the page is served: the root of /schema (with and without its slash) and its own path.
PAGES = ("/schema", "/schema/", "/schema/swagger")
#: Playwright's waits, in milliseconds.
WAIT = 15_000
STATIC = files("orchestra") / "api" / "docs_static"
#: Content types by suffix (JavaScript's as the host's mime.types names it: both are valid).
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


class _Assets(HTMLParser):
    """The URLs a page loads: its scripts' ``src`` and its stylesheets' ``href``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(str(values["src"]))
        if tag == "link" and values.get("href"):
            self.urls.append(str(values["href"]))


def assets_of(page: str) -> list[str]:
    parser = _Assets()
    parser.feed(page)
    return parser.urls


def directives(csp: str) -> dict[str, list[str]]:
    parts = (part.split() for part in csp.split(";") if part.strip())
    return {name: values for name, *values in parts}


def assert_secured(headers: httpx.Headers) -> None:
    """The security headers every answer under /schema carries."""
    get = headers.get
    policy = directives(get("content-security-policy", ""))
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["default-src"] == ["'self'"]
    assert get("x-frame-options") == "DENY"
    assert get("x-content-type-options") == "nosniff"


def without_ui(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, ui=msgspec.structs.replace(settings.ui, enabled=False))


@pytest.fixture
async def keyed_service(
    settings: Settings, db_url: str, start_service: StartService
) -> AsyncIterator[Service]:
    """A service whose API needs a key (one exists), without the dashboard."""
    await make_keys(db_url, "admin")
    async with start_service(without_ui(settings)) as svc:
        yield svc


@pytest.mark.parametrize("path", PAGES)
async def test_the_docs_page_carries_strict_security_headers(service: Service, path: str) -> None:
    answer = await service.client.get(path)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert_secured(answer.headers)
    assert "SwaggerUIBundle" not in answer.text  # no inline script starts it


@pytest.mark.parametrize("path", PAGES)
async def test_the_docs_page_loads_only_files_of_the_package(service: Service, path: str) -> None:
    page_url = service.url + path
    page = (await service.client.get(path)).text
    urls = assets_of(page)
    assert len(urls) == 5
    for url in urls:
        # Relative to the page: they hold under a proxy's prefix too.
        assert not urlsplit(url).scheme and not url.startswith("/"), url
        absolute = urljoin(page_url, url)
        assert urlsplit(absolute).path.startswith("/schema/static/"), absolute
        answer = await service.client.get(absolute)
        assert answer.status_code == 200, absolute
        name = urlsplit(absolute).path.removeprefix("/schema/static/")
        assert answer.content == (STATIC / name).read_bytes()
        suffix = name[name.rindex(".") :]
        assert answer.headers["content-type"].startswith(CONTENT_TYPES[suffix])
        cache = answer.headers["cache-control"]
        assert "public" in cache and int(re.findall(r"max-age=(\d+)", cache)[0]) >= 86400 * 30
        assert_secured(answer.headers)
    assert 'data-spec-url="' in page
    spec_url = re.findall(r'data-spec-url="([^"]+)"', page)[0]
    assert urlsplit(urljoin(page_url, spec_url)).path == "/schema/openapi.json"


async def test_the_document_stays_where_it_was(service: Service) -> None:
    as_json = await service.client.get("/schema/openapi.json")
    assert as_json.status_code == 200 and "/api/v1/tasks" in as_json.json()["paths"]
    for path in ("/schema/openapi.yaml", "/schema/openapi.yml"):
        as_yaml = await service.client.get(path)
        assert as_yaml.status_code == 200 and "/api/v1/tasks:" in as_yaml.text


@pytest.mark.parametrize(
    "path", ["/schema/redoc", "/schema/elements", "/schema/rapidoc", "/schema/oauth2-redirect.html"]
)
async def test_the_pages_that_loaded_cdn_scripts_are_gone(service: Service, path: str) -> None:
    answer = await service.client.get(path)
    assert answer.status_code == 404
    assert "unpkg.com" not in answer.text and "cdn." not in answer.text


async def test_the_docs_are_public_where_the_api_needs_a_key(keyed_service: Service) -> None:
    assert (await keyed_service.client.get("/api/v1/tasks")).status_code == 401
    page = await keyed_service.client.get("/schema/swagger")
    assert page.status_code == 200
    for url in assets_of(page.text):
        asset = await keyed_service.client.get(urljoin(keyed_service.url + "/schema/swagger", url))
        assert asset.status_code == 200


async def test_a_missing_file_is_a_404(service: Service) -> None:
    answer = await service.client.get("/schema/static/nothing.js")
    assert answer.status_code == 404


async def _operations_shown(browser: Browser, svc: Service, path: str) -> None:
    """Open ``path`` in Chromium: Swagger UI lists the API's operations, every request goes
    to the service itself and nothing breaks the page's CSP."""
    page = await new_page(browser)
    requested: list[str] = []

    def record(request: Request) -> None:
        requested.append(request.url)

    page.on("request", record)
    await page.goto(svc.url + path)
    await page.get_by_text("/api/v1/tasks", exact=True).first.wait_for(timeout=WAIT)
    await page.wait_for_load_state("networkidle")
    assert requested, "the page made no request"
    elsewhere = [url for url in requested if not url.startswith(svc.url + "/")]
    assert elsewhere == []
    assert {urlsplit(url).path for url in requested} >= {
        path,
        "/schema/openapi.json",
        "/schema/static/start.js",
        "/schema/static/vendor/swagger-ui-bundle.js",
    }
    violations = [text for _, text in page.console if "Content Security Policy" in text]
    assert violations == []
    assert page.errors == []
    await page.close()


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_swagger_ui_renders_the_api_from_the_service_alone(
    service: Service, browser: Browser
) -> None:
    for path in PAGES:
        await _operations_shown(browser, service, path)


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_swagger_ui_works_without_the_dashboard(
    keyed_service: Service, browser: Browser
) -> None:
    await _operations_shown(browser, keyed_service, "/schema/swagger")


@pytest.mark.browser
@pytest.mark.timeout(120)
async def test_try_it_out_calls_the_api_under_the_csp(service: Service, browser: Browser) -> None:
    page = await new_page(browser)
    await page.goto(service.url + "/schema/swagger")
    operation = page.locator(
        ".opblock-get", has=page.locator('[data-path="/api/v1/templates"]')
    ).first
    await operation.locator(".opblock-summary").first.click(timeout=WAIT)
    await operation.get_by_role("button", name="Try it out").click(timeout=WAIT)
    async with page.expect_response(lambda r: "/api/v1/templates" in r.url) as answered:
        await operation.get_by_role("button", name="Execute").click(timeout=WAIT)
    assert (await answered.value).status == 200
    await operation.locator(".live-responses-table .response-col_status").first.wait_for(
        timeout=WAIT
    )
    assert page.errors == []
    await page.close()


async def test_the_document_names_the_prefix_the_service_is_reached_by(
    settings: Settings, start_service: StartService
) -> None:
    """Swagger UI's Try it out sends requests to the document's ``servers``: behind a proxy's
    prefix it must be that prefix (it was ``/``, outside the proxy's path: 404s)."""
    prefixed = msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, root_path="/orch")
    )
    async with start_service(prefixed) as svc:
        for path in ("/schema/openapi.json", "/schema/openapi.yaml"):
            configured = await svc.client.get(path)
            forwarded = await svc.client.get(path, headers={"X-Forwarded-Prefix": "/edge/o/"})
            if path.endswith(".json"):
                assert configured.json()["servers"] == [{"url": "/orch"}]
                assert forwarded.json()["servers"] == [{"url": "/edge/o"}]
            else:
                assert "servers:\n- url: /orch\n" in configured.text, configured.text[:300]
                assert "servers:\n- url: /edge/o\n" in forwarded.text
    async with start_service(settings) as svc:  # no prefix: the service's own root
        document = (await svc.client.get("/schema/openapi.json")).json()
        assert document["servers"] == [{"url": "/"}]
