"""A batch's upload holds a lease on its row while it runs: an upload whose process died is
closed by any process's reaper once that lease lapses (its rows read before stay and run),
while a live upload, however slow its body, keeps renewing it and is left be."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection

from orchestra.config import Settings
from orchestra.db import Database
from orchestra.db.batches import BatchStore
from orchestra.db.schema import upgrade
from orchestra.domain import iso, now
from tests.conftest import StartService, make_settings, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.logs import captured, events
from tests.fixtures.migrated import stop_at
from tests.fixtures.servers import free_port, start_process, wait_until, write_config

#: Leases of a second, reaped five times a second.
QUICK = {"lease_seconds": 1.0, "reap_interval": 0.2, "poll_interval": 0.2}


async def open_upload(
    port: int, rows: range, key: str | None = None, template: str = "summarize"
) -> asyncio.StreamWriter:
    """A CSV upload of ``template`` (a ``text`` parameter) on a raw connection, its body sent
    in part (the header and ``rows``); the caller sends more or hangs up."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /api/v1/batches?template=%s&format=csv HTTP/1.1\r\n" % template.encode()
        + b"Host: 127.0.0.1\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n"
        + (b"Idempotency-Key: %s\r\n" % key.encode() if key else b"")
        + b"\r\n"
    )
    send(writer, b"text\n" + b"".join(b"row %d\n" % i for i in rows))
    await writer.drain()
    return writer


def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def batch(db_url: str, keyed: bool = False) -> tuple[int, str, int, str | None]:
    """The keyless batch (or the one with a key): id, status, rows counted, lease."""
    [row] = sql_rows(
        db_url,
        "SELECT id, status, row_count, upload_expires_at FROM batches "
        f"WHERE idempotency_key IS {'NOT ' if keyed else ''}NULL",
    )
    return row[0], row[1], row[2], row[3]


def stored(db_url: str) -> int:
    [(count,)] = sql_rows(db_url, "SELECT count(*) FROM batch_rows")
    return int(count)


@pytest.mark.parametrize("where", ["here", "elsewhere"])
async def test_an_upload_that_died_with_its_process_is_closed_with_the_rows_it_kept(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str, where: str
) -> None:
    """kill -9 mid-upload: nobody is left to end the upload, and the batch stayed ``loading``
    for ever (its rows ran). A process started on the same machine closes it at once (its
    reader's pid is gone; leases of a minute here); one elsewhere, once its lease lapses. One
    with a key stays ``loading``: its client finishes it by sending the upload again."""
    port, config = free_port(), tmp_path / "upload.toml"
    lease = 60.0 if where == "here" else 1.0
    quick = {**QUICK, "lease_seconds": lease}
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, **quick)
    first = await start_process(config)
    try:
        writer = await open_upload(port, range(1, 121))
        keyed = await open_upload(port, range(1, 61), key="resume-me")
        # Stored in chunks of 50: the first two are in, the last 20 rows wait for more; and
        # the keyed upload's first chunk.
        await wait_until(lambda: stored(db_url) == 150, timeout=15)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    writer.close()
    keyed.close()
    assert (batch(db_url)[1], batch(db_url, keyed=True)[1:]) == ("loading", ("loading", 0, None))
    if where == "elsewhere":  # as if its reader ran on another host
        sql_rows(
            db_url,
            "UPDATE batches SET upload_owner = 'elsewhere:1:0123456789abcd' "
            "WHERE idempotency_key IS NULL",
        )

    second = await start_process(config)
    try:
        await wait_until(lambda: batch(db_url)[1] == "loaded", timeout=20, interval=0.05)
        batch_id, _, rows, lease = batch(db_url)
        assert (rows, lease) == (100, None)
        assert batch(db_url, keyed=True)[1] == "loading"
        assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(150,)]
        # Logged just after the commit that closed it: waited for, not read at once.

        def said() -> list[str]:
            lines = config.with_suffix(".log").read_text().splitlines()
            return [line for line in lines if '"batch.upload_lost"' in line]

        await wait_until(said, timeout=10)
        [lost] = said()
        assert f'"batch_id": {batch_id}' in lost and '"rows": 100' in lost, lost
        why = "is gone (pid" if where == "here" else "stopped renewing its lease"
        assert why in lost, lost
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()


#: Leases of three seconds (renewed every second, so a busy machine's late renewal does not
#: lapse one), reaped five times a second.
SLOW = {**QUICK, "lease_seconds": 3.0}


@pytest.fixture
def slow(db_url: str, fake_ollama: FakeOllama) -> Settings:
    return make_settings(db_url, fake_ollama.url, **SLOW)


