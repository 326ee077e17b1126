"""The service survives its embedded model: real llama.cpp in a real child process, killed.

Each test runs the whole service (HTTP on loopback, a SQLite file) with the embedded model
and kills the model's process with a real signal while it works, as a crash in native code
would. The service must lose no task, keep answering, and serve the next task from a new
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from orchestra.config import Settings
from tests.conftest import Service, StartService, with_provider
from tests.fixtures.real_model import REAL_MODEL
from tests.fixtures.servers import free_port, start_process, wait_until
from tests.fixtures.sse import read_events

pytestmark = [
    *REAL_MODEL,
    pytest.mark.timeout(180),
]

RAMBLE = """\
name: ramble
model: default
steps:
  - id: story
    prompt: Write a long story about a lighthouse keeper.
    options: {num_predict: 400, temperature: 0.8}
"""
#: RAMBLE retried at once: its retry is claimed while the crashed model still restarts (1 s
#: back-off, then a load), so the retry's order of entries is the one a crash leaves. With the
#: default retry delay (0.5-1 s) the restart raced it, and won under load.
RAMBLE_RETRIED_AT_ONCE = RAMBLE + "retry:\n  backoff: fixed\n  initial_delay: 10ms\n"
TEXT = "The council voted on Tuesday to build a new library. Work starts in March."


def embedded_first(settings: Settings, *chain: str, **embedded: Any) -> Settings:
    local = with_provider(settings, "embedded", enabled=True, **embedded)
    return msgspec.structs.replace(local, models={**local.models, "default": list(chain)})


async def model_pid(svc: Service) -> int:
    """The embedded model's process id, once it has one."""
    found: list[int] = []

    async def running() -> bool:
        health = (await svc.client.get("/health")).json()
        pid = (health["providers"]["embedded"]["process"] or {}).get("pid")
        found[:] = [pid] if pid else []
        return bool(pid)

    await wait_until(running, timeout=60, interval=0.05)
    return found[0]


async def kill_mid_generation(svc: Service, task_id: int) -> int:
    """SIGSEGV the model's process once the task's first tokens have streamed."""
    async for event in read_events(svc.client, f"/api/v1/tasks/{task_id}/events"):
        if event["event"] == "step.tokens":
            break
    pid = await model_pid(svc)
    os.kill(pid, signal.SIGSEGV)
    return pid


