"""In-process wake-ups: which changes wake whom; single-flight reads: followers woken
together share one database query."""

from __future__ import annotations

import asyncio

import pytest

from orchestra.notify import TaskSignals
from orchestra.shared_read import SharedReads, Unanswered


async def test_concurrent_reads_of_one_key_share_one_load() -> None:
    shared = SharedReads()
    loads = 0
    gate = asyncio.Event()

    async def load() -> list[int]:
        nonlocal loads
        loads += 1
        await gate.wait()
        return [1, 2, 3]

    readers = [asyncio.create_task(shared.read(("events", 7, 0), load)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*readers)
    assert loads == 1
    assert results == [[1, 2, 3]] * 50


async def test_different_keys_and_later_reads_load_again() -> None:
    shared = SharedReads()
    seen: list[str] = []

    async def load(key: str) -> str:
        seen.append(key)
        return key

    assert await shared.read("a", lambda: load("a")) == "a"
    assert await shared.read("a", lambda: load("a")) == "a"  # the first read had finished
    assert await shared.read("b", lambda: load("b")) == "b"
    assert seen == ["a", "a", "b"]


async def test_a_failed_load_fails_every_waiting_reader_and_is_not_kept() -> None:
    shared = SharedReads()
    gate = asyncio.Event()

    async def broken() -> int:
        await gate.wait()
        raise OSError("disk gone")

    readers = [asyncio.create_task(shared.read("k", broken)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    for reader in readers:
        with pytest.raises(OSError, match="disk gone"):
            await reader

    async def fine() -> int:
        return 5

    assert await shared.read("k", fine) == 5


async def test_a_bounded_read_that_does_not_answer_is_unanswered_and_goes_on() -> None:
    """Probes wait at most ``wait`` from the read's start, the read goes on, and whoever
    asks once it has ended gets its answer; an unbounded caller waits for it."""
    shared = SharedReads(wait=0.05)
    gate = asyncio.Event()
    loads = 0

    async def slow() -> str:
        nonlocal loads
        loads += 1
        await gate.wait()
        return "answered"

    patient = asyncio.create_task(shared.read("k", slow, bounded=False))
    with pytest.raises(Unanswered, match="has not answered for"):
        await shared.read("k", slow)
    with pytest.raises(Unanswered):  # past the wait already: at once
        await asyncio.wait_for(shared.read("k", slow), timeout=0.01)
    gate.set()
    assert await patient == "answered" and loads == 1
    assert await shared.read("k", slow) == "answered" and loads == 2  # a new read


async def test_a_cancelled_reader_does_not_cancel_the_others() -> None:
    shared = SharedReads()
    gate = asyncio.Event()

    async def load() -> int:
        await gate.wait()
        return 9

    first = asyncio.create_task(shared.read("k", load))
    second = asyncio.create_task(shared.read("k", load))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 9
    with pytest.raises(asyncio.CancelledError):
        await first


def test_progress_wakes_the_watchers_of_every_task_but_not_a_wait_for_an_end() -> None:
    signals = TaskSignals()
    with signals.watch(7) as seven, signals.watch(8) as eight, signals.watch_all() as every:
        signals.progressed(iter([7]))  # the store passes a generator for a claim
        assert every.is_set()
        assert not seven.is_set() and not eight.is_set()
        every.clear()
        signals.publish([7])  # a change that may end task 7's attempt
        assert seven.is_set() and seven.named and every.is_set()
        assert not eight.is_set()
        seven.clear()
        assert not seven.named
        signals.remote(None)  # another process committed something
        assert seven.is_set() and eight.is_set()
        assert not seven.named and not eight.named  # a cheaper look first
        seven.clear()
        eight.clear()
        every.clear()
        # Another process's claim of task 7, or a step: progress, as this process's own.
        signals.remote([7], progress=True)
        assert every.is_set() and not seven.is_set() and not eight.is_set()
        # Another process ended task 7's attempt: as this process's own change.
        signals.remote([7])
        assert seven.is_set() and seven.named and not eight.is_set()
    signals.publish([7])  # nobody watches any more: nothing to wake, nothing kept
    assert not signals._watchers