async def test_a_slow_live_upload_keeps_its_lease_and_is_not_closed(
    slow: Settings, start_service: StartService, db_url: str
) -> None:
    """A body that pauses for longer than a lease (a slow generator on the client) renews the
    batch's lease while it waits, so the reaper leaves it be; it ends with every row. Nor does
    a lease that lapsed by the clock alone (a laptop woke from sleep) close an upload of the
    reaper's own process, as it keeps its own running tasks."""
    async with start_service(slow) as svc:
        port = int(svc.url.rsplit(":", 1)[1])
        with captured(logging.WARNING) as logged:
            writer = await open_upload(port, range(1, 61))
            await wait_until(lambda: stored(db_url) == 50, timeout=10)
            first = batch(db_url)[3]
            assert first is not None
            lapsed = datetime.fromisoformat(first).timestamp() + 2 * SLOW["lease_seconds"]

            def still_loading(after: str, wall: float = 0.0) -> bool:
                status, lease = batch(db_url)[1], batch(db_url)[3]
                assert status == "loading", "a live upload was closed"
                assert lease is not None
                return datetime.now(UTC).timestamp() > wall and lease > after

            await wait_until(lambda: still_loading(first, lapsed), timeout=20, interval=0.05)
            # The clock jumps: the lease lapsed long ago. The reaper (five times a second)
            # leaves it be until the next renewal (every second) holds it again.
            sql_rows(db_url, "UPDATE batches SET upload_expires_at = '2000-01-01T00:00:00Z'")
            await wait_until(lambda: still_loading("2001"), timeout=10, interval=0.05)
            send(writer, b"".join(b"row %d\n" % i for i in range(61, 81)))
            send(writer, b"")  # the body's end
            await writer.drain()
            await wait_until(lambda: batch(db_url)[1] == "loaded", timeout=10)
            writer.close()
        assert batch(db_url)[2:] == (80, None)
        assert [e for e in logged if e["event"] == "batch.upload_lost"] == []


@pytest.mark.empty_database
async def test_migration_19_gives_a_keyless_batch_left_loading_a_lapsed_lease(db_url: str) -> None:
    """Batches left ``loading`` by a crash before the lease existed are closed by the first
    reaper after the upgrade: they had no upload left to renew it. One with a key is not."""
    old = Database(db_url)

    def version_18(conn: Connection) -> None:
        stop_at(conn, 18)
        for key, status in [("NULL", "loading"), ("'k'", "loading"), ("NULL", "loaded")]:
            # (A keyed batch with a lapsed lease, below, is not closed either.)
            conn.exec_driver_sql(
                "INSERT INTO batches (template, template_version, options, status, "
                f"idempotency_key, created_at) VALUES ('t', 1, '{{}}', '{status}', {key}, "
                "'2026-01-01T00:00:00.000000Z')"
            )

    await old.transaction(version_18)
    try:
        await upgrade(old)
        assert sql_rows(db_url, "SELECT id, upload_expires_at FROM batches ORDER BY id") == [
            (1, "2026-01-01T00:00:00.000000Z"),
            (2, None),
            (3, None),
        ]
        sql_rows(db_url, "UPDATE batches SET upload_expires_at = '2000-01-01' WHERE id = 2")
        [closed] = await BatchStore(old).reap_uploads(iso(now()))
        assert (closed["id"], closed["status"], closed["upload_expires_at"]) == (1, "loaded", None)
        assert await BatchStore(old).reap_uploads(iso(now())) == []
    finally:
        await old.close()


async def test_a_batch_closed_while_its_upload_stalled_is_opened_again_by_it(
    slow: Settings, start_service: StartService, db_url: str
) -> None:
    """A process stalled past its lease (SIGSTOP with `hang_timeout = 0`, say) has its live
    upload closed by another process's reaper: the batch showed `loaded`, its rows done and
    its progress 1.0, while its rows still came. The upload's next renewal opens it again."""
    async with start_service(slow) as svc:
        port = int(svc.url.rsplit(":", 1)[1])
        with captured(logging.WARNING) as logged:
            writer = await open_upload(port, range(1, 61))
            await wait_until(lambda: stored(db_url) == 50, timeout=10)
            # What a reaper elsewhere writes (close_lost_uploads' mark_loaded):
            sql_rows(
                db_url,
                "UPDATE batches SET status = 'loaded', row_count = 50, "
                "loaded_at = '2000-01-01T00:00:00.000000Z', upload_expires_at = NULL",
            )
            await wait_until(lambda: batch(db_url)[1] == "loading", timeout=10, interval=0.05)
            # Logged just after the renewal that opened it again commits.
            await wait_until(lambda: events(logged, "batch.upload_reopened"), timeout=10)
            assert batch(db_url)[3] is not None  # held again
            send(writer, b"".join(b"row %d\n" % i for i in range(61, 81)))
            send(writer, b"")
            await writer.drain()
            await wait_until(lambda: batch(db_url)[1] == "loaded", timeout=10)
            writer.close()
        assert batch(db_url)[2:] == (80, None)
        [(loaded_at,)] = sql_rows(db_url, "SELECT loaded_at FROM batches")
        assert not loaded_at.startswith("2000"), loaded_at  # its own end's time
        [reopened] = events(logged, "batch.upload_reopened")
        assert reopened["batch_id"] == batch(db_url)[0]
