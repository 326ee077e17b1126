"""The dashboard's vendored assets are package data, unchanged since VERSIONS.md recorded them."""

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
ROW = re.compile(
    r"^\| `(?P<file>[^`]+)` \| (?P<package>\S+) \| (?P<version>\S+) \| (?P<license>\S+) "
    r"\| `(?P<sha256>[0-9a-f]{64})` \|$",
    re.MULTILINE,
)


def recorded() -> dict[str, dict[str, str]]:
    text = (VENDOR / "VERSIONS.md").read_text(encoding="utf-8")
    return {m["file"]: m.groupdict() for m in ROW.finditer(text)}


def test_versions_md_lists_every_vendored_file() -> None:
    assert set(recorded()) == EXPECTED
    on_disk = {entry.name for entry in VENDOR.iterdir() if entry.is_file()}
    assert on_disk == EXPECTED | {"VERSIONS.md"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vendored_file_matches_its_recorded_sha256(name: str) -> None:
    row = recorded()[name]
    data = (VENDOR / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha256"], f"{name} changed; see VERSIONS.md"
    license_name = row["package"].removeprefix("@").replace("/", "-") + ".txt"
    assert (VENDOR / "LICENSES" / license_name).read_text(encoding="utf-8").strip()


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
