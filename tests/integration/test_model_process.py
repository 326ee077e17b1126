"""The embedded model's process: real llama.cpp in a real child, crashed for real.

Each test runs ``python -m orchestra.llm.model_child`` with SmolLM2 and ends it with a real
signal, as a crash in native code would. Nothing of the runtime is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestra.errors import ProviderError, ProviderUnreachable
from orchestra.llm import model_wire as wire
from orchestra.llm.model_crashes import Backoff
from orchestra.llm.model_process import ModelProcess, State
from tests.fixtures.logs import captured, events
from tests.fixtures.real_model import MODEL, REAL_MODEL
from tests.fixtures.servers import wait_until

pytestmark = [
    *REAL_MODEL,
    pytest.mark.timeout(120),
]

STORY = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
HELLO = [{"role": "user", "content": "Say hello."}]


def hello(request_id: int) -> wire.Generate:
    return wire.Generate(request_id, HELLO, {"max_tokens": 4, "temperature": 0})


@pytest.fixture
async def process() -> AsyncIterator[ModelProcess]:
    proc = ModelProcess("embedded", wire.Load(str(MODEL), 0, 0), backoff=Backoff(first=0.05))
    try:
        yield proc
    finally:
        await proc.stop()


async def generating(proc: ModelProcess, tokens: int = 2000) -> tuple[asyncio.Task[object], int]:
    """A long generation, once its first token has arrived; and the process's pid."""
    first = asyncio.Event()

    def story(request_id: int) -> wire.Generate:
        return wire.Generate(request_id, STORY, {"max_tokens": tokens, "temperature": 0.8})

    task = asyncio.create_task(proc.request(story, lambda _text: first.set()))
    await asyncio.wait_for(first.wait(), timeout=60)
    pid = proc.info().pid
    assert pid is not None
    return task, pid


def gone(pid: int) -> bool:
    """The process no longer exists, not even as a zombie waiting to be reaped."""
    return not Path(f"/proc/{pid}").exists()


async def test_the_model_answers_in_its_own_process_with_its_full_context(
    process: ModelProcess,
) -> None:
    pieces: list[str] = []
    answer = await process.request(hello, pieces.append)
    assert isinstance(answer, wire.Generated)
    assert answer.text == "".join(pieces) and answer.completion_tokens == len(pieces) > 0
    assert process.loaded is not None
    assert process.loaded.n_ctx == process.loaded.n_ctx_train == 8192  # SmolLM2's own
    info = process.info()
    assert info.state == "ready" and info.pid != os.getpid()
    assert info.rss_bytes is not None and info.rss_bytes > 50 * 1024 * 1024  # the model's