class HealthWatch:
    """Asks /health every 50 ms in the background; every answer must be a 200."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.answers: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                self.answers.append((await self.svc.client.get("/health")).status_code)
            except httpx.HTTPError:
                self.answers.append(0)
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_model_crash_mid_task_is_retried_and_a_new_process_answers(
    settings: Settings, start_service: StartService
) -> None:
    async with start_service(embedded_first(settings, "embedded/smollm2")) as svc:
        assert (await svc.client.post("/api/v1/templates", content=RAMBLE)).status_code == 201
        task = await svc.submit("ramble")
        async with HealthWatch(svc) as watch:
            crashed = await kill_mid_generation(svc, task["id"])
            done = await svc.wait(task["id"], seconds=60)
        health = (await svc.client.get("/health")).json()
        after = await svc.wait((await svc.submit("title", text=TEXT))["id"], seconds=60)
    assert done["status"] == "succeeded", done["error"]
    first, second = done["attempts"]
    assert first["status"] == "failed" and first["error"]["retryable"] is True
    assert (
        "embedded model process died: SIGSEGV (signal 11) during generation"
        in (first["error"]["message"])
    )
    # Not blamed on what the load printed ("n_ctx_seq (512) > n_ctx_train (0) -- possible
    # training context overflow" was quoted as "its last output" of every crash).
    assert "n_ctx" not in first["error"]["message"], first["error"]["message"]
    assert second["status"] == "succeeded"
    assert len(watch.answers) > 5 and set(watch.answers) == {200}
    process = health["providers"]["embedded"]["process"]
    assert process["pid"] not in (None, crashed)
    assert (process["crashes"], process["restarts"]) == (1, 1)
    assert process["last_crash"]["signal"] == "SIGSEGV"
    assert process["last_crash"]["phase"] == "generation"
    assert after["status"] == "succeeded" and after["steps"][0]["provider"] == "embedded"
    assert not Path(f"/proc/{crashed}").exists()  # reaped: no zombie


async def test_a_model_crash_mid_answer_is_retried_on_the_next_provider(
    settings: Settings, start_service: StartService
) -> None:
    """The crash came after the answer began streaming: the next entry is not asked in the
    same attempt (its text ran on from the dead model's, on the page and in the events),
    and the retry asks it first."""
    chain = ("embedded/smollm2", "ollama/llama3.2")  # the fake Ollama is second
    async with start_service(embedded_first(settings, *chain)) as svc:
        registered = await svc.client.post("/api/v1/templates", content=RAMBLE_RETRIED_AT_ONCE)
        assert registered.status_code == 201, registered.text
        task = await svc.submit("ramble")
        await kill_mid_generation(svc, task["id"])
        done = await svc.wait(task["id"], seconds=60)
        models = (await svc.client.get("/api/v1/models")).json()
    assert done["status"] == "succeeded", done["error"]
    first, second = done["attempts"]
    assert first["status"] == "failed" and "embedded model process died" in str(first["error"])
    assert second["status"] == "succeeded"
    assert done["steps"][0]["provider"] == "ollama"
    assert done["result"].startswith("ECHO: Write a long story")
    embedded = next(p for p in models["providers"] if p["name"] == "embedded")
    assert embedded["process"]["crashes"] == 1


async def test_a_crash_while_loading_leaves_the_service_up_and_health_says_why(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    fifo = tmp_path / "model.gguf"  # the loader blocks opening it: the crash is mid-load
    os.mkfifo(fifo)
    local = embedded_first(settings, "embedded/model", model_path=str(fifo), preload=True)
    seen: list[httpx.Response] = []
    async with start_service(local) as svc:
        os.kill(await model_pid(svc), signal.SIGSEGV)

        async def crashed() -> bool:
            seen[:] = [await svc.client.get("/health")]
            return bool(seen[0].json()["providers"]["embedded"]["process"]["crashes"] == 1)

        await wait_until(crashed, timeout=10, interval=0.02)
    [health] = seen  # as it was right after the crash (a restart follows within a second)
    assert health.status_code == 200
    embedded = health.json()["providers"]["embedded"]
    assert embedded["available"] is False
    crash = embedded["process"]["last_crash"]
    assert crash["phase"] == "loading" and crash["signal"] == "SIGSEGV"
    assert "rebuild llama-cpp-python" in crash["message"]
    assert "rebuild llama-cpp-python" in embedded["detail"]


async def test_a_text_longer_than_the_context_fails_at_once_naming_the_limit(
    settings: Settings, start_service: StartService
) -> None:
    local = embedded_first(settings, "embedded/smollm2", context_length=512)
    async with start_service(local) as svc:
        done = await svc.wait((await svc.submit("summarize", text=TEXT * 80))["id"], seconds=60)
    assert done["status"] == "failed"
    assert len(done["attempts"]) == 1  # permanent: retrying cannot help
    message = done["error"]["message"]
    assert "context window of 512" in message and "summarize_long" in message
    assert done["error"].get("retryable") is not True


# -- the service as a process of its own --------------------------------------------------


@pytest.fixture
def adopt_orphans() -> Iterator[None]:
    """Make this test process the reaper of orphans (PR_SET_CHILD_SUBREAPER), so a model
    process left behind by a killed service becomes our child and can be seen to exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        pytest.skip("PR_SET_CHILD_SUBREAPER is not available here")
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def running(pid: int) -> bool:
    """Whether ``pid`` still runs; an adopted orphan that exited is reaped here."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def maps_llama(pid: int) -> int:
    """How many of a process's memory mappings are llama.cpp's libraries."""
    return sum("llama" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def config_file(path: Path, port: int, db: Path) -> Path:
    path.write_text(
        f"[server]\nport = {port}\n"
        f'[database]\nurl = "sqlite+aiosqlite:///{db}"\n'
        "[providers.ollama]\nenabled = false\n"
        "[providers.embedded]\npreload = true\n"
        '[models]\ndefault = ["embedded/smollm2"]\n'
    )
    return path


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
async def test_no_model_process_outlives_the_service(
    tmp_path: Path, adopt_orphans: None, stop: signal.Signals
) -> None:
    port = free_port()
    config = config_file(tmp_path / "orchestra.toml", port, tmp_path / "orchestra.db")
    service = await start_process(config)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            async def ready() -> bool:
                health = (await client.get("/health")).json()
                return bool(health["providers"]["embedded"]["process"]["state"] == "ready")

            await wait_until(ready, timeout=60, interval=0.05)
            health = (await client.get("/health")).json()
            child = health["providers"]["embedded"]["process"]["pid"]
            body = {"template": "title", "params": {"text": TEXT}}
            task = (await client.post("/api/v1/tasks", json=body)).json()
            done = (await client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 60})).json()
            # The model answered, in its own process: the service never maps llama.cpp.
            assert done["status"] == "succeeded" and done["steps"][0]["provider"] == "embedded"
            assert maps_llama(service.pid) == 0 and maps_llama(child) > 0
            rss = health["providers"]["embedded"]["process"]["rss_bytes"]
            assert rss > 50 * 1024 * 1024  # the model's memory is the child's
    finally:
        service.send_signal(stop)
        await service.wait()
    await wait_until(lambda: not running(child), timeout=10)
