"""The vendored front-end assets (the dashboard's, the API documentation page's) are package
data, unchanged since their VERSIONS.md recorded them."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable

import pytest

# Not files("orchestra.web"): the package's data is reached the same way whether or not
# orchestra.web is importable, from a source tree or from an installed wheel.
VENDOR: Traversable = files("orchestra") / "web" / "static" / "vendor"
EXPECTED = {"htmx.min.js", "sse.min.js", "pico.min.css"}
#: Swagger UI, which the API serves at /schema (orchestra.api.docs_ui).
DOCS_VENDOR: Traversable = files("orchestra") / "api" / "docs_static" / "vendor"
DOCS_EXPECTED = {"swagger-ui-bundle.js", "swagger-ui.css", "index.css", "favicon-32x32.png"}
#: Each vendored folder and the files it holds.
FOLDERS = {"dashboard": (VENDOR, EXPECTED), "api-docs": (DOCS_VENDOR, DOCS_EXPECTED)}
ALL_FILES = [(folder, name) for folder, (_, names) in FOLDERS.items() for name in sorted(names)]
ROW = re.compile(
    r"^\| `(?P<file>[^`]+)` \| (?P<package>\S+) \| (?P<version>\S+) \| (?P<license>\S+) "
    r"\| `(?P<sha256>[0-9a-f]{64})` \|$",
    re.MULTILINE,
)


def recorded(vendor: Traversable = VENDOR) -> dict[str, dict[str, str]]:
    text = (vendor / "VERSIONS.md").read_text(encoding="utf-8")
    return {m["file"]: m.groupdict() for m in ROW.finditer(text)}


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_versions_md_lists_every_vendored_file(folder: str) -> None:
    vendor, expected = FOLDERS[folder]
    assert set(recorded(vendor)) == expected
    on_disk = {entry.name for entry in vendor.iterdir() if entry.is_file()}
    assert on_disk == expected | {"VERSIONS.md"}


@pytest.mark.parametrize(("folder", "name"), ALL_FILES)
def test_vendored_file_matches_its_recorded_sha256(folder: str, name: str) -> None:
    vendor, _ = FOLDERS[folder]
    row = recorded(vendor)[name]
    data = (vendor / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha256"], f"{name} changed; see VERSIONS.md"
    license_name = row["package"].removeprefix("@").replace("/", "-") + ".txt"
    assert (vendor / "LICENSES" / license_name).read_text(encoding="utf-8").strip()


def test_versions_are_the_ones_the_files_say() -> None:
    rows = recorded()
    # htmx 2.0.x, never 4: the dashboard's attributes and litestar-htmx expect htmx 2.
    assert rows["htmx.min.js"]["version"].startswith("2.0.")
    htmx = (VENDOR / "htmx.min.js").read_text(encoding="utf-8")
    assert f'version:"{rows["htmx.min.js"]["version"]}"' in htmx
    assert rows["sse.min.js"]["version"].startswith("2.2.")
    pico = (VENDOR / "pico.min.css").read_text(encoding="utf-8")
    assert f"Pico CSS ✨ v{rows['pico.min.css']['version']} " in pico


def test_the_stylesheet_loads_nothing_but_data_images() -> None:
    # Under the dashboard's CSP (img-src 'self' data:, no other origins) every url() must be
    # a data: image; an @import or a web font would be blocked.
    pico = (VENDOR / "pico.min.css").read_text(encoding="utf-8")
    urls = re.findall(r"url\(\s*['\"]?([^'\")]*)", pico)
    assert urls and all(url.startswith("data:image/") for url in urls)
    assert "@import" not in pico and "@font-face" not in pico


def test_swagger_ui_is_the_recorded_release_with_its_notices() -> None:
    rows = recorded(DOCS_VENDOR)
    version = rows["swagger-ui-bundle.js"]["version"]
    assert {row["version"] for row in rows.values()} == {version}
    assert version.startswith("5.")
    bundle = (DOCS_VENDOR / "swagger-ui-bundle.js").read_text(encoding="utf-8")
    assert f'PACKAGE_VERSION:"{version}"' in bundle
    # Apache-2.0: its NOTICE goes with the files; so do the licences of what the bundle holds.
    licenses = DOCS_VENDOR / "LICENSES"
    assert "SmartBear" in (licenses / "swagger-ui-dist.NOTICE.txt").read_text(encoding="utf-8")
    assert (licenses / "swagger-ui-bundle.js.LICENSE.txt").read_text(encoding="utf-8").strip()
    assert "Apache License" in (licenses / "swagger-ui-dist.txt").read_text(encoding="utf-8")


def test_swagger_ui_stylesheets_load_nothing_but_data_images() -> None:
    # The page's CSP (orchestra.api.docs_ui) is img-src 'self' data:, with no other origin.
    for name in ("swagger-ui.css", "index.css"):
        css = (DOCS_VENDOR / name).read_text(encoding="utf-8")
        urls = re.findall(r"url\(\s*['\"]?([^'\")]*)", css)
        assert all(url.startswith("data:image/") for url in urls), name
        assert "@import" not in css and "@font-face" not in css


def test_swagger_ui_starts_from_a_file_of_the_package() -> None:
    start = (files("orchestra") / "api" / "docs_static" / "start.js").read_text(encoding="utf-8")
    assert "SwaggerUIBundle(" in start and "validatorUrl: null" in start
