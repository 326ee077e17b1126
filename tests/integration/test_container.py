"""The container image, built from its own commands.

No container engine can build the image here (no registry to pull the base image from), so
these tests run the Containerfile's own commands outside one: the builder stage's `make`
target, then the final stage's `pip install` into a fresh virtual environment, then the
service with the image's environment. A test that builds and runs the real image runs where
podman can, and is skipped cleanly elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import pytest

from tests.fixtures.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.timeout(900)]


def stages() -> list[list[tuple[str, str]]]:
    """The Containerfile's stages, each a list of (INSTRUCTION, arguments), lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Containerfile").read_text())
    out: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            out.append([])
        out[-1].append((instruction.upper(), args.strip()))
    return out


def final_env() -> dict[str, str]:
    """The environment the final stage sets (ENV A=1 B=2)."""
    env: dict[str, str] = {}
    for instruction, args in stages()[-1]:
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def make_plan(wheels: Path, **env: str) -> str:
    """What `make wheels` would do with a fresh wheel folder (-n: nothing is built)."""
    base = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    done = subprocess.run(
        ["make", "-n", "wheels", f"WHEELS={wheels}"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_the_builder_stage_builds_llama_cpp_portably_with_the_makefile(tmp_path: Path) -> None:
    builder, final = stages()
    assert ("RUN", "make wheels") in builder
    assert any(i == "ARG" and a.startswith("CMAKE_ARGS") for i, a in builder)
    assert ("COPY", "--from=builder /src/.wheels/*.whl /wheels/") in final
    # A build argument left out arrives as an empty CMAKE_ARGS: the portable default, which
    # leaves AMX out (no -march=native), as an unset one does.
    for plan in (make_plan(tmp_path), make_plan(tmp_path, CMAKE_ARGS="")):
        build = next(line for line in plan.splitlines() if "pip wheel" in line)
        assert "-DGGML_NATIVE=OFF" in build and "-DGGML_AVX2=ON" in build
        assert "--no-cache-dir --no-binary llama-cpp-python" in plan
    # A user's own flags win, and are remembered for the next build.
    custom = make_plan(tmp_path, CMAKE_ARGS="-DGGML_CUDA=on")
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in custom and "GGML_NATIVE=OFF" not in custom
    assert f"> {tmp_path}/cmake-args" in custom


async def test_the_final_stage_installs_and_answers_a_task_with_no_model_server(
    tmp_path: Path,
) -> None:
    subprocess.run(["make", "wheels"], cwd=ROOT, check=True, capture_output=True)  # the builder
    wheels = ROOT / ".wheels"
    install = next(a for i, a in stages()[-1] if i == "RUN" and "pip install" in a)
    command = install.split("&&")[0].replace("/wheels/", f"{wheels}/")
    prefix = tmp_path / "image"
    # A fresh environment without pip of its own: this suite's pip installs into it
    # (--python), as the image's pip into the image's Python. Putting a pip into the new
    # environment first (ensurepip) took 5 s of CPU and up to a minute on a busy machine.
    venv.create(prefix, with_pip=False)
    pip = f"{sys.executable} -m pip --python {prefix}/bin/python install -q"
    # No bytecode compiling (the image sets PYTHONDONTWRITEBYTECODE too): a few seconds less.
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_COMPILE": "1"}
    subprocess.run(
        ["bash", "-c", command.replace("pip install", pip)],
        check=True,
        env=pip_env,
        capture_output=True,
    )
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRA_")},
        **final_env(),
        "ORCHESTRA_SERVER__PORT": str(port),
        "ORCHESTRA_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'orchestra.db'}",
        "ORCHESTRA_LOGGING__FORMAT": "json",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        service = await asyncio.create_subprocess_exec(
            str(prefix / "bin" / "orchestra"), "serve", cwd=tmp_path, env=env, stderr=out
        )
    try:
        key = await _bootstrap_key(log, service)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
        ) as client:

            async def up() -> bool:
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, timeout=30, interval=0.05)
            body = {"template": "title", "params": {"text": "Orchestra runs AI tasks."}}
            task = (await client.post("/api/v1/tasks", json=body)).json()
            done = (await client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 60})).json()
            anonymous = await client.get("/api/v1/tasks", headers={"Authorization": ""})
    finally:
        service.terminate()
        await service.wait()
    assert done["status"] == "succeeded", done["error"]
    assert done["steps"][0]["provider"] == "embedded"  # no Ollama anywhere: the model inside
    assert anonymous.status_code == 401
    # A clean stop: uvicorn re-raises the SIGTERM it handled, once the service has stopped.
    assert service.returncode in (0, -signal.SIGTERM)
    assert '"event": "pool.stopped"' in log.read_text()


async def _bootstrap_key(log: Path, service: asyncio.subprocess.Process) -> str:
    """The admin key the first start prints, once /health answers."""
    found: list[str] = []

    def printed() -> bool:
        if service.returncode is not None:
            raise AssertionError(f"orchestra exited: {log.read_text()[-2000:]}")
        found[:] = re.findall(r"^\s+(orc_\S+)$", log.read_text(), re.MULTILINE)
        return bool(found)

    await wait_until(printed, timeout=60, interval=0.1)
    return found[0]


def _podman_can_build() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed"
    base = next(a for i, a in stages()[0] if i == "FROM").split()[0]
    probe = subprocess.run(
        ["podman", "pull", "-q", base], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        return f"podman cannot pull {base}: {probe.stderr.strip()[-200:]}"
    return None


def test_the_image_answers_a_task(tmp_path: Path) -> None:
    why = _podman_can_build()
    if why:
        pytest.skip(why)
    tag = "orchestra-test:latest"
    build = ["podman", "build", "--format", "docker", "-t", tag, "-f", "Containerfile", "."]
    subprocess.run(build, cwd=ROOT, check=True)
    port = free_port()
    container = subprocess.run(
        ["podman", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8000", tag],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        key = ""
        deadline = time.monotonic() + 60
        while not key and time.monotonic() < deadline:
            logs = subprocess.run(["podman", "logs", container], capture_output=True, text=True)
            match = re.search(r"^\s+(orc_\S+)$", logs.stderr, re.MULTILINE)
            key = match.group(1) if match else ""
            time.sleep(0.1)
        assert key, "the first start printed no admin key within 60 s"
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            body = {"template": "title", "params": {"text": "Orchestra runs AI tasks."}}
            task = client.post("/api/v1/tasks", json=body).json()
            done = client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 60}, timeout=70)
        assert done.json()["status"] == "succeeded"
    finally:
        subprocess.run(["podman", "stop", "-t", "15", container], capture_output=True)
