"""`make bench`: run Orchestra's workloads and the classic stack's, write benchmarks/RESULTS.md.

    python benchmarks/run.py --classic-python .bench-venv/bin/python [--tasks 5000]

Everything runs on loopback and stops when done; a run takes a few minutes on 2 cores (the
dashboard's part fills a database of a million tasks first: a minute or so, 770 MB in a
temporary folder; the hostile-input part takes about two minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_bench import markdown as batch_section  # noqa: E402
from common import machine  # noqa: E402
from dashboard_bench import markdown as dashboard_section  # noqa: E402
from followers_bench import markdown as followers_section  # noqa: E402
from hostile_bench import markdown as hostile_section  # noqa: E402
from pg_claim import markdown as pg_claim_section  # noqa: E402
from request_cpu import markdown as request_cpu_section  # noqa: E402
from scaleout_bench import markdown as scaleout_section  # noqa: E402

HERE = Path(__file__).resolve().parent


def _run(python: str, script: str, *args: str) -> dict[str, Any]:
    out = HERE / f".{Path(script).stem}.json"
    started = time.monotonic()
    subprocess.run([python, str(HERE / script), "--out", str(out), *args], check=True)
    print(f"{script}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    data: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return data


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def submit_read_section(o: dict[str, Any], c: dict[str, Any], added: dict[str, Any]) -> str:
    """Issue 17's side-by-side workload (`submit_read` in both benchmarks) against its targets.
    ``added`` is workload 3's figures (server-side added latency), or empty."""
    so, sc = o["submit_read"], c["submit_read"]
    ratio = so["tasks_per_s"] / sc["tasks_per_s"] if sc["tasks_per_s"] else 0.0
    cpu_c = sc["cpu_ms_per_task_by_process"]
    rss_c = sc["rss_peak_mb_by_process"]
    rss_o = max(so["rss_peak_mb_by_process"].values())
    trip_o, trip_c = so["idle_round_trip"], sc["idle_round_trip"]
    added_p50 = added.get("server", {}).get("p50_ms")
    lines = [
        "## Submit and read over HTTP (issue 17)",
        "",
        f"Both stacks in the same run, driven by the same client (`common.submit_read_workload`"
        f"): {so['tasks']} tasks, {so['clients']} in flight, each submitted "
        "(`POST /api/v1/tasks`) and then read over HTTP until finished "
        f"(`GET /api/v1/tasks/{{id}}?wait=30`: {so['reads_per_task']} GETs per task for "
        f"Orchestra, {sc['reads_per_task']} for classic), the model answering at once. "
        f"Orchestra: one process, {so['workers']} workers; classic: FastAPI under uvicorn, a "
        f"Celery worker (threads, {sc['concurrency']}) and Redis. Service CPU is utime + stime "
        "from /proc over the run ÷ tasks; for the classic stack the API process, the Celery "
        "worker and Redis together. Load average when each started: "
        f"{so['load_average']} (Orchestra), {sc['load_average']} (classic).",
        "",
        "| figure | Orchestra | classic | target | met |",
        "|---|---|---|---|---|",
        f"| tasks/s, one process | **{so['tasks_per_s']}** | {sc['tasks_per_s']} — ratio "
        f"{ratio:.2f}× | ≥ 1.3× classic | {_met(ratio >= 1.3)} |",
        f"| service CPU per task, HTTP reads included | **{so['cpu_ms_per_task']} ms** "
        f"({so['cores_used']} cores) | {sc['cpu_ms_per_task']} ms: API {cpu_c['api']} + worker "
        f"{cpu_c['worker']} + Redis {cpu_c['redis']} ({sc['cores_used']} cores) | ≤ 1.5 ms | "
        f"{_met(so['cpu_ms_per_task'] <= 1.5)} |",
        f"| idle round trip (submit, then `GET ?wait=`), one at a time | p50 "
        f"**{trip_o['p50_ms']} ms**, p99 {trip_o['p99_ms']} ms | p50 {trip_c['p50_ms']} ms, p99 "
        f"{trip_c['p99_ms']} ms | p50 ≤ 3 ms | {_met(trip_o['p50_ms'] <= 3)} |",
        "| added latency p50, server side (workload 3) | "
        + (
            f"{added_p50} ms | — | < 2 ms | {_met(added_p50 < 2)} |"
            if added_p50 is not None
            else "not run | — | < 2 ms | — |"
        ),
        f"| RSS per process, peak under this load | {rss_o} MB | API {rss_c['api']}, worker "
        f"{rss_c['worker']}, Redis {rss_c['redis']} MB | ≤ 100 MB | {_met(rss_o <= 100)} |",
        "| tasks/s, two processes | not measured (one process until the scale-out issue "
        "lands) | — | ≥ 2× classic | — |",
        "",
        f"Not succeeded: {so['not_succeeded']} (Orchestra), {sc['not_succeeded']} (classic). "
        f"The client's own CPU: {so['client_cpu_ms_per_task']} / "
        f"{sc['client_cpu_ms_per_task']} ms per task.",
    ]
    return "\n".join(lines)


