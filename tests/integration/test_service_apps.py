"""Services in one process share the Litestar app of their surface (orchestra.api.app): each
request still reaches its own service's database, workers and keys, and what Litestar keeps
per app (a rate limit's counters) is not shared."""

from __future__ import annotations

from pathlib import Path

import msgspec

from orchestra.config import AuthSettings, Settings
from tests.conftest import StartService, make_settings
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.migrated import copy_sqlite_file


def _settings(tmp_path: Path, name: str, migrated_template: str, fake: FakeOllama) -> Settings:
    path = tmp_path / f"{name}.db"
    copy_sqlite_file(Path(migrated_template), path)
    return make_settings(f"sqlite+aiosqlite:///{path}", fake.url)


async def test_services_of_one_surface_share_their_http_app_and_keep_their_own_data(
    tmp_path: Path, migrated_template: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    first = _settings(tmp_path, "first", migrated_template, fake_ollama)
    second = _settings(tmp_path, "second", migrated_template, fake_ollama)
    async with start_service(first) as a, start_service(second) as b:
        assert a.app.http is b.app.http
        assert a.app.runtime is not b.app.runtime
        done_a = [await a.wait((await a.submit("summarize", text=t))["id"]) for t in ("x", "y")]
        done_b = await b.wait((await b.submit("summarize", text="z"))["id"])
        assert [t["status"] for t in done_a] == ["succeeded"] * 2
        assert done_b["status"] == "succeeded"
        listed_a = (await a.client.get("/api/v1/tasks")).json()["items"]
        listed_b = (await b.client.get("/api/v1/tasks")).json()["items"]
        assert sorted(t["id"] for t in listed_a) == [1, 2]
        assert [t["id"] for t in listed_b] == [1]
        assert (await b.client.get("/api/v1/tasks/1")).json()["params"]["text"] == "z"
        assert (await a.client.get("/api/v1/tasks/1")).json()["params"]["text"] == "x"
        # The dashboard's pages read their own service's database too.
        assert (await a.client.get("/ui/tasks/2")).status_code == 200
        assert (await b.client.get("/ui/tasks/2")).status_code == 404


async def test_rate_limited_services_count_their_own_requests(
    tmp_path: Path, migrated_template: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    limited = AuthSettings(rate_limit_per_minute=2)
    first, second = (
        msgspec.structs.replace(
            _settings(tmp_path, name, migrated_template, fake_ollama), auth=limited
        )
        for name in ("first", "second")
    )
    async with start_service(first) as a, start_service(second) as b:
        assert a.app.http is not b.app.http  # Litestar keeps the counters per app
        codes = [(await a.client.get("/api/v1/tasks")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert (await b.client.get("/api/v1/tasks")).status_code == 200
