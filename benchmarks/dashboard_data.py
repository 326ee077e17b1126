"""The dashboard's reads at scale: a database of a million realistic tasks, and the time each
read the dashboard makes takes on it.

    python benchmarks/dashboard_data.py [--rows 1000000] [--db PATH] [--keep] [--out JSON]

With ``--db`` naming an existing file it is reused (populating a million rows takes a while);
otherwise a fresh one is filled in a temporary folder. Each read runs five times through
:class:`~orchestra.db.overview.DashboardStore` (the service's own connections); the best time
is printed. Figures belong in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from orchestra.db import Database
from orchestra.db.overview import DashboardStore
from orchestra.db.schema import upgrade
from orchestra.domain import TaskFilter, TaskStatus

TEMPLATES = {  # name: (weight, steps)
    "summarize": (30, 1),
    "translate": (20, 1),
    "classify": (15, 1),
    "extract": (10, 1),
    "sentiment": (10, 1),
    "keywords": (8, 1),
    "summarize_long": (5, 2),
    "qa": (2, 1),
}
MODELS = {  # name: weight (percent); the last is rare on purpose
    "llama3.2:3b": 45.0,
    "qwen2.5:7b": 30.0,
    "gpt-4o-mini": 20.0,
    "smollm2:135m": 4.8,
    "mistral-nemo:12b": 0.2,
}
ERRORS = [
    {
        "type": "provider_unavailable",
        "message": "ollama: connection refused (http://127.0.0.1:11434)",
    },
    {"type": "model_not_found", "message": "ollama: model 'qwen2.5:7b' not found, try pulling it"},
    {"type": "timeout", "message": "the attempt ran longer than its timeout of 120 s"},
    {"type": "invalid_output", "message": "step 'summary': the answer is not valid JSON: line 1"},
    {"type": "lease_expired", "message": "the worker running this task stopped responding"},
]
#: JSON as the service writes it (msgspec: compact, UTF-8).
_json = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)
CANCELLED = _json({"type": "cancelled", "message": "cancelled by request"})
WORDS = (
    "the of and to in is for that on with as by this be are from at or an it not which have "
    "was all were can has more one their but so what about when up out other into time only "
    "new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three order "
    "customer shipment delivery account payment report quarterly revenue margin forecast team "
    "product release feature bug ticket support meeting agenda summary review contract clause "
    "supplier warehouse stock price discount invoice refund complaint survey feedback rating"
).split()
#: Words the search timings look for: one in about 1 % of tasks, one in none.
RARE, ABSENT = "escalation", "zyzzyva"
#: The last hour holds this share of all tasks (the rest spread over 29 days before it).
LAST_HOUR_SHARE = 0.06
CHUNK = 50_000


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _pools(rng: random.Random) -> tuple[list[str], list[str]]:
    """Params and results, ~200 bytes of JSON each, some with % and _ in them."""
    params = []
    for i in range(5000):
        text = _sentence(rng, 24)
        if i % 100 == 0:
            text += f" {RARE}"
        if i % 250 == 1:
            text += " 100% done_ok"
        params.append(_json({"text": text, "language": rng.choice(["en", "fr", "de"])}))
    results = [_json({"summary": _sentence(rng, 26)}) for _ in range(5000)]
    return params, results


def _iso(ts: float) -> str:
    """As :func:`orchestra.domain.iso` writes times (this is called millions of times)."""
    whole = int(ts)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((ts - whole) * 1e6):06d}Z"
    )


def _tasks(rows: int, now: float, rng: random.Random) -> Iterator[tuple[Any, ...]]:
    """Every task row in id order (created_at ascending)."""
    params, results = _pools(rng)
    templates = rng.choices(list(TEMPLATES), [w for w, _ in TEMPLATES.values()], k=rows)
    models = rng.choices(list(MODELS), list(MODELS.values()), k=rows)
    errors = [_json({**error, "step": "summary"}) for error in ERRORS]
    recent = int(rows * LAST_HOUR_SHARE)
    stamps = sorted(
        [now - 3600 - rng.random() * 29 * 86400 for _ in range(rows - recent)]
        + [now - rng.random() * 3600 for _ in range(recent)]
    )
    queued, running = max(rows // 500, 1), 8
    for i, created in enumerate(stamps):
        from_end = rows - i
        run_at = created_at = _iso(created)
        started = finished = result = error = owner = expires = None
        attempts = 1
        if from_end <= queued:
            status, attempts = "queued", 0
            if rng.random() < 0.2:  # submitted with a delay, due within the day
                run_at = _iso(now + rng.random() * 86400)
        elif from_end <= queued + running:
            status = "running"
            started = _iso(created + 0.05)
            owner, expires = "bench-worker", _iso(now + 30)
        else:
            r = rng.random()
            start = created + 0.01 + r * 2.0
            started, finished = _iso(start), _iso(start + rng.lognormvariate(0.7, 0.8))
            if r < 0.05:
                status, error = "failed", errors[i % len(errors)]
                attempts = 1 if i % 3 else 3
            elif r < 0.065:
                status, error = "cancelled", CANCELLED
            else:
                status, result = "succeeded", results[i % len(results)]
                attempts = 2 if i % 37 == 0 else 1
        yield (
            i + 1,
            templates[i],
            1,
            status,
            params[int(rng.random() * len(params))],
            models[i],
            result,
            error,
            5 if i % 20 == 0 else 0,
            attempts,
            run_at,
            owner,
            expires,
            created_at,
            started,
            finished,
        )


_INSERT_TASK = (
    "INSERT INTO tasks (id, template, template_version, status, params, model, result, error, "
    "priority, attempts, run_at, lease_owner, lease_expires_at, created_at, started_at, "
    "finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_STEP = (
    "INSERT INTO task_steps (task_id, attempt, step_id, position, status, output, model, "
    "prompt_tokens, completion_tokens, usage, started_at, finished_at, duration_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ATTEMPT = (
    "INSERT INTO task_attempts (task_id, number, worker, status, started_at, finished_at, error) "
    "VALUES (?, ?, 'bench-worker', ?, ?, ?, ?)"
)
_STEPPED = 200_000  # the newest tasks get step and attempt rows
OUTPUTS = [_json(_sentence(random.Random(n), 12)) for n in range(1000)]


def _details(row: tuple[Any, ...], rng: random.Random) -> tuple[list[Any], list[Any]]:
    """A started task's steps (current attempt) and attempts."""
    task_id, template, status, model, attempts = row[0], row[1], row[3], row[5], row[9]
    started, finished, error = row[14], row[15], row[7]
    if started is None or attempts == 0:
        return [], []
    steps = []
    for position in range(TEMPLATES[template][1]):
        prompt, completion = rng.randint(80, 1500), rng.randint(10, 400)
        usage = _json({"prompt_tokens": prompt, "completion_tokens": completion})
        ok = status != "failed" or position == 0 and TEMPLATES[template][1] > 1
        steps.append(
            (
                task_id,
                attempts,
                "summary" if position == 0 else f"part{position}",
                position,
                "succeeded" if ok else "failed",
                OUTPUTS[task_id % len(OUTPUTS)] if ok else None,
                model,
                prompt,
                completion,
                usage,
                started,
                finished,
                rng.uniform(200, 4000),
            )
        )
    word = {"running": "running", "succeeded": "succeeded"}.get(status, status)
    tries = [
        (task_id, n, "failed" if n < attempts else word, started, finished, error)
        for n in range(1, attempts + 1)
    ]
    return steps, tries


