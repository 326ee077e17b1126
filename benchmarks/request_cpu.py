"""Service CPU per request: what one request costs the service, as a client on one keep-alive
connection sends it (the fake model answers health checks at once).

    .venv/bin/python benchmarks/request_cpu.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fake_model  # noqa: E402
from orchestra_bench import service  # noqa: E402

#: (label, path) of each request measured.
REQUESTS = [
    ("GET /health", "/health"),
    ("GET /health?check=now", "/health?check=now"),
    ("GET /api/v1/models", "/api/v1/models"),
]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, pid: int, path: str, n: int) -> float:
    """Milliseconds of service CPU per request, over ``n`` sequential requests."""
    with httpx.Client(base_url=url) as client:
        for _ in range(50):  # warm up: connection, caches
            client.get(path).raise_for_status()
        before = cpu_seconds(pid)
        for _ in range(n):
            client.get(path).raise_for_status()
        return (cpu_seconds(pid) - before) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with fake_model(0, folder) as model_url, service(model_url, folder, 4) as (url, pid, _):
            for label, path in REQUESTS:
                ms = measure(url, pid, path, args.requests)
                print(f"{label:<28} {ms:.2f} ms of service CPU per request")


if __name__ == "__main__":
    main()
