"""What a call that got no answer is said to be (``client.core.connection_failed``)."""

from __future__ import annotations

import httpx

from orchestra.client import core


def test_a_keyed_resend_that_finds_the_pool_full_after_a_broken_try_may_have_been_carried_out() -> (
    None
):
    """It was "every connection of this client is in use", ``broke`` False: as if nothing had
    gone out, though the first try had (review)."""
    call: core.Call[None] = core.Call("POST", "/api/v1/tasks", lambda r: None, idempotent=True)
    full = httpx.PoolTimeout("no connection")
    after = core.connection_failed("http://x", call, full, broke_before=True)
    assert after.broke and not after.pool_full and "carried out" in str(after)
    first = core.connection_failed("http://x", call, full)
    assert first.pool_full and not first.broke
    read: core.Call[None] = core.Call("GET", "/api/v1/tasks/1", lambda r: None)
    assert core.connection_failed("http://x", read, full, broke_before=True).pool_full
