"""The claim's cost on PostgreSQL with many finished tasks in the table.

    python benchmarks/pg_claim.py --out result.json [--finished 1000000]

Starts a throwaway PostgreSQL (tests/fixtures/postgres.py: initdb and pg_ctl in a temporary
folder, fsync off), migrates it, and times the claim of one task (the service's own
``TaskStore.claim``, a transaction through the engine, as a worker runs it) with 1,000 tasks
queued: first with no finished task in the table, then after ``--finished`` finished ones
are added (one INSERT … SELECT from generate_series) and the table is vacuumed and
analysed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.conftest import sql_rows  # noqa: E402
from tests.fixtures.postgres import running_postgres  # noqa: E402

from orchestra.db import Database, TaskStore  # noqa: E402
from orchestra.db.schema import upgrade  # noqa: E402
from orchestra.domain import NewTask  # noqa: E402

QUEUED = 1000
CLAIMS = 300

FILL = """
INSERT INTO tasks (template, template_version, status, params, result, run_at, created_at,
                   started_at, finished_at, attempts)
SELECT 'summarize', 1, 'succeeded', '{"text": "x"}', '"done"',
       to_char(timestamp '2026-01-01' + g * interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       to_char(timestamp '2026-01-01' + g * interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       to_char(timestamp '2026-01-01' + g * interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       to_char(timestamp '2026-01-01' + g * interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       1
FROM generate_series(1, %d) AS g
"""


RECOUNT = (
    "UPDATE task_counts SET n = "
    "(SELECT count(*) FROM tasks WHERE tasks.status = task_counts.status)"
)


async def _claims(store: TaskStore) -> dict[str, float]:
    for _ in range(QUEUED):
        await store.enqueue(NewTask(template="t", template_version=1, params={}))
    times = []
    for _ in range(CLAIMS):
        started = time.perf_counter()
        [task] = await store.claim("bench", 1, 60)
        times.append((time.perf_counter() - started) * 1000)
        assert task is not None
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
    }


def _vacuum(url: str) -> None:
    import psycopg

    from orchestra.db.postgres_engine import conninfo

    with psycopg.connect(conninfo(url), autocommit=True) as pg:
        pg.execute("VACUUM (ANALYZE) tasks")


async def _run(url: str, finished: int) -> dict[str, Any]:
    db = Database(url)
    await upgrade(db)
    store = TaskStore(db)
    try:
        empty = await _claims(store)
        started = time.monotonic()
        # The counters' row trigger would update one row a million times in one statement
        # (each update a new version of it): fill without it, then count once.
        await asyncio.to_thread(sql_rows, url, "ALTER TABLE tasks DISABLE TRIGGER tr_task_counts")
        await asyncio.to_thread(sql_rows, url, FILL % finished)
        await asyncio.to_thread(sql_rows, url, RECOUNT)
        await asyncio.to_thread(sql_rows, url, "ALTER TABLE tasks ENABLE TRIGGER tr_task_counts")
        # As autovacuum would soon: without it, autovacuum's pass over the million new rows
        # runs during the claims and takes the CPU they are timed on (2 cores).
        await asyncio.to_thread(_vacuum, url)
        fill_s = time.monotonic() - started
        full = await _claims(store)
    finally:
        await db.close()
    return {"finished": finished, "fill_s": round(fill_s, 1), "empty": empty, "full": full}


def markdown(result: dict[str, Any]) -> str:
    """RESULTS.md's section for these figures."""
    e, f = result["empty"], result["full"]
    return "\n".join(
        [
            "### The claim on PostgreSQL with a million finished tasks",
            "",
            f"One task claimed ({CLAIMS} times, {QUEUED} queued), through the engine as a "
            "worker claims (`benchmarks/pg_claim.py`):",
            "",
            "| finished tasks in the table | claim p50 | claim p99 |",
            "|---|---|---|",
            f"| 0 | {e['p50_ms']} ms | {e['p99_ms']} ms |",
            f"| {result['finished']:,} | {f['p50_ms']} ms | {f['p99_ms']} ms |",
            "",
            "The claim reads the partial index of queued tasks (`ix_tasks_queue`), which "
            "finished tasks never enter.",
            "",
        ]
    )


def main() -> None:
    # Stopped by a signal, still stop the server (the context managers' exits run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--finished", type=int, default=1_000_000)
    args = parser.parse_args()
    with running_postgres() as server, server.database() as url:
        result = asyncio.run(_run(url, args.finished))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
