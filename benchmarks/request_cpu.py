"""Service CPU per request and per task: what one request costs the service, as a client on one
keep-alive connection sends it, and what one task costs when clients submit it and read its
result over HTTP (the fake model answers at once). Part of `make bench` (benchmarks/run.py).

CPU is the service process's utime + stime from /proc, so other load on the machine counts
only as far as it slows the service's own work; each figure is the median of ``--repeat``
rounds. For scale, the same server (``server_config``, uvicorn) serving a Litestar handler
that returns a small dict is measured alongside.

    .venv/bin/python benchmarks/request_cpu.py [--requests 2000] [--tasks 1000] [--out FILE]
        [--python PY] [--only 'GET /health']

``--python`` runs the service with another interpreter: a virtualenv with or without
``orchestra[fast]`` (uvloop and httptools).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEXT, Connection, fake_model, free_port, process, wait_http  # noqa: E402

#: A task that runs (the fake model answers at once; not from the cache of model answers,
#: which the template's temperature 0 would use: every task calls the model).
BODY = {"template": "summarize", "params": {"text": TEXT, "sentences": 1}, "cache": False}
#: The same, due in an hour: POST alone, no worker runs it meanwhile.
LATER = {**BODY, "delay": 3600}
#: Issue 17's targets, in ms of service CPU per request.
TARGETS = {"GET /api/v1/tasks/{id}": 0.5, "POST /api/v1/tasks": 0.8, "GET /health": 0.3}
#: Logging set-ups the per-task figure is measured under: (level, extra [logging] lines).
LOGGING = {
    "warning": ("warning", ""),
    "info": ("info", ""),
    "info, access log on": ("info", "access_log = true"),
}
#: The framework's own cost: a Litestar handler returning a small dict, on the same server.
BARE_APP = """
import sys
import uvicorn
from litestar import Litestar, get
from orchestra.api.server import server_config
from orchestra.config import ServerSettings

@get("/small")
async def small() -> dict[str, str]:
    return {"status": "ok", "database": "ok"}

