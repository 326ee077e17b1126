"""Hostile batch uploads: bodies that cost the reader much and give it no row (millions of
blank lines, a quoted CSV cell of newlines) leave the service's loop free for other requests,
and a row nested too deeply to decode is a bad row like any other, the rest going on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import hostile_service

# -- bodies that are all skipping -----------------------------------------------------------
# The service runs in its own process (hostile_service), so a held loop is its, not the test's.

#: Lines read past without a row: the reader held the loop 2.5-3.6 s at a time over these.
BLANKS = 8_000_000


@pytest.mark.parametrize(
    ("fmt", "body", "read", "refused"),
    [
        ("jsonl", b"\n" * BLANKS + b'{"text":"x"}\n', 1, 0),
        # A quoted cell of newlines: one record over the row limit, read past, then a row.
        ("csv", b'text\n"' + b"\n" * BLANKS + b'"\nafter\n', 2, 1),
    ],
    ids=["jsonl-blank-lines", "csv-quoted-newlines"],
)
async def test_an_upload_of_lines_without_rows_leaves_the_service_answering(
    tmp_path: Path,
    fake_ollama: FakeOllama,
    db_url: str,
    fmt: str,
    body: bytes,
    read: int,
    refused: int,
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url, db_url=db_url) as svc:
        async with svc.watch() as watch:
            answer = await svc.client.post(
                "/api/v1/batches", params={"template": "sentiment", "format": fmt}, content=body
            )
        assert answer.status_code == 201, answer.text
        got = answer.json()
        assert (got["read"], got["refused"]) == (read, refused)
        watch.assert_held()