async def stops_within(process: ModelProcess, task: asyncio.Task[object]) -> float:
    """Cancel ``task`` and return the seconds until the process stopped working on it."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: not process.working, timeout=30, interval=0.005)
    return loop.time() - started


async def test_a_cancel_stops_the_generation_within_a_second(process: ModelProcess) -> None:
    task, _ = await generating(process)
    assert await stops_within(process, task) < 1.0
    assert isinstance(await process.request(hello), wire.Generated)  # and it serves on


async def test_a_cancel_stops_a_long_prompt_before_its_first_token(
    process: ModelProcess,
) -> None:
    await process.preload()
    text = "The council met on Tuesday and talked about the library. " * 400  # ~5,000 tokens

    def summary(request_id: int) -> wire.Generate:
        prompt = f"Summarize this text:\n{text}"
        return wire.Generate(request_id, [{"role": "user", "content": prompt}], {"max_tokens": 50})

    pieces: list[str] = []
    task = asyncio.create_task(process.request(summary, pieces.append))
    await wait_until(lambda: process.working, timeout=10, interval=0.001)  # evaluating it
    assert await stops_within(process, task) < 1.0  # seconds of evaluation were left
    assert pieces == []  # stopped before its first token
    answer = await process.request(hello)
    assert isinstance(answer, wire.Generated) and answer.text


async def test_a_caller_that_gives_up_waiting_its_turn_never_reaches_the_process(
    process: ModelProcess,
) -> None:
    first, pid = await generating(process, tokens=150)
    waiting = asyncio.create_task(process.request(hello))
    await asyncio.sleep(0)  # it is queued behind the story
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    answer = await first  # the story goes on to its end, in the same process
    assert isinstance(answer, wire.Generated) and answer.completion_tokens > 1
    assert process.info().pid == pid and process.info().crashes == 0


async def test_a_crash_fails_the_call_in_flight_and_a_new_process_answers_the_next(
    process: ModelProcess,
) -> None:
    task, pid = await generating(process)
    os.kill(pid, signal.SIGSEGV)
    with pytest.raises(ProviderUnreachable, match=r"SIGSEGV \(signal 11\) during generation"):
        await task
    await wait_until(lambda: process.state is State.READY, timeout=60)
    info = process.info()
    assert info.pid not in (None, pid)
    assert (info.crashes, info.restarts) == (1, 1)
    assert info.last_crash is not None and info.last_crash.signal == signal.SIGSEGV
    assert info.last_crash.phase == "generation"
    assert isinstance(await process.request(hello), wire.Generated)
    assert gone(pid)  # reaped by the service: no zombie


async def test_three_crashes_in_the_window_keep_it_down_until_a_probe_succeeds(
    process: ModelProcess,
) -> None:
    for _ in range(3):
        await wait_until(lambda: process.state in (State.IDLE, State.READY), timeout=60)
        await process.preload()
        pid = process.info().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda gone_pid=pid: process.info().pid != gone_pid, timeout=10)
    assert process.state is State.DOWN
    assert "down after 3 crash(es)" in process.detail
    assert "out-of-memory killer" in process.detail  # what a SIGKILL from outside may be
    assert "[providers.embedded] context_length" in process.detail  # (it said providers.NAME)
    with pytest.raises(ProviderUnreachable, match="down after 3") as down:
        await process.request(hello)
    # A task's retry waits for the next health check's probe: nothing comes back before.
    assert down.value.retry_after == process.probe_every == 30.0
    process.probe()  # a health check's: a fresh process loads and generates a token
    assert process.state is State.STARTING
    await wait_until(lambda: process.state is State.READY, timeout=60)
    assert isinstance(await process.request(hello), wire.Generated)
    # Now a process like any other: a crash restarts it with a backoff, it is not down.
    pid = process.info().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: process.state is not State.READY, timeout=10)
    assert process.state in (State.RESTARTING, State.STARTING)


async def test_stop_during_a_start_fails_the_waiting_call_and_nothing_starts_again() -> None:
    proc = ModelProcess("embedded", wire.Load(str(MODEL), 0, 0))
    call = asyncio.create_task(proc.request(hello))
    await wait_until(lambda: proc.state is State.STARTING, timeout=10)
    await proc.stop()
    with pytest.raises(ProviderUnreachable, match="stopped"):
        await call
    proc.probe()
    assert proc.state is State.STOPPED and proc.info().pid is None


async def test_a_crash_while_loading_is_reported_with_what_to_do(tmp_path: Path) -> None:
    # A FIFO as the model file: the loader blocks opening it, so the crash is surely mid-load.
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    proc = ModelProcess("embedded", wire.Load(str(fifo), 0, 0), backoff=Backoff(first=30))
    try:
        starting = asyncio.create_task(proc.preload())
        await wait_until(lambda: proc.info().pid is not None, timeout=10)
        pid = proc.info().pid
        assert pid is not None
        os.kill(pid, signal.SIGSEGV)
        await starting
        assert proc.state is State.RESTARTING
        crash = proc.info().last_crash
        assert crash is not None and crash.phase == "loading"
        assert "SIGSEGV (signal 11) during loading" in crash.message
        assert "rebuild llama-cpp-python" in crash.message
        assert proc.info().restart_at is not None
        assert proc.detail.startswith("restarting in 30s")
        assert not proc.serving
    finally:
        await proc.stop()


async def test_a_model_that_does_not_load_in_time_is_down_not_stuck(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # the loader waits on it for ever
    proc = ModelProcess("embedded", wire.Load(str(fifo), 0, 0), timeout=1)
    try:
        await proc.preload()
        assert proc.state is State.DOWN
        assert "did not load within 1s" in proc.detail
        assert proc.info().crashes == 0 and proc.info().pid is None  # ended, not crashed
        with pytest.raises(ProviderUnreachable, match="did not load within 1s"):
            await proc.request(hello)
    finally:
        await proc.stop()


async def test_a_file_that_is_no_model_is_reported_without_a_crash(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file\n" * 100)
    proc = ModelProcess("embedded", wire.Load(str(junk), 0, 0))
    try:
        with (
            captured(logging.WARNING) as logged,
            pytest.raises(ProviderUnreachable, match="cannot load"),
        ):
            await proc.request(hello)
        assert proc.state is State.DOWN
        assert proc.info().crashes == 0
        # Said as a warning (it was an info line of the state alone: helper-129).
        [failed] = events(logged, "model_process.load_failed")
        assert str(junk) in failed["error"] and failed["provider"] == "embedded"
    finally:
        await proc.stop()


async def test_a_prompt_longer_than_the_context_fails_naming_the_sizes() -> None:
    proc = ModelProcess("embedded", wire.Load(str(MODEL), 256, 0))
    text = "word " * 600

    def long(request_id: int) -> wire.Generate:
        return wire.Generate(request_id, [{"role": "user", "content": text}], {"max_tokens": 8})

    try:
        with pytest.raises(ProviderError, match="context window of 256") as caught:
            await proc.request(long)
        assert "summarize_long" in str(caught.value)
        assert not isinstance(caught.value, ProviderUnreachable)  # permanent: not retried
        assert proc.state is State.READY and proc.info().crashes == 0
    finally:
        await proc.stop()


async def test_stop_ends_the_process(process: ModelProcess) -> None:
    await process.preload()
    pid = process.info().pid
    assert pid is not None
    await process.stop()
    assert process.state is State.STOPPED
    await wait_until(lambda: gone(pid), timeout=10)


async def test_embeddings_options_and_threads_work_in_the_process() -> None:
    proc = ModelProcess("embedded", wire.Load(str(MODEL), 1024, 1))  # one thread, 1k context
    try:

        def embed(request_id: int) -> wire.Embed:
            return wire.Embed(request_id, ["a red apple", "a red apple", "the stock market"])

        vectors = await proc.request(embed)
        assert isinstance(vectors, wire.Embedded) and vectors.prompt_tokens > 0
        first, again, other = vectors.vectors
        assert len(first) == 576 and first == again and first != other  # SmolLM2's width

        def counting(request_id: int) -> wire.Generate:
            prompt = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
            return wire.Generate(request_id, prompt, {"temperature": 0, "stop": ["5"]})

        one = await proc.request(counting)
        two = await proc.request(counting)
        assert isinstance(one, wire.Generated) and isinstance(two, wire.Generated)
        assert one.text == two.text and "5" not in one.text  # temperature 0; the stop held
        assert one.finish_reason == "stop" and one.prompt_tokens > 10
        assert proc.loaded is not None and proc.loaded.n_ctx == 1024
    finally:
        await proc.stop()


async def test_a_call_queued_behind_a_hung_one_waits_for_it_and_then_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The call before hangs in native code (here: stopped) and times out. The queued call's
    time ran from when it queued (it timed out without reaching the model), and it was sent
    into the process still busy with the call abandoned, failing when that was killed
    (helper-129). It waits for its turn, which comes once the hung process is ended, and a
    new process answers it."""
    from orchestra.llm import model_process

    monkeypatch.setattr(model_process, "CANCEL_GRACE", 1.0)
    load = wire.Load(str(MODEL), 0, 0)
    proc = ModelProcess("embedded", load, timeout=60.0, backoff=Backoff(first=0.05))
    try:
        await proc.preload()  # loaded within a minute, however busy the machine
        # Each call's time from its turn: the story's ends in it, the next one's covers a
        # fresh process's load (seconds on a loaded machine: CI's 3 failed the first token).
        proc.timeout = 10.0
        story, pid = await generating(proc)
        os.kill(pid, signal.SIGSTOP)  # hung: it takes no cancel
        queued = asyncio.create_task(proc.request(hello))
        with pytest.raises(TimeoutError):
            await story  # 10 s from its turn
        answer = await queued  # past 10 s of waiting: its own 10 s count from its turn
        assert isinstance(answer, wire.Generated) and answer.text
        assert proc.info().pid != pid and gone(pid)
    finally:
        await proc.stop()


