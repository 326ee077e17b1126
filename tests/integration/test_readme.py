"""The README's examples, run as a newcomer would run them, on the default model.

A fenced ```sh block just after the line ``<!-- example -->`` is an example: each runs, in
README order, as one bash script from the repository root against a fresh ``orchestra serve``
with the default settings and no model server (Ollama refuses connections), so the embedded
SmolLM2 answers. ``localhost:8000`` becomes the test service's address.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import sql_rows
from tests.fixtures.real_model import REAL_MODEL
from tests.fixtures.servers import free_port, free_socket, start_process

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- example -->"
pytestmark = [pytest.mark.slow, *REAL_MODEL, pytest.mark.timeout(600)]


def examples(text: str) -> list[str]:
    """The body of every marked ```sh block, in order."""
    lines = text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() != MARK:
            continue
        assert lines[i + 1].strip() == "```sh", f"README line {i + 2}: a ```sh block must follow"
        body = []
        for inner in lines[i + 2 :]:
            if inner.strip() == "```":
                break
            body.append(inner)
        out.append("\n".join(body))
    return out


def test_the_readme_shows_the_api_and_the_cli() -> None:
    found = "\n".join(examples((ROOT / "README.md").read_text()))
    assert "curl" in found and "orchestra submit" in found


async def test_every_readme_example_runs_on_the_default_model(tmp_path: Path, db_url: str) -> None:
    port = free_port()
    closed = free_socket()  # bound, never listening: Ollama's address refuses connections
    config = tmp_path / "orchestra.toml"
    config.write_text(
        f'[server]\nport = {port}\n[database]\nurl = "{db_url}"\n'
        f'[providers.ollama]\nurl = "http://127.0.0.1:{closed.getsockname()[1]}"\n'
    )
    service = await start_process(config)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRA_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        for block in examples((ROOT / "README.md").read_text()):
            script = "set -euo pipefail\n" + block.replace("localhost:8000", f"127.0.0.1:{port}")
            run = await asyncio.create_subprocess_exec(
                "bash", "-c", script, cwd=ROOT, env=env, stdout=-1, stderr=-1
            )
            out, err = await asyncio.wait_for(run.communicate(), timeout=300)
            assert run.returncode == 0, f"{block}\n---\n{out.decode()}\n{err.decode()}"
    finally:
        service.terminate()
        await service.wait()
        closed.close()
    tasks = sql_rows(db_url, "SELECT id, status, error FROM tasks ORDER BY id")
    models = {row[0] for row in sql_rows(db_url, "SELECT DISTINCT model FROM task_steps")}
    assert tasks, "the examples submitted no task"
    assert all(status == "succeeded" for _, status, _ in tasks), tasks
    assert models == {"embedded/smollm2"}
