"""A batch of 100,000 CSV rows against the fake model, and interactive tasks during it
(issue 21 §1).

Starts ``orchestra serve`` (SQLite, 4 workers) and the fake model (answering at once), uploads
a CSV of ``--rows`` rows to ``POST /api/v1/batches`` as a stream, and while the batch runs
submits single tasks one after another, ``--every`` seconds apart, until the batch is done (or
``--singles`` of them), measuring each one's pickup (its ``started_at`` minus its
``created_at``, both the service's clock): so the figure covers the upload and the run in
proportion to their time. The service's RSS is sampled all along; at the
end the results are downloaded as CSV and checked to be in row order.

    python benchmarks/batch_bench.py --out figures.json [--rows 100000] [--every 0.25]
        [--singles N]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sampler, fake_model, free_port, process, rss_mb, summary_ms, wait_http  # noqa: E402


def _config(folder: Path, model: str, port: int) -> Path:
    config = folder / "orchestra.toml"
    config.write_text(
        f"[server]\nport = {port}\n"
        f'[database]\nurl = "sqlite+aiosqlite:///{folder / "bench.db"}"\nmin_free_mb = 0\n'
        "[workers]\nconcurrency = 4\n"
        f'[providers.ollama]\nurl = "{model}"\n'
        "[providers.embedded]\nenabled = false\n"
        '[logging]\nlevel = "warning"\nformat = "json"\n'
    )
    return config


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


async def _body(rows: int) -> AsyncIterator[bytes]:
    yield b"text,sentences\n"
    for start in range(0, rows, 1000):
        end = min(rows, start + 1000)
        yield b"".join(b"row %d of the dataset,1\n" % i for i in range(start, end))


async def _progress(client: httpx.AsyncClient, batch_id: int) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.get(f"/api/v1/batches/{batch_id}")).json()
    return answer


async def _singles(
    client: httpx.AsyncClient, n: int, every: float, stop: asyncio.Event
) -> list[float]:
    """Submit single tasks one at a time while the batch runs (at most ``n``; 0: no limit),
    ``every`` seconds apart; each one's pickup in s."""
    pickups: list[float] = []
    while not stop.is_set() and (not n or len(pickups) < n):
        body = {  # calls the model each time, as the rows do (they differ: no cache hit)
            "template": "summarize",
            "params": {"text": "interactive", "sentences": 1},
            "cache": False,
        }
        task = (await client.post("/api/v1/tasks", json=body)).json()
        done = (await client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 30})).json()
        if done.get("started_at"):
            pickups.append(_seconds(done["created_at"], done["started_at"]))
        await asyncio.sleep(every)
    return pickups


async def measure(port: int, pid: int, rows: int, singles: int, every: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        rss_before = rss_mb([pid])
        with Sampler([pid]) as sampler:
            started = time.monotonic()
            upload = asyncio.create_task(
                client.post(
                    "/api/v1/batches",
                    params={"template": "summarize", "format": "csv"},
                    content=_body(rows),
                )
            )
            # Interactive tasks from the moment batch rows run.
            while not upload.done():
                listed = (await client.get("/api/v1/batches")).json()["items"]
                if listed and (await _progress(client, listed[0]["id"]))["counts"].get("succeeded"):
                    break
                await asyncio.sleep(0.2)
            stop = asyncio.Event()
            probe = asyncio.create_task(_singles(client, singles, every, stop))
            answer = (await upload).json()
            upload_s = time.monotonic() - started
            batch_id = answer["batch"]["id"]
            while True:
                progress = await _progress(client, batch_id)
                left = progress["counts"].get("queued", 0) + progress["counts"].get("running", 0)
                if not left:
                    break
                await asyncio.sleep(0.5)
            run_s = time.monotonic() - started
            stop.set()
            pickups = await probe
            rss_run_peak = sampler.peak
            got = time.monotonic()
            text = (
                await client.get(f"/api/v1/batches/{batch_id}/results", params={"format": "csv"})
            ).text
            download_s = time.monotonic() - got
            rss_peak = sampler.peak
        order = [int(r["row"]) for r in csv.DictReader(io.StringIO(text))]
    return {
        "rows": rows,
        "accepted": answer["batch"]["rows"] - answer["batch"]["invalid"],
        "upload_s": round(upload_s, 1),
        "upload_rows_per_s": round(rows / upload_s),
        "run_s": round(run_s, 1),
        "rows_per_s": round(rows / run_s),
        "succeeded": progress["counts"].get("succeeded", 0),
        "singles": len(pickups),
        "every": every,
        "pickup": summary_ms(pickups),
        "pickup_max_ms": round(max(pickups) * 1000, 2) if pickups else None,
        "rss_before_mb": rss_before,
        "rss_run_peak_mb": rss_run_peak,
        "rss_peak_mb": rss_peak,
        "download_s": round(download_s, 1),
        "results_in_order": order == list(range(1, rows + 1)),
        "load_average": round(os.getloadavg()[0], 1),
    }


def markdown(r: dict[str, Any]) -> str:
    """RESULTS.md's section for these figures."""
    p99 = r["pickup"]["p99_ms"]
    return "\n".join(
        [
            f"### A batch of {r['rows']:,} rows, and interactive tasks during it (issue 21 §1)",
            "",
            f"`benchmarks/batch_bench.py`: one `orchestra serve` (SQLite, 4 workers), the fake "
            f"model answering at once. A CSV of {r['rows']:,} rows streamed to "
            "`POST /api/v1/batches`; from when its rows run until the batch is done, single "
            f"tasks submitted one at a time, {r['every']} s apart ({r['singles']} of them), "
            "each one's pickup its `started_at` minus its `created_at`. RSS: the service "
            "process, sampled every 0.1 s.",
            "",
            "| figure | measured | target | met |",
            "|---|---|---|---|",
            f"| upload ({r['rows']:,} rows read, checked, queued) | {r['upload_s']} s "
            f"({r['upload_rows_per_s']:,} rows/s) | | |",
            f"| batch done (upload included) | {r['run_s']} s ({r['rows_per_s']:,} rows/s), "
            f"{r['succeeded']:,} succeeded | | |",
            f"| single-task pickup during the batch, p50 | {r['pickup']['p50_ms']} ms | | |",
            f"| single-task pickup during the batch, p99 | **{p99} ms** | < 10 ms | "
            f"{'yes' if p99 < 10 else '**no**'} |",
            f"| service RSS before → peak while running → peak with the results download | "
            f"{r['rss_before_mb']} → {r['rss_run_peak_mb']} → {r['rss_peak_mb']} MB | flat | |",
            f"| results as CSV, in row order | {r['download_s']} s, in order: "
            f"{'yes' if r['results_in_order'] else '**no**'} | in order | "
            f"{'yes' if r['results_in_order'] else '**no**'} |",
            "",
            f"Load average when it ran: {r['load_average']:.1f}.",
            "",
        ]
    )


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--singles", type=int, default=0, help="at most this many (0: no limit)")
    parser.add_argument("--every", type=float, default=0.25, help="seconds between singles")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, fake_model(0, Path(tmp)) as model:
        folder = Path(tmp)
        port = free_port()
        config = _config(folder, model, port)
        serve = [sys.executable, "-m", "orchestra", "serve", "--config", str(config)]
        with process(serve, folder / "serve.log") as proc:
            wait_http(f"http://127.0.0.1:{port}/health")
            result = asyncio.run(measure(port, proc.pid, args.rows, args.singles, args.every))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