def report(
    o: dict[str, Any],
    c: dict[str, Any],
    d: dict[str, Any],
    h: dict[str, Any],
    info: dict[str, Any],
    classic: str,
    r: dict[str, Any] | None = None,
) -> str:
    t = o["throughput"]
    best = max(c["throughput"], key=lambda r: r["tasks_per_s"])
    best_slots = max(c["slots"], key=lambda r: r["busy_share"])
    classic_rss = min(r["rss_peak_mb"] for r in c["throughput"])
    p, a, s, b, k = o["pickup"], o["added"], o["slots"], o["backlog"], o["claim_scale"]
    speedup = _ratio(t["tasks_per_s"], best["tasks_per_s"])
    packages = ", ".join(f"{name} {v}" for name, v in info["packages"].items())
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} with `make bench` on {info['cores']} cores "
        f"({info['cpu']}), {info['memory_gb']} GB, Python {info['python']}, SQLite "
        f"{info['sqlite']}; {packages}. Classic stack: {classic}.",
        "",
        "Everything runs on loopback: the service under test as its own processes, the fake "
        "model (benchmarks/fake_model.py, Ollama's /api/chat on a bare asyncio server) in "
        "another, and the load from the benchmark process (64 concurrent HTTP clients on "
        "keep-alive connections). Both stacks run the built-in `summarize` template text and "
        "log at warning level.",
        "",
        "## Results",
        "",
        "| # | workload | Orchestra | classic (best) | target | met |",
        "|---|---|---|---|---|---|",
        f"| 1 | throughput, {t['tasks']} tasks, model 0 ms | **{t['tasks_per_s']} tasks/s** "
        f"(submits {t['submits_per_s']}/s) | {best['tasks_per_s']} tasks/s "
        f"({best['pool']}, {best['concurrency']}) — ratio {speedup} | ≥ 1,500/s and ≥ 3× | "
        f"{_met(t['tasks_per_s'] >= 1500 and t['tasks_per_s'] >= 3 * best['tasks_per_s'])} |",
        f"| 2 | pickup, {p['rate_per_s']:g} tasks/s steady | p50 {p['p50_ms']} ms, p99 "
        f"{p['p99_ms']} ms | — | p50 < 1 ms, p99 < 5 ms | "
        f"{_met(p['p50_ms'] < 1 and p['p99_ms'] < 5)} |",
        f"| 3 | added latency, one task at a time | p50 {a['server']['p50_ms']} ms, p99 "
        f"{a['server']['p99_ms']} ms (client-seen p50 {a['client']['p50_ms']} ms) | — | "
        f"p50 < 2 ms | {_met(a['server']['p50_ms'] < 2)} |",
        f"| 4 | slots busy, model 200 ms, 64 slots | {s['busy_share'] * 100:.1f} % | "
        f"{best_slots['busy_share'] * 100:.1f} % ({best_slots['pool']}) | ≥ 95 % | "
        f"{_met(s['busy_share'] >= 0.95)} |",
        f"| 5 | RSS idle / under workload 1 | {t['rss_idle_mb']} / {t['rss_peak_mb']} MB | "
        f"{min(r['rss_idle_mb'] for r in c['throughput'])} / {classic_rss} MB (smallest) — ratio "
        f"{_ratio(t['rss_peak_mb'], classic_rss)} | ≤ 0.25× | "
        f"{_met(t['rss_peak_mb'] <= classic_rss / 4)} |",
        f"| 5 | RSS with {b['queued']:,} queued | {b['rss_before_mb']} → "
        f"{b['rss_with_backlog_mb']} MB | "
        + (
            f"{c['backlog']['rss_before_mb']} → {c['backlog']['rss_with_backlog_mb']} MB"
            if "backlog" in c
            else "not run"
        )
        + f" | flat | {_met(b['rss_with_backlog_mb'] <= b['rss_before_mb'] * 1.2)} |",
        f"| 6 | one claim, 1,000 vs 1,000,000 rows | p50 {k['1000']['p50_ms']} vs "
        f"{k['1000000']['p50_ms']} ms ({k['ratio_p50']}×) | — | ≤ 2× | "
        f"{_met(k['ratio_p50'] <= 2)} |",
        "",
        "Every classic configuration:",
        "",
        "| workload | pool | concurrency | tasks/s or busy | RSS peak (all processes) |",
        "|---|---|---|---|---|",
    ]
    for r in c["throughput"]:
        lines.append(
            f"| 1 throughput | {r['pool']} | {r['concurrency']} | {r['tasks_per_s']} tasks/s | "
            f"{r['rss_peak_mb']} MB |"
        )
    for r in c["slots"]:
        lines.append(
            f"| 4 slots | {r['pool']} | {r['workers']} | {r['busy_share'] * 100:.1f} % | "
            f"{r['rss_peak_mb']} MB |"
        )
    if "submit_read" in o and "submit_read" in c:
        lines += ["", submit_read_section(o, c, a)]
    lines += ["", dashboard_section(d).strip()]
    lines += ["", hostile_section(h).strip()]
    if r is not None:
        lines += ["", request_cpu_section(r).strip()]
    lines += ["", "## Method", "", (HERE / "METHOD.md").read_text().strip(), ""]
    lines += [
        "## Raw figures",
        "",
        "```json",
        json.dumps(
            {"orchestra": o, "classic": c, "dashboard": d, "hostile": h, "request_cpu": r},
            indent=2,
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classic-python", required=True)
    parser.add_argument("--tasks", default="5000")
    args = parser.parse_args()
    started = time.monotonic()
    orchestra = _run(sys.executable, "orchestra_bench.py", "--tasks", args.tasks)
    classic = _run(args.classic_python, "classic_bench.py", "--tasks", args.tasks)
    dashboard = _run(sys.executable, "dashboard_bench.py")
    hostile = _run(sys.executable, "hostile_bench.py")
    requests = _run(sys.executable, "request_cpu.py")
    scaleout = _run(sys.executable, "scaleout_bench.py", "--tasks", "3000")
    pg_claim = _run(sys.executable, "pg_claim.py")
    followers = _run(sys.executable, "followers_bench.py")
    batch = _run(sys.executable, "batch_bench.py")
    versions = subprocess.run(
        [
            args.classic_python,
            "-c",
            "import celery, fastapi, redis; print(f'FastAPI {fastapi.__version__}, "
            "Celery {celery.__version__}, redis-py {redis.__version__}')",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    redis_version = server.stdout.split("v=")[1].split()[0] if "v=" in server.stdout else "?"
    text = report(
        orchestra,
        classic,
        dashboard,
        hostile,
        machine(),
        f"{versions}, Redis {redis_version}",
        requests,
    )
    text += "\n" + scaleout_section(scaleout) + "\n" + pg_claim_section(pg_claim)
    text += "\n" + followers_section(followers)
    text += "\n" + batch_section(batch)
    (HERE / "RESULTS.md").write_text(text)
    print(f"benchmarks/RESULTS.md written in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