app = Litestar([small], logging_config=None)
uvicorn.Server(server_config(app, ServerSettings(port=int(sys.argv[1])))).run()
"""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def service(
    python: str, model_url: str, folder: Path, level: str, extra: str
) -> Iterator[tuple[str, int]]:
    """`orchestra serve` (4 workers) on a fresh database, logging JSON at ``level`` (plus
    ``extra`` lines in ``[logging]``); yields (URL, pid)."""
    port = free_port()
    config = folder / f"orchestra-{port}.toml"
    config.write_text(
        f"[server]\nport = {port}\n"
        f'[database]\nurl = "sqlite+aiosqlite:///{folder / f"orchestra-{port}.db"}"\n'
        f'[providers.ollama]\nurl = "{model_url}"\n'
        "[providers.embedded]\nenabled = false\n"
        f'[logging]\nlevel = "{level}"\nformat = "json"\n{extra}\n'
    )
    args = [python, "-m", "orchestra", "serve", "--config", str(config)]
    with process(args, folder / f"orchestra-{port}.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        yield url, proc.pid


def probes(client: httpx.Client, n: int) -> list[tuple[str, str, str, Any, int]]:
    """(label, method, path, JSON body, how many) of each request measured."""
    task = client.post("/api/v1/tasks", json=BODY).json()["id"]
    done = client.get(f"/api/v1/tasks/{task}", params={"wait": 30}).json()
    assert done["status"] == "succeeded", done
    return [
        ("GET /health", "GET", "/health", None, n),
        # A model server is asked each time: fewer.
        ("GET /health?check=now", "GET", "/health?check=now", None, n // 10),
        ("GET /api/v1/models", "GET", "/api/v1/models", None, n),
        ("GET /api/v1/tasks/{id}", "GET", f"/api/v1/tasks/{task}", None, n),
        ("POST /api/v1/tasks", "POST", "/api/v1/tasks", LATER, n),
    ]


def per_request(client: httpx.Client, pid: int, method: str, path: str, body: Any, n: int) -> float:
    """Milliseconds of service CPU per request, over ``n`` sequential requests."""
    for _ in range(50):  # warm up: connection, caches
        client.request(method, path, json=body).raise_for_status()
    before = cpu_seconds(pid)
    for _ in range(n):
        client.request(method, path, json=body).raise_for_status()
    return (cpu_seconds(pid) - before) / n * 1000


async def per_task(url: str, pid: int, n: int, clients: int) -> float:
    """Milliseconds of service CPU per task: ``n`` tasks from ``clients`` concurrent keep-alive
    connections, each submitted, then read with ``GET …?wait=`` until it finished."""
    host, port = url.removeprefix("http://").split(":")
    left: Iterator[int] = iter(())

    async def one_client() -> None:
        conn = Connection(host, int(port))
        try:
            for _ in left:
                status, task = await conn.request("POST", "/api/v1/tasks", BODY)
                assert status == 201, task
                while task["status"] not in ("succeeded", "failed", "cancelled"):
                    status, task = await conn.request("GET", f"/api/v1/tasks/{task['id']}?wait=30")
                assert task["status"] == "succeeded", task
        finally:
            await conn.close()

    async def run(count: int) -> None:
        nonlocal left
        left = iter(range(count))
        await asyncio.gather(*(one_client() for _ in range(clients)))

    await run(clients * 4)  # warm up: connections, caches
    before = cpu_seconds(pid)
    await run(n)
    return (cpu_seconds(pid) - before) / n * 1000


def bare(python: str, folder: Path, n: int, repeat: int) -> float:
    """Milliseconds of CPU per request of a Litestar handler returning a small dict."""
    port = free_port()
    with process([python, "-c", BARE_APP, str(port)], folder / "bare.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/small")
        with httpx.Client(base_url=url) as client:
            rounds = [
                per_request(client, proc.pid, "GET", "/small", None, n) for _ in range(repeat)
            ]
    return round(statistics.median(rounds), 3)


def server_kind(python: str) -> dict[str, bool]:
    """Whether the service's interpreter has uvloop and httptools (``orchestra[fast]``)."""
    code = (
        "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('uvloop', 'httptools')])"
    )
    found = json.loads(
        subprocess.run(
            [python, "-c", code], capture_output=True, text=True, check=True
        ).stdout.lower()
    )
    return {"uvloop": found[0], "httptools": found[1]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure (ms of service CPU), each the median of ``args.repeat`` rounds; a service
    per logging set-up, all running, measured in turn each round, each round starting with
    the next (so the load of the moment weighs on each alike). With ``args.only``, only the
    requests whose label has it."""
    requests: dict[str, list[float]] = {}
    tasks: dict[str, list[float]] = {}
    set_ups = {"warning": LOGGING["warning"]} if args.only else LOGGING
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        model_url = stack.enter_context(fake_model(0, folder))
        services = {}
        for name, (level, extra) in set_ups.items():
            url, pid = stack.enter_context(service(args.python, model_url, folder, level, extra))
            client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
            measured = [p for p in probes(client, args.requests) if args.only in p[0]]
            # Every request as the other workloads log (warning); /health under the others.
            services[name] = (url, pid, client, measured if name == "warning" else measured[:1])
        order = list(services)
        for round_no in range(args.repeat):
            # Each round starts with the next set-up: where a service comes in the round (after
            # which other's load, in which phase of the machine) weighs on each alike.
            shift = round_no % len(order)
            for name in order[shift:] + order[:shift]:
                url, pid, client, measured = services[name]
                for label, method, path, body, n in measured:
                    ms = per_request(client, pid, method, path, body, n)
                    key = label if name == "warning" else f"{label} ({name})"
                    requests.setdefault(key, []).append(ms)
                if not args.only and args.tasks:
                    ms = asyncio.run(per_task(url, pid, args.tasks, args.clients))
                    tasks.setdefault(name, []).append(ms)
        litestar = bare(args.python, folder, args.requests, args.repeat) if not args.only else None
    return {
        "server": server_kind(args.python),
        "load_average": os.getloadavg()[0],
        "requests": args.requests,
        "repeat": args.repeat,
        "tasks": args.tasks,
        "clients": args.clients,
        "litestar_ms": litestar,
        "request_ms": {k: round(statistics.median(v), 3) for k, v in requests.items()},
        "task_ms": {k: round(statistics.median(v), 3) for k, v in tasks.items()},
    }


def markdown(r: dict[str, Any]) -> str:
    """The RESULTS.md section of these figures."""
    server = ", ".join(k for k, on in r["server"].items() if on) or "neither uvloop nor httptools"
    lines = [
        "## Service CPU per request",
        "",
        f"`benchmarks/request_cpu.py`: `orchestra serve` (4 workers, the model answering at "
        f"once, logging at warning unless said) with {server}; each request "
        f"{r['requests']} times in a row on one keep-alive connection, the service's utime + "
        f"stime from /proc ÷ requests, the median of {r['repeat']} rounds. Load average when it "
        f"ended: {r['load_average']:.1f} (other work on the machine slows the service's own "
        "too, so compare with the Litestar line, measured alongside).",
        "",
        "| request | service CPU | target | met |",
        "|---|---|---|---|",
        f"| a Litestar handler returning a small dict (the same server) | {r['litestar_ms']} ms "
        "| — | — |",
    ]
    for label, ms in r["request_ms"].items():
        request, _, logging = label.partition(" (")
        shown = f"`{request}`" + (f" (logging {logging}" if logging else "")
        target = TARGETS.get(label)
        met = "—" if target is None else ("yes" if ms <= target else "**no**")
        lines.append(f"| {shown} | {ms} ms | {f'≤ {target} ms' if target else '—'} | {met} |")
    if not r["task_ms"]:
        return "\n".join(lines)
    warning = r["task_ms"]["warning"]
    lines += [
        "",
        f"Per task ({r['tasks']} tasks from {r['clients']} clients, each submitted, then read "
        "with `GET …?wait=30` until finished), by logging set-up; issue 17 keeps info-level "
        "logging within 5 % of the CPU per task:",
        "",
        "| logging | service CPU per task | over warning |",
        "|---|---|---|",
    ]
    for name, ms in r["task_ms"].items():
        lines.append(f"| {name} | {ms} ms | {(ms / warning - 1) * 100:+.0f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--only", default="", help="only the requests whose label has this")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    figures = measure(args)
    for label, ms in figures["request_ms"].items():
        print(f"{label:<44} {ms:.3f} ms of service CPU")
    for name, ms in figures["task_ms"].items():
        print(f"{'a task, logging ' + name:<44} {ms:.3f} ms of service CPU")
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