async def _unseeded_poem() -> str:
    proc = ModelProcess("embedded", wire.Load(str(MODEL), 0, 0))
    poem = [{"role": "user", "content": "Write a short poem about the sea."}]
    try:
        answer = await proc.request(
            lambda i: wire.Generate(i, poem, {"max_tokens": 24, "temperature": 1.0})
        )
    finally:
        await proc.stop()
    assert isinstance(answer, wire.Generated)
    return answer.text


async def test_sampling_without_a_seed_differs_from_one_process_to_the_next() -> None:
    """llama.cpp's draw without a seed starts over in each process: every fresh process (a
    restart, another service process) answered the same "random" text (helper-129)."""
    assert await _unseeded_poem() != await _unseeded_poem()


async def test_tokens_are_counted_as_the_model_counts_them_not_as_streamed_pieces(
    process: ModelProcess,
) -> None:
    """A piece of streamed text may hold several tokens: 13 counted of a 20-token answer in
    Chinese, 488 of 512 in German."""
    poem = [{"role": "user", "content": "请用中文写一首关于大海的诗。"}]
    pieces: list[str] = []
    answer = await process.request(
        lambda i: wire.Generate(i, poem, {"max_tokens": 20, "temperature": 0}), pieces.append
    )
    assert isinstance(answer, wire.Generated) and answer.finish_reason == "length"
    assert answer.completion_tokens >= 20 > len(pieces), (answer.completion_tokens, len(pieces))
    assert 40 < answer.prompt_tokens < 60, answer.prompt_tokens  # the chat-formatted prompt
