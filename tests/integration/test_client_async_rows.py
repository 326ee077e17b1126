"""The async client's batch rows from an async iterable (an async generator over a database
cursor, an API's pages): encoded as they come, on the loop, then uploaded as any rows are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestra.client import AsyncClient, UnsendableValue
from tests.conftest import Service


async def test_the_async_client_takes_batch_rows_from_an_async_iterable(service: Service) -> None:
    async def rows() -> AsyncIterator[dict[str, Any]]:
        for text in ("one", "two"):
            await asyncio.sleep(0)  # as rows read from a socket or a cursor come
            yield {"text": text}
        yield {"x": 1}

    async def bad() -> AsyncIterator[dict[str, Any]]:
        yield {"text": "fine"}
        yield {"text": "bad \ud800"}

    async with AsyncClient(service.url) as client:
        uploaded = await client.create_batch("summarize", rows(), priority=3)
        assert (uploaded.read, uploaded.refused, uploaded.batch.priority) == (3, 1, 3)
        assert uploaded.problems[0].row == 3
        # Checked before anything is sent, as an iterable's rows are.
        with pytest.raises(UnsendableValue, match=r"row 2: text holds a lone surrogate"):
            await client.create_batch("summarize", bad())
        assert [b.id async for b in client.list_batches()] == [uploaded.batch.id]


async def test_an_async_iterable_of_the_wrong_rows_is_a_type_error(service: Service) -> None:
    async def strings() -> AsyncIterator[str]:
        yield "text"

    async with AsyncClient(service.url) as client:
        with pytest.raises(TypeError, match="row 1 is a str, not a dict of params"):
            await client.create_batch("summarize", strings())  # type: ignore[arg-type]
        assert [b async for b in client.list_batches()] == []