def populate(db_path: Path, rows: int = 1_000_000) -> None:
    """Fill a fresh database at ``db_path`` (migrated here) with ``rows`` realistic tasks.

    Statuses are mostly succeeded (about 5 % failed, 1.5 % cancelled), the newest 0.2 %
    queued (a fifth of them delayed) and eight running; eight templates and five models (one
    rare); created_at spread over 30 days, 6 % in the last hour; ~200 bytes of JSON params and
    results; the newest 200,000 tasks have their steps (with tokens) and attempts. Events are
    left out. The counters end exact because the triggers stay on during the inserts (with
    temp_store=MEMORY, so the statement journal each INSERT keeps for them stays in memory).
    """

    async def migrate() -> None:
        db = Database(f"sqlite+aiosqlite:///{db_path}")
        try:
            await upgrade(db)
        finally:
            await db.close()

    asyncio.run(migrate())
    rng = random.Random(15)
    now = time.time()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-1000000")
        # The triggers make each INSERT keep a statement journal; in memory it costs a quarter.
        conn.execute("PRAGMA temp_store=MEMORY")
        chunk: list[tuple[Any, ...]] = []
        steps: list[Any] = []
        tries: list[Any] = []

        def flush() -> None:
            conn.execute("BEGIN")
            conn.executemany(_INSERT_TASK, chunk)
            conn.executemany(_INSERT_STEP, steps)
            conn.executemany(_INSERT_ATTEMPT, tries)
            conn.execute("COMMIT")
            chunk.clear()
            steps.clear()
            tries.clear()

        for row in _tasks(rows, now, rng):
            chunk.append(row)
            if row[0] > rows - _STEPPED:
                more_steps, more_tries = _details(row, rng)
                steps.extend(more_steps)
                tries.extend(more_tries)
            if len(chunk) >= CHUNK:
                flush()
        if chunk:
            flush()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def _best(run: Callable[[], Awaitable[Any]], times: int = 5) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(times):
        started = time.perf_counter()
        value = await run()
        best = min(best, time.perf_counter() - started)
    return best * 1000, value


