"""Cancelling a large batch while its rows run: the queued rows are cancelled before the
running ones are asked to stop, so no slot freed by a stop claims a row being cancelled."""

from __future__ import annotations

from tests.conftest import Service, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.integration.test_batches import batch_settings as batch_settings
from tests.integration.test_batches import svc as svc
from tests.integration.test_batches import upload

ROWS = 5_000  # ten pages of the cancel's walk


async def test_cancelling_a_running_batch_starts_none_of_its_rows(
    svc: Service, fake_ollama: FakeOllama, db_url: str
) -> None:
    """The walk cancelled 500 tasks at a time, running ones too: each page's stops freed
    their slots, which claimed the next page's first queued rows, which the walk then found
    running and stopped in turn: three model calls started per page of a batch being
    cancelled (600 for 100,000 rows)."""
    fake_ollama.close_gate("llama3.2")  # the rows' model calls wait until the test ends
    try:
        answer = await upload(svc, b"text\n" + b"row\n" * ROWS)
        batch_id = answer["batch"]["id"]
        await wait_until(lambda: fake_ollama.held("llama3.2") == 3, timeout=15)  # the reserve
        response = await svc.client.post(f"/api/v1/batches/{batch_id}/cancel")
        assert response.status_code == 200, response.text
        outcome = response.json()
        assert (outcome["changed"], outcome["stopping"]) == (ROWS, 3), outcome
        [(started,)] = sql_rows(db_url, "SELECT count(*) FROM task_attempts")
        assert started == 3  # only the rows running before the cancel
    finally:
        fake_ollama.open_gate("llama3.2")
