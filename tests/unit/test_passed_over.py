"""The note of a step's fallbacks: shared by the concurrent calls of a map step, each entry
once for the same reason, and bounded."""

from __future__ import annotations

import asyncio

from orchestra.domain import Fallback
from orchestra.llm import passed_over


async def test_a_map_steps_concurrent_calls_add_to_one_note_each_entry_once() -> None:
    down = Fallback(route="ollama/llama3.2", reason="connection refused")

    async def item(n: int) -> None:
        await asyncio.sleep(0)
        passed_over.note([down, Fallback(route=f"gpu/m{n}", reason="does not list the model")])

    with passed_over.noting() as noted:
        await asyncio.gather(*(item(n) for n in range(30)))
    assert noted[0] == down and noted.count(down) == 1
    assert len(noted) == passed_over.MOST
    passed_over.note([down])  # outside a step: nowhere to note, and no error
    assert len(noted) == passed_over.MOST
