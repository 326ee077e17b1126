"""Scale-out: throughput with 1, 2 and 4 processes, and pickup across processes, on SQLite and
on PostgreSQL (issue 18).

    python benchmarks/scaleout_bench.py --out result.json [--tasks 3000]
        [--engines sqlite,postgresql] [--processes 1,2,4]

Throughput is issue 17's workload (``submit_read_workload``): tasks submitted and each read
back over HTTP, 64 in flight (``--clients``), against a fake model that answers at once,
with `orchestra serve --processes N`. The service's CPU counts every process of it, and on
PostgreSQL the database server's processes too (they do work SQLite does inside the
service).

Pickup: one process serves the API only (``--no-workers``), another runs the workers only
(``--no-api``); one task at a time is submitted to the first while the second is idle, and
the pickup is the task's ``started_at`` (written by the worker's claim) minus its
``created_at`` (written by the submit). PostgreSQL wakes the idle worker with NOTIFY; SQLite's
worker notices the other process's commit by ``PRAGMA data_version`` (every 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import httpx  # noqa: E402
from common import (  # noqa: E402
    TaskApi,
    fake_model,
    free_port,
    percentile,
    process,
    submit_read_workload,
    tree,
    wait_http,
)
from tests.fixtures.postgres import PostgresServer, running_postgres  # noqa: E402

CLIENTS = 64
#: ``cache: false``: every task calls the model (the template asks for temperature 0, so the
#: cache of model answers would answer all but the first).
BODY = {
    "template": "summarize",
    "params": {"text": "Scale out.", "sentences": 1},
    "cache": False,
}
#: ``--render-parts N``: a service-bound workload. The template file below computes a score
#: over N rounds before its one model call: a file's template renders on the service's event
#: loop (below 5 ms a render; longer ones go to the render processes), so what grows is the
#: service's own Python, and nothing else (the output, the prompt and what is stored stay
#: small).
DIGEST = """\
name: digest
description: Scores a text over many rounds (a render that costs the service CPU).
model: default
parameters:
  text: {type: string, required: true}
  parts: {type: integer, default: 100, minimum: 1, maximum: 100000}
steps:
  - id: score
    kind: render
    text: >-
      {% set ns = namespace(total=0) %}{% for i in range(params.parts) -%}
      {% set ns.total = ns.total + (params.text | length) * ((i * 7919) % 1000) %}{% endfor %}
      {{- ns.total }}
  - id: answer
    kind: llm
    prompt: "Summarize in one sentence, score {{ steps.score.output }}: {{ params.text }}"
