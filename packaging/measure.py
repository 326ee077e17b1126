"""Start times of a single binary: seconds from exec to a 200 on /health, first start (an
empty cache) and later starts, in a clean environment. The figures go to
benchmarks/RESULTS.md ("The single binary").

    python packaging/measure.py dist/orchestra [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (and the children they have reaped)."""
    parent: dict[int, int] = {}
    spent: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        parent[child] = int(fields[1])
        spent[child] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(spent.get(p, 0.0) for p in tree)


def start_to_health(binary: Path, cwd: Path, home: Path) -> tuple[float, float]:
    """Seconds from starting ``serve`` to a 200 on /health, and the CPU seconds its
    processes spent until then; the service is stopped after."""
    port = _free_port()
    began = time.monotonic()
    proc = subprocess.Popen(
        [
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            f"HOME={home}",
            str(binary),
            "serve",
            "--port",
            str(port),
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - began, tree_cpu(proc.pid)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() - began > 300:
                raise RuntimeError("no 200 on /health within 300 s")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("binary", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        firsts: list[tuple[float, float]] = []
        laters: list[tuple[float, float]] = []
        for i in range(args.runs):
            home, cwd = root / f"home{i}", root / f"run{i}"
            home.mkdir()
            cwd.mkdir()
            binary = cwd / "orchestra"
            shutil.copy2(args.binary, binary)
            firsts.append(start_to_health(binary, cwd, home))
            laters.append(start_to_health(binary, cwd, home))
            shutil.rmtree(home)
        size = args.binary.stat().st_size / 1e6
        print(f"size: {size:.1f} MB; load average {os.getloadavg()[0]:.1f}")
        for name, runs in (("first start", firsts), ("later start", laters)):
            walls, cpus = [w for w, _ in runs], [c for _, c in runs]
            print(
                f"{name}: wall median {statistics.median(walls):.2f} s "
                f"(min {min(walls):.2f}, max {max(walls):.2f}); CPU median "
                f"{statistics.median(cpus):.2f} s (min {min(cpus):.2f}, max {max(cpus):.2f}); "
                f"{len(runs)} runs"
            )


if __name__ == "__main__":
    main()
