"""Take the README's dashboard screenshots (``make screenshots``): a real service on a
temporary database, the tests' fake Ollama on a real port, a few tasks of every kind, and
headless Chromium saving each page into docs/screenshots/."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_settings  # noqa: E402
from tests.fixtures.browser import launch_browser  # noqa: E402
from tests.fixtures.fake_ollama import Failure, running_fake_ollama  # noqa: E402
from tests.fixtures.servers import serve  # noqa: E402

from orchestra.api.app import create_app  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
BROKEN = "name: notes\nparameters:\n  text: {type: string}\nsteps:\n  - id: a\n    promt: hi\n"


async def _tasks(client: httpx.AsyncClient, fake: object) -> int:
    texts = [
        "Orchestra runs AI tasks from YAML templates.",
        "The queue is a table in SQLite.",
        "Workers lease tasks and renew their leases.",
    ]
    ids = []
    for i in range(12):
        body = {"template": "summarize", "params": {"text": texts[i % 3]}}
        ids.append((await client.post("/api/v1/tasks", json=body)).json()["id"])
    for i in range(3):
        body = {"template": "keywords", "params": {"text": texts[i]}}
        ids.append((await client.post("/api/v1/tasks", json=body)).json()["id"])
    for task_id in ids:
        await client.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})
    fake.failure = Failure(500, "CUDA error: out of memory", times=2)  # type: ignore[attr-defined]
    for _ in range(2):
        body = {
            "template": "translate",
            "params": {"text": "Bonjour", "target_language": "German"},
            "max_attempts": 1,
        }
        task_id = (await client.post("/api/v1/tasks", json=body)).json()["id"]
        await client.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})
    return int(ids[0])


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        async with running_fake_ollama() as fake:
            settings = make_settings(f"sqlite+aiosqlite:///{tmp}/orchestra.db", fake.url)
            async with (
                serve(create_app(settings)) as url,
                httpx.AsyncClient(base_url=url, timeout=60) as client,
                launch_browser() as browser,
            ):
                first = await _tasks(client, fake)
                fake.word_delay = 0.15
                long_text = " ".join(f"sentence {i} of a long report." for i in range(60))
                running = (
                    await client.post(
                        "/api/v1/tasks",
                        json={"template": "summarize", "params": {"text": long_text}},
                    )
                ).json()["id"]
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                shots = {
                    "overview": "/ui/",
                    "tasks": "/ui/tasks",
                    "task": f"/ui/tasks/{first}",
                    "task-live": f"/ui/tasks/{running}",
                    "templates": "/ui/templates",
                    "template": "/ui/templates/summarize",
                    "providers": "/ui/providers",
                    "keys": "/ui/keys",
                }
                for name, path in shots.items():
                    await page.goto(url + path)
                    if name == "task-live":
                        await page.locator("#live-text").wait_for(timeout=15_000)
                        await page.wait_for_timeout(1500)
                    else:
                        await page.wait_for_load_state("networkidle")
                    await page.screenshot(path=str(OUT / f"{name}.png"), full_page=name != "task")
                    print("saved", OUT / f"{name}.png")
                await page.goto(url + "/ui/templates/new")
                await page.fill("#yaml", BROKEN)
                await page.locator("#problems button.goto").first.wait_for()
                await page.screenshot(path=str(OUT / "editor.png"))
                print("saved", OUT / "editor.png")
                phone = await browser.new_page(viewport={"width": 375, "height": 812})
                await phone.goto(url + "/ui/")
                await phone.wait_for_load_state("networkidle")
                await phone.screenshot(path=str(OUT / "overview-375.png"), full_page=True)
                print("saved", OUT / "overview-375.png")
                batch = await _batch(client, fake)
                # Last, so that the tasks its ticks make are in no other picture.
                await _schedules(client)
                for name, path in (
                    ("batch", f"/ui/batches/{batch}"),
                    ("schedules", "/ui/schedules"),
                    ("schedule", "/ui/schedules/digest"),
                ):
                    await page.goto(url + path)
                    await page.wait_for_load_state("networkidle")
                    await page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
                    print("saved", OUT / f"{name}.png")
                await page.close()
                await phone.close()


async def _batch(client: httpx.AsyncClient, fake: object) -> int:
    """A batch of 40 rows: one refused at upload (no text), one whose model call fails."""
    rows = ["text", *(f"Row {i} of the quarterly report." for i in range(38)), '""', "Last row."]
    fake.failure = Failure(500, "CUDA error: out of memory", times=1)  # type: ignore[attr-defined]
    fake.word_delay = 0.0  # type: ignore[attr-defined]  # (the live task's picture is taken)
    made = await client.post(
        "/api/v1/batches",
        params={"template": "summarize", "format": "csv", "max_attempts": 1},
        content="\n".join(rows).encode(),
    )
    made.raise_for_status()
    batch_id = int(made.json()["batch"]["id"])
    for _ in range(600):  # up to a minute
        counts = (await client.get(f"/api/v1/batches/{batch_id}")).json()["counts"]
        if counts["queued"] + counts["running"] == 0:
            break
        await asyncio.sleep(0.1)
    return batch_id


async def _schedules(client: httpx.AsyncClient) -> None:
    """Two schedules: one every 2 seconds, with a few ticks fired, and a weekday cron."""
    for body in (
        {"name": "digest", "every": "2s", "params": {"text": "The news of the hour."}},
        {
            "name": "weekday-report",
            "cron": "0 9 * * 1-5",
            "timezone": "Europe/Paris",
            "params": {"text": "Yesterday's numbers."},
        },
    ):
        made = await client.post("/api/v1/schedules", json={"template": "summarize", **body})
        made.raise_for_status()
    for _ in range(100):  # three ticks, each up to 2 s apart
        fired = (await client.get("/api/v1/schedules/digest")).json()["last_tasks"]
        if len(fired) >= 3:
            return
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main())
