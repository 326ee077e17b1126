from __future__ import annotations

from tests.conftest import Service
from tests.fixtures.fake_ollama import FakeOllama


async def test_summarize_runs_end_to_end(service: Service, fake_ollama: FakeOllama) -> None:
    task = await service.submit("summarize", text="The cat sat on the mat.", sentences=2)
    assert task["status"] == "queued"
    done = await service.wait(task["id"])
    assert done["status"] == "succeeded", done
    assert "The cat sat on the mat." in done["result"]
