"""A batch's tally is kept once its every row has finished: lists and progress of finished
batches read it instead of counting their rows again (a list of batches counted every row
of each, about 0.8 s per million rows, on every view). Queuing rows again (a retry of the
batch, or of one of its tasks) drops it, and a count made before a retry is never kept
after it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestra.db import Database
from orchestra.db.batches import Tally, settle
from tests.conftest import Service, rows_by_status, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.integration.test_batch_uploads_lost import open_upload, send
from tests.integration.test_batches import batch_settings as batch_settings
from tests.integration.test_batches import finished, rows_read, upload
from tests.integration.test_batches import idle as idle
from tests.integration.test_batches import svc as svc


def kept(db_url: str, batch_id: int) -> tuple[dict[str, Any] | None, int]:
    """The batch's kept tally (None: none) and its revision, as the sqlite3 shell reads them."""
    [(tally, revision)] = sql_rows(
        db_url, "SELECT tally, revision FROM batches WHERE id = ?", (batch_id,)
    )
    return (None if tally is None else json.loads(tally)), int(revision)


async def test_a_finished_batchs_counts_are_read_without_counting_its_rows(
    svc: Service, db_url: str
) -> None:
    batch_id = (await upload(svc, b"text\nfine\nFAIL one\nalso fine\n"))["batch"]["id"]
    progress = await finished(svc, batch_id)
    assert progress["counts"] == rows_by_status(succeeded=2, failed=1)
    tally, _ = kept(db_url, batch_id)
    assert tally is not None and tally["counts"] == {"succeeded": 2, "failed": 1}
    with rows_read() as statements:
        listing = (await svc.client.get("/api/v1/batches")).json()
        again = (await svc.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert statements == []
    [item] = listing["items"]
    for read in (item, again):
        assert read["counts"] == progress["counts"]
        assert (read["finished"], read["progress"], read["eta_seconds"]) == (3, 1.0, 0.0)


@pytest.mark.parametrize("how", ["batch", "task"])
async def test_a_retry_drops_the_kept_tally_and_the_rows_are_counted_again(
    svc: Service, db_url: str, fake_ollama: FakeOllama, how: str
) -> None:
    batch_id = (await upload(svc, b"text\nfine\nFAIL one\n"))["batch"]["id"]
    await finished(svc, batch_id)
    before, revision = kept(db_url, batch_id)
    assert before is not None
    fake_ollama.reply = lambda request: json.dumps({"echo": "fixed", "n": 0})
    if how == "batch":
        response = await svc.client.post(f"/api/v1/batches/{batch_id}/retry")
    else:  # one of its tasks, by the tasks' API
        [(task_id,)] = sql_rows(
            db_url, "SELECT task_id FROM batch_rows WHERE batch_id = ? AND row_no = 2", (batch_id,)
        )
        response = await svc.client.post(f"/api/v1/tasks/{task_id}/retry")
    assert response.status_code == 200, response.text
    assert kept(db_url, batch_id)[1] == revision + 1
    progress = await finished(svc, batch_id)
    assert progress["counts"] == rows_by_status(succeeded=2)
    after, _ = kept(db_url, batch_id)
    assert after is not None and after["counts"] == {"succeeded": 2}


async def test_a_count_made_before_a_retry_is_not_kept_after_it(idle: Service, db_url: str) -> None:
    """A list counted the rows (all finished), then a retry committed before the list kept
    its count: the retry's new revision refuses the stale count."""
    batch_id = (await upload(idle, b"text\none\ntwo\n"))["batch"]["id"]
    await idle.client.post(f"/api/v1/batches/{batch_id}/cancel")  # every row finished
    counted = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()["counts"]
    assert counted == rows_by_status(cancelled=2)
    stale, revision = kept(db_url, batch_id)
    assert stale is not None
    retried = await idle.client.post(
        f"/api/v1/batches/{batch_id}/retry", params={"statuses": "cancelled"}
    )
    assert retried.json()["changed"] == 2  # queued again (no worker runs them)
    assert kept(db_url, batch_id) == (None, revision + 1)
    db = Database(db_url)
    try:
        await db.transaction(
            lambda conn: settle(conn, [(batch_id, revision, Tally(**stale))]), small=True
        )
    finally:
        await db.close()
    assert kept(db_url, batch_id) == (None, revision + 1)
    progress = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert progress["counts"] == rows_by_status(queued=2)


async def rows_done(db_url: str, batch_id: int) -> None:
    """Wait until no row of the batch is queued or running, without reading the batch through
    the API (which would keep its tally)."""

    def done() -> bool:
        [(active,)] = sql_rows(
            db_url,
            "SELECT count(*) FROM batch_rows JOIN tasks ON tasks.id = batch_rows.task_id "
            "WHERE batch_rows.batch_id = ? AND tasks.status IN ('queued', 'running')",
            (batch_id,),
        )
        return int(active) == 0

    await wait_until(done, timeout=30, interval=0.05)


def finished_long_ago(db_url: str, batch_id: int) -> None:
    """Date the batch's finished tasks back past any retention's cutoff."""
    sql_rows(
        db_url,
        "UPDATE tasks SET finished_at = '2000-01-01T00:00:00.000000Z' WHERE finished_at IS NOT "
        "NULL AND id IN (SELECT task_id FROM batch_rows WHERE batch_id = ?)",
        (batch_id,),
    )


async def test_retention_keeps_the_counts_of_a_finished_batch_nobody_read(
    svc: Service, db_url: str
) -> None:
    """Retention deleted an unread finished batch's tasks, and its counts with them:
    ``succeeded: 0, deleted: 3, finished: 0, progress: 1.0``. Now its tally is kept first."""
    batch_id = (await upload(svc, b"text\nfine\nFAIL one\nalso fine\n"))["batch"]["id"]
    await rows_done(db_url, batch_id)
    assert kept(db_url, batch_id)[0] is None  # nobody read it
    finished_long_ago(db_url, batch_id)
    assert await svc.app.runtime.pool.apply_retention() == 3
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(0,)]
    tally, _ = kept(db_url, batch_id)
    assert tally is not None and tally["counts"] == {"succeeded": 2, "failed": 1}
    progress = (await svc.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert progress["counts"] == rows_by_status(succeeded=2, failed=1)
    assert (progress["finished"], progress["progress"]) == (3, 1.0)


async def test_retention_leaves_an_unfinished_batch_to_count_its_deleted_rows(
    idle: Service, db_url: str
) -> None:
    """A batch with rows still queued keeps no tally (it is not finished): the finished task
    retention deleted counts as ``deleted``, and the rest as they are."""
    batch_id = (await upload(idle, b"text\none\ntwo\nthree\n"))["batch"]["id"]
    [(first,)] = sql_rows(
        db_url, "SELECT task_id FROM batch_rows WHERE batch_id = ? AND row_no = 1", (batch_id,)
    )
    assert (await idle.client.post(f"/api/v1/tasks/{first}/cancel")).status_code == 200
    finished_long_ago(db_url, batch_id)
    assert await idle.app.runtime.pool.apply_retention() == 1
    assert kept(db_url, batch_id)[0] is None
    progress = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()
    assert progress["counts"] == rows_by_status(queued=2, deleted=1)
    assert kept(db_url, batch_id)[0] is None  # still not finished: nothing kept


async def test_a_batch_still_loading_is_not_done_when_its_rows_so_far_are(
    svc: Service, db_url: str
) -> None:
    """Its rows so far all finished, a batch whose upload goes on showed progress 1.0 (and an
    ETA of 0): more rows may come. Until the upload ends it is short of done, its ETA
    unknown."""
    writer = await open_upload(int(svc.url.rsplit(":", 1)[1]), range(1, 51), template="rowjob")
    try:
        await wait_until(lambda: sql_rows(db_url, "SELECT count(*) FROM batch_rows") == [(50,)])
        [(batch_id,)] = sql_rows(db_url, "SELECT id FROM batches")
        await rows_done(db_url, batch_id)
        during = (await svc.client.get(f"/api/v1/batches/{batch_id}")).json()
        assert during["batch"]["status"] == "loading"
        assert during["finished"] == 50 and during["counts"]["succeeded"] == 50
        assert 0.9 <= during["progress"] < 1.0, during
        assert during["eta_seconds"] is None, during
        send(writer, b"".join(b"row %d\n" % i for i in range(51, 61)))
        send(writer, b"")  # the body's end
        await writer.drain()
        loaded = "SELECT status FROM batches WHERE id = ?"
        await wait_until(lambda: sql_rows(db_url, loaded, (batch_id,)) == [("loaded",)])
        after = await finished(svc, batch_id)
    finally:
        writer.close()
    assert after["batch"]["status"] == "loaded" and after["finished"] == 60
    assert (after["progress"], after["eta_seconds"]) == (1.0, 0.0)