def _rows(page: Any) -> str:
    return f"{len(page.items)} rows"


def _number(n: int) -> str:
    return f"{n:,}"


def _reads(store: DashboardStore, now: datetime, deep: int | None) -> list[Read]:
    """What the dashboard asks, the first two being what its overview and tasks pages need."""
    day_ago, days = now - timedelta(days=1), timedelta(days=1)
    failed = TaskStatus.FAILED

    def page(**fields: Any) -> Callable[[], Awaitable[Any]]:
        return lambda: store.page(TaskFilter(**fields))

    def count(**fields: Any) -> Callable[[], Awaitable[Any]]:
        return lambda: store.count(TaskFilter(**fields))

    return [
        ("overview", lambda: store.overview(now), lambda o: f"{o.counts['queued']:,} queued"),
        ("page: no filter (first page)", page(), _rows),
        ("counts", store.counts, lambda c: f"{sum(c.values()):,} tasks"),
        ("page: 21st page (cursor)", lambda: store.page(TaskFilter(), before=deep), _rows),
        ("page: status=failed", page(status=failed), _rows),
        ("page: template=qa (2 %)", page(template="qa"), _rows),
        ("page: model=gpt-4o-mini", page(model="gpt-4o-mini"), _rows),
        ("page: rare model (0.2 %)", page(model="mistral-nemo:12b"), _rows),
        ("page: a model no task has", page(model="no-such-model"), _rows),
        ("page: created in the last day", page(created_from=day_ago), _rows),
        ("page: created in the next hour (none)", page(created_from=now), _rows),
        (
            "page: created 20-21 days ago",
            page(created_from=now - 21 * days, created_to=now - 20 * days),
            _rows,
        ),
        (
            "page: created 1-20 days ago",
            page(created_from=now - 20 * days, created_to=day_ago),
            _rows,
        ),
        (
            "page: failed + summarize + text",
            page(status=failed, template="summarize", text="refused"),
            _rows,
        ),
        (f"page: text '{RARE}' (1 %)", page(text=RARE), _rows),
        ("page: text '100% done_ok' (0.4 %)", page(text="100% done_ok"), _rows),
        (f"page: text '{ABSENT}' (none)", page(text=ABSENT), _rows),
        ("count: no filter", count(), _number),
        ("count: status=failed", count(status=failed), _number),
        ("count: failed + summarize", count(status=failed, template="summarize"), _number),
        ("count: template=summarize", count(template="summarize"), _number),
        ("count: created in the last day", count(created_from=day_ago), _number),
        (f"count: text '{RARE}'", count(text=RARE), _number),
        (
            "matching_ids: queued+running, 500",
            lambda: store.matching_ids(
                TaskFilter(), [TaskStatus.QUEUED, TaskStatus.RUNNING], None, 500
            ),
            lambda ids: f"{len(ids)} ids",
        ),
    ]


Read = tuple[str, Callable[[], Awaitable[Any]], Callable[[Any], str]]


async def measure(db_path: Path) -> list[tuple[str, float, str]]:
    """Each dashboard read on ``db_path``: (what, best of 5 in ms, what it answered)."""
    db = Database(f"sqlite+aiosqlite:///{db_path}")
    store = DashboardStore(db)
    try:
        deep = None
        for _ in range(20):  # the cursor of the 21st page
            deep = (await store.page(TaskFilter(), before=deep)).next_cursor
        out = []
        for name, run, describe in _reads(store, datetime.now(UTC), deep):
            ms, value = await _best(run)
            out.append((name, ms, describe(value)))
        return out
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="reuse this database (filled when missing)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary database")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="orchestra-dashboard-"))
    path = args.db or folder / "dashboard.db"
    report: dict[str, Any] = {"rows": args.rows, "populate_s": None}
    if not path.exists():
        started = time.perf_counter()
        populate(path, args.rows)
        report["populate_s"] = round(time.perf_counter() - started, 1)
        size = path.stat().st_size / 1e6
        print(f"populated {args.rows:,} tasks in {report['populate_s']} s ({size:,.0f} MB): {path}")
    results = asyncio.run(measure(path))
    width = max(len(name) for name, _, _ in results)
    print(f"{'read':<{width}}  {'best of 5':>10}  answer")
    for name, ms, answer in results:
        print(f"{name:<{width}}  {ms:>7.1f} ms  {answer}")
    report["reads"] = [{"read": n, "best_ms": round(ms, 2), "answer": a} for n, ms, a in results]
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.db is None and not args.keep:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
