"""The classic stack (FastAPI + Celery + Redis) on workloads 1, 4 and 5 and issue 17's submit
and read, with the same client, the same fake model and the same template text as
orchestra_bench.py. Runs in the venv that `make bench` makes for it (.bench-venv), with Redis
from Debian's redis-server package.

    python benchmarks/classic_bench.py [--tasks 5000] [--only throughput,slots,backlog,submit_read]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TEXT,
    Sampler,
    TaskApi,
    busy_share,
    fake_model,
    free_port,
    process,
    rss_mb,
    submit_many,
    submit_read_workload,
    wait_count,
    wait_http,
)

HERE = Path(__file__).resolve().parent
CLIENTS = 64
BODY = {"template": "summarize", "params": {"text": TEXT, "sentences": 1}}
BIN = Path(sys.executable).parent
#: The classic app's API (benchmarks/classic/app.py) as the submit-and-read client drives it.
API = TaskApi(
    submit="/api/v1/tasks",
    read="/api/v1/tasks/{id}",
    finished=frozenset({"success", "failure", "revoked"}),
    succeeded="success",
)


@contextmanager
def stack(model: str, folder: Path, pool: str, concurrency: int) -> Iterator[dict[str, Any]]:
    """Redis, the FastAPI app under uvicorn and a Celery worker; yields URLs and pids."""
    redis_port, api_port = free_port(), free_port()
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}",
        "MODEL_URL": model,
        "PYTHONPATH": str(HERE / "classic"),
    }
    with ExitStack() as stack_:
        r = stack_.enter_context(
            process(
                [server, "--port", str(redis_port), "--dir", str(folder), "--save", ""],
                folder / f"redis-{redis_port}.log",
            )
        )
        client = redis.Redis(port=redis_port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        api = stack_.enter_context(
            process(
                [
                    str(BIN / "uvicorn"),
                    "app:api",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                folder / f"api-{api_port}.log",
                env=env,
            )
        )
        url = f"http://127.0.0.1:{api_port}"
        wait_http(f"{url}/docs")
        worker = stack_.enter_context(
            process(
                [
                    str(BIN / "celery"),
                    "-A",
                    "app",
                    "worker",
                    "--pool",
                    pool,
                    "--concurrency",
                    str(concurrency),
                    "--loglevel",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                folder / f"worker-{pool}-{api_port}.log",
                env=env,
            )
        )
        ping_deadline = time.monotonic() + 60
        from celery import Celery

        control = Celery(broker=f"redis://127.0.0.1:{redis_port}/0")
        while not control.control.ping(timeout=0.5):
            if time.monotonic() > ping_deadline:
                raise RuntimeError("the Celery worker did not start")
        yield {
            "url": url,
            "redis": redis.Redis(port=redis_port, db=1),
            "broker": redis.Redis(port=redis_port, db=0),
            "pids": [r.pid, api.pid, worker.pid],
            "roles": {"api": api.pid, "worker": worker.pid, "redis": r.pid},
            "env": env,
        }


async def _wait_results(results: redis.Redis, n: int) -> float:
    """The time ``n`` results were stored (polled every 20 ms)."""
    return await wait_count(lambda: int(results.dbsize()), n, "results stored")


async def throughput(folder: Path, n: int, pool: str, concurrency: int) -> dict[str, Any]:
    with fake_model(0, folder) as model, stack(model, folder, pool, concurrency) as s:
        await asyncio.sleep(1.0)
        idle = rss_mb(s["pids"])
        with Sampler(s["pids"]) as sampler:
            first, last, _ = await submit_many(n, CLIENTS, BODY, s["url"])
            done = await _wait_results(s["redis"], n)
        return {
            "pool": pool,
            "concurrency": concurrency,
            "tasks": n,
            "tasks_per_s": round(n / (done - first), 1),
            "submits_per_s": round(n / (last - first), 1),
            "seconds": round(done - first, 2),
            "rss_idle_mb": idle,
            "rss_peak_mb": sampler.peak,
        }


async def slots(folder: Path, pool: str, workers: int = 64, rounds: int = 10) -> dict[str, Any]:
    with fake_model(200, folder) as model, stack(model, folder, pool, workers) as s:
        n = workers * rounds
        with Sampler(s["pids"]) as sampler:
            await submit_many(n, CLIENTS, BODY, s["url"])
            await _wait_results(s["redis"], n)
        share, _ = busy_share(model, workers)
        return {
            "pool": pool,
            "workers": workers,
            "tasks": n,
            "busy_share": share,
            "rss_peak_mb": sampler.peak,
        }


async def backlog(folder: Path, pool: str, queued: int = 100_000) -> dict[str, Any]:
    """100,000 tasks due in an hour (Celery's eta), as Orchestra's backlog workload."""
    with fake_model(0, folder) as model, stack(model, folder, pool, 2) as s:
        await asyncio.sleep(1.0)
        before = rss_mb(s["pids"])
        sys.path.insert(0, str(HERE / "classic"))
        os.environ.update(s["env"])
        import app  # the same Celery app, pointed at this Redis

        app.celery.conf.broker_url = s["env"]["REDIS_URL"] + "/0"
        app.celery.conf.result_backend = s["env"]["REDIS_URL"] + "/1"
        params = {"sentences": 1, "style": "paragraph", "text": TEXT}
        with app.celery.connection_for_write() as conn:
            for _ in range(queued):
                app.summarize.apply_async((params,), countdown=3600, connection=conn)
        await asyncio.sleep(5.0)  # the worker takes them (eta tasks are held by the worker)
        return {
            "queued": queued,
            "rss_before_mb": before,
            "rss_with_backlog_mb": rss_mb(s["pids"]),
        }


async def submit_read(folder: Path, n: int, concurrency: int = 64) -> dict[str, Any]:
    """Issue 17's workload: n tasks submitted and each read over HTTP (`GET ?wait=`), 64 in
    flight, model latency 0; then idle round trips. The same client as orchestra_bench.py's;
    the service's CPU is the API's, the worker's and Redis's."""
    with fake_model(0, folder) as model, stack(model, folder, "threads", concurrency) as s:
        figures = await submit_read_workload(
            s["url"], s["roles"], API, BODY, n, CLIENTS, model=model
        )
        return {"pool": "threads", "concurrency": concurrency, **figures}


WORKLOADS = ("throughput", "slots", "backlog", "submit_read")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--skip-backlog", action="store_true")
    args = parser.parse_args()
    only = args.only.split(",")
    if unknown := set(only) - set(WORKLOADS):
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="classic-bench-") as tmp:
        folder = Path(tmp)
        if "throughput" in only:
            results["throughput"] = []
            for pool, concurrency in (("prefork", 2), ("threads", 32)):
                result = await throughput(folder, args.tasks, pool, concurrency)
                print("throughput", json.dumps(result), file=sys.stderr, flush=True)
                results["throughput"].append(result)
        if "slots" in only:
            results["slots"] = []
            for pool in ("prefork", "threads"):
                result = await slots(folder, pool)
                print("slots", json.dumps(result), file=sys.stderr, flush=True)
                results["slots"].append(result)
        if "backlog" in only and not args.skip_backlog:
            results["backlog"] = await backlog(folder, "prefork")
            print("backlog", json.dumps(results["backlog"]), file=sys.stderr, flush=True)
        if "submit_read" in only:
            results["submit_read"] = await submit_read(folder, args.tasks)
            print("submit_read", json.dumps(results["submit_read"]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
