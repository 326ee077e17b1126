"""An idempotency key resumes the batch it made with the same file and the same template
version: the same key with another file is a 409 naming the first row that differs (it
resumed the old batch without a word, queuing the other file's rows under it), and a batch
resumed after its template changed keeps the version it began with (its later rows ran on
the new one)."""

from __future__ import annotations

from pathlib import Path

from orchestra.config import Settings
from tests.conftest import Service, StartService, sql_rows
from tests.integration.test_batches import ROWJOB, finished, upload
from tests.integration.test_batches import batch_settings as batch_settings
from tests.integration.test_batches import idle as idle


def csv_of(*texts: str) -> bytes:
    return b"text\n" + b"".join(t.encode() + b"\n" for t in texts)


async def test_the_same_key_with_another_file_is_a_conflict_naming_the_row(
    idle: Service, db_url: str
) -> None:
    first = await upload(idle, csv_of("row 1", "row 2", "row 3"), key="data")
    other = await upload(idle, csv_of("row 1", "row TWO", "row 3", "row 4"), expect=409, key="data")
    said = "already used for another file: row 2 (line 3) differs from the batch's"
    assert other["fields"] == [{"field": "Idempotency-Key", "message": said}], other
    assert f"batch {first['batch']['id']}" in other["message"], other
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(3,)]  # nothing of it queued
    # A row refused the first time, valid now (or the other way round), differs too.
    refused = await upload(idle, b"text,n\nrow 1,-1\n", key="refused")
    assert refused["refused"] == 1
    await upload(idle, b"text,n\nrow 1,1\n", expect=409, key="refused")
    # The same file, longer, resumes its batch.
    longer = await upload(idle, csv_of("row 1", "row 2", "row 3", "row 4"), expect=200, key="data")
    assert longer["batch"]["id"] == first["batch"]["id"] and longer["batch"]["rows"] == 4
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(4,)]


async def test_a_resumed_batch_keeps_the_template_version_it_began_with(
    idle: Service, db_url: str, tmp_path: Path
) -> None:
    first = await upload(idle, csv_of("row 1", "row 2"), key="pinned")
    assert first["batch"]["template_version"] == 1
    changed = "version: 2\n" + ROWJOB
    (tmp_path / "templates" / "rowjob.yaml").write_text(changed)  # the file batch_settings wrote
    reloaded = await idle.client.post("/api/v1/templates/reload")
    assert reloaded.status_code == 200, reloaded.text
    current = await idle.client.get("/api/v1/templates/rowjob")
    assert current.json()["version"] == 2, current.text
    again = await upload(idle, csv_of("row 1", "row 2", "row 3"), expect=200, key="pinned")
    assert again["batch"]["template_version"] == 1
    assert sql_rows(db_url, "SELECT template_version, count(*) FROM tasks GROUP BY 1") == [(1, 3)]
    # A new key takes the template as it is now.
    fresh = await upload(idle, csv_of("row 1"), key="fresh")
    assert fresh["batch"]["template_version"] == 2


async def test_resuming_a_batch_whose_template_version_is_gone_is_a_conflict(
    batch_settings: Settings, start_service: StartService, db_url: str, tmp_path: Path
) -> None:
    """The file changed while the service was down, and no unfinished task kept the old
    version: the batch cannot go on with it, and says so (not a 404 for the version)."""
    async with start_service(batch_settings) as svc:
        first = await upload(svc, csv_of("row 1"), key="gone")
        await finished(svc, first["batch"]["id"])
    (tmp_path / "templates" / "rowjob.yaml").write_text("version: 2\n" + ROWJOB)
    async with start_service(batch_settings) as svc:
        refused = await upload(svc, csv_of("row 1", "row 2"), expect=409, key="gone")
    gone = "its batch's template version 1 is no longer available"
    assert refused["fields"] == [{"field": "Idempotency-Key", "message": gone}], refused
    said = f"resumes batch {first['batch']['id']} (loaded with 1 row), but {gone}, so it takes"
    assert said in refused["message"], refused
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(1,)]


REGJOB = ROWJOB.replace("name: rowjob", "name: regjob")


async def test_a_deleted_template_resumes_no_batch(idle: Service, db_url: str) -> None:
    """A registered template deleted after its batch began: its key resumes nothing (a 404,
    as before versions were pinned), rather than queuing rows for a deleted template."""
    registered = await idle.client.post(
        "/api/v1/templates", content=REGJOB, headers={"Content-Type": "application/yaml"}
    )
    assert registered.status_code == 201, registered.text
    await upload(idle, csv_of("row 1"), key="deleted", template="regjob")
    assert (await idle.client.delete("/api/v1/templates/regjob")).status_code == 204
    refused = await upload(
        idle, csv_of("row 1", "row 2"), expect=404, key="deleted", template="regjob"
    )
    assert refused["code"] == "template_not_found", refused
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(1,)]