output: "{{ steps.answer.output | trim }}"
"""


def _workload(folder: Path, render_parts: int) -> tuple[dict[str, Any], str]:
    """The task body and the config lines for it: the built-in ``summarize`` (0), or the
    digest template with ``render_parts`` parts."""
    if not render_parts:
        return BODY, ""
    templates = folder / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "digest.yaml").write_text(DIGEST)
    body = {
        "template": "digest",
        "params": {"text": "Scale out, with the service doing the work.", "parts": render_parts},
        "cache": False,
    }
    return body, f'[templates]\ndirs = ["{templates}"]\n'


API = TaskApi(
    submit="/api/v1/tasks",
    read="/api/v1/tasks/{id}",
    finished=frozenset({"succeeded", "failed", "cancelled"}),
    succeeded="succeeded",
)


def _config(folder: Path, url: str, model: str, port: int, extra: str = "", tail: str = "") -> Path:
    config = folder / f"orchestra-{port}.toml"
    config.write_text(
        f"[server]\nport = {port}\n{extra}\n"
        f'[database]\nurl = "{url}"\nmin_free_mb = 0\n'
        "[workers]\nconcurrency = 64\n"
        f'[providers.ollama]\nurl = "{model}"\n'
        "[providers.embedded]\nenabled = false\n"
        '[logging]\nlevel = "warning"\nformat = "json"\n'
        f"{tail}"
    )
    return config


@contextmanager
def _serve(folder: Path, config: Path, *flags: str) -> Iterator[tuple[str, int]]:
    port = int(config.stem.rsplit("-", 1)[1])
    args = [sys.executable, "-m", "orchestra", "serve", "--config", str(config), *flags]
    with process(args, config.with_suffix(".log")) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        yield url, proc.pid


def _wait_children(pid: int, n: int, timeout: float = 60) -> None:
    """Wait until ``serve --processes n`` has its n children, then a second for them to
    start serving."""
    if n == 1:
        return
    deadline = time.monotonic() + timeout
    while len(tree([pid])) < n + 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} processes did not start")
        time.sleep(0.05)
    time.sleep(2.0)


@contextmanager
def _database(engine: str, folder: Path, pg: PostgresServer | None, name: str) -> Iterator[str]:
    if engine == "sqlite":
        yield f"sqlite+aiosqlite:///{folder / (name + '.db')}"
        return
    assert pg is not None
    with pg.database() as url:
        yield url


def _postmaster(pg: PostgresServer | None) -> list[int]:
    if pg is None:
        return []
    pid_file = pg.folder / "data" / "postmaster.pid"
    return [int(pid_file.read_text().split()[0])]


async def throughput(
    engine: str,
    processes: int,
    tasks: int,
    folder: Path,
    pg: PostgresServer | None,
    render_parts: int = 0,
    clients: int = CLIENTS,
) -> dict[str, Any]:
    body, tail = _workload(folder, render_parts)
    with ExitStack() as stack:
        model = stack.enter_context(fake_model(0, folder))
        url = stack.enter_context(_database(engine, folder, pg, f"t{processes}"))
        config = _config(folder, url, model, free_port(), f"processes = {processes}", tail)
        base, pid = stack.enter_context(_serve(folder, config))
        _wait_children(pid, processes)
        roles = {"service": pid}
        if pg is not None:
            roles["postgresql"] = _postmaster(pg)[0]
        figures = await submit_read_workload(
            base, roles, API, body, tasks, clients, rounds=50, model=model
        )
    return {
        "engine": engine,
        "processes": processes,
        "render_parts": render_parts,
        "clients": clients,
        **figures,
    }


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def pickup(engine: str, folder: Path, pg: PostgresServer | None, n: int = 200) -> Any:
    with ExitStack() as stack:
        model = stack.enter_context(fake_model(0, folder))
        url = stack.enter_context(_database(engine, folder, pg, "pickup"))
        api_config = _config(folder, url, model, free_port())
        worker_config = _config(folder, url, model, free_port())
        base, _ = stack.enter_context(_serve(folder, api_config, "--no-workers"))
        stack.enter_context(_serve(folder, worker_config, "--no-api"))
        waits: list[float] = []
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for i in range(n + 10):
                task = (await client.post("/api/v1/tasks", json=BODY)).json()
                done = (await client.get(f"/api/v1/tasks/{task['id']}?wait=10")).json()
                assert done["status"] == "succeeded", done
                if i >= 10:  # warmed up
                    waits.append(_seconds(done["started_at"]) - _seconds(done["created_at"]))
                await asyncio.sleep(0.05)  # idle again
    return {
        "engine": engine,
        "tasks": n,
        "p50_ms": round(statistics.median(waits) * 1000, 2),
        "p99_ms": round(percentile(waits, 99) * 1000, 2),
        "max_ms": round(max(waits) * 1000, 2),
    }


def markdown(result: dict[str, Any]) -> str:
    """RESULTS.md's section."""
    lines = [
        "## Scale-out: processes and PostgreSQL (issue 18)",
        "",
        f"`benchmarks/scaleout_bench.py`, {result['tasks']} tasks submitted and each read back "
        f"over HTTP, {result.get('clients', CLIENTS)} in flight, fake model answering at once, "
        "`orchestra serve --processes N` "
        "(64 worker slots each). Service CPU counts every process, and on PostgreSQL the "
        "server's too. The load generator and the fake model run on the same 2 cores: "
        "their CPU per task is the instruments' column, and the ceiling is what the cores "
        "allow, all of them over all the CPU a task costs (service and instruments).",
        "",
        "| engine | processes | tasks/s | vs 1 process | service CPU per task | "
        "instruments' CPU per task | ceiling | of the ceiling | cores used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    one = {r["engine"]: r["tasks_per_s"] for r in result["throughput"] if r["processes"] == 1}
    for r in result["throughput"]:
        ratio = r["tasks_per_s"] / one[r["engine"]] if one.get(r["engine"]) else 0
        instruments = r["client_cpu_ms_per_task"] + r.get("model_cpu_ms_per_task", 0)
        ceiling = r.get("ceiling_tasks_per_s", 0)
        share = f"{100 * r['tasks_per_s'] / ceiling:.0f} %" if ceiling else "—"
        lines.append(
            f"| {r['engine']} | {r['processes']} | {r['tasks_per_s']} | {ratio:.2f}× | "
            f"{r['cpu_ms_per_task']} ms | {instruments:.2f} ms | {ceiling} | {share} | "
            f"{r['cores_used']} |"
        )
    lines += [
        "",
        "Pickup across processes (an idle worker-only process, a task submitted to an "
        "API-only process; `started_at − created_at`):",
        "",
        "| engine | p50 | p99 | max |",
        "|---|---|---|---|",
    ]
    for p in result["pickup"]:
        lines.append(f"| {p['engine']} | {p['p50_ms']} ms | {p['p99_ms']} ms | {p['max_ms']} ms |")
    return "\n".join(lines) + "\n"


async def main() -> None:
    # Stopped by a signal, still stop the servers (the context managers' exits run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument(
        "--render-parts",
        type=int,
        default=0,
        help="a service-bound workload: a template whose render builds N parts (0: summarize)",
    )
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help="tasks in flight (submitted, not yet read)"
    )
    parser.add_argument("--no-pickup", action="store_true", help="throughput only")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    result: dict[str, Any] = {
        "tasks": args.tasks,
        "clients": args.clients,
        "throughput": [],
        "pickup": [],
    }
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        for engine in args.engines.split(","):
            pg = stack.enter_context(running_postgres()) if engine == "postgresql" else None
            for n in counts:
                figures = await throughput(
                    engine, n, args.tasks, folder, pg, args.render_parts, args.clients
                )
                print(json.dumps(figures), file=sys.stderr)
                result["throughput"].append(figures)
            if not args.no_pickup:
                result["pickup"].append(await pickup(engine, folder, pg))
                print(json.dumps(result["pickup"][-1]), file=sys.stderr)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    asyncio.run(main())
