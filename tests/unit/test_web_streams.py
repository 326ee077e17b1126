"""A live dashboard stream ends once its session has (orchestra.web.render.bounded)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar.response import ServerSentEventMessage

from orchestra.web.render import bounded


async def test_a_message_that_has_the_page_fetch_is_sent_only_while_the_session_holds() -> None:
    """The session was asked at most every 2 s, so a ``changed`` sent right after a key was
    revoked had the page fetch its rows, refused (a 401 in the browser's console). Such a
    message is now preceded by the check every time; a keep-alive still is not."""
    asked = 0

    async def ended() -> bool:
        nonlocal asked
        asked += 1
        return False

    async def messages(*events: str | None) -> AsyncIterator[ServerSentEventMessage]:
        for event in events:
            if event is None:
                yield ServerSentEventMessage(comment="keep-alive", data=None)
            else:
                yield ServerSentEventMessage(event=event, data="1")

    sent = [m async for m in bounded(messages(None, None), still=ended)]
    assert [m.comment for m in sent] == ["keep-alive", "keep-alive"] and asked == 0
    for fetching in ("changed", "refresh"):
        sent = [m async for m in bounded(messages(None, fetching, None), still=ended)]
        assert [m.comment for m in sent] == ["keep-alive"], fetching
    assert asked == 2
    sent = [m async for m in bounded(messages("tokens"), still=ended)]
    assert [m.event for m in sent] == ["tokens"]  # text to append: no fetch, no check
