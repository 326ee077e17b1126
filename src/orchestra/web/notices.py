"""What an action did, said once on the page its redirect lands on: carried by a short-lived
cookie (not the address: a reload would say it again, and anyone could write a link claiming
anything)."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import Cookie

from orchestra.bulk import BulkOutcome
from orchestra.errors import InvalidRequest
from orchestra.web.forms import whole
from orchestra.web.render import links

#: The cookie that carries what an action did to the page it redirects to, once.
NOTICE_COOKIE = "orchestra_notice"
#: The bulk actions a notice tells of.
ACTIONS = ("cancel", "retry")

#: Why a bulk action left a task alone (what the action needs a task to be).
SKIPPED_BECAUSE = {"cancel": "not queued or running", "retry": "not failed or cancelled"}


def notice_value(action: str, outcome: BulkOutcome) -> str:
    """What a bulk action did, as its notice cookie holds it: the action, the tasks it
    changed at once, those it left alone, and the running ones it asked to stop."""
    done_now = outcome.changed - outcome.stopping
    return f"{action}.{done_now}.{outcome.skipped}.{outcome.stopping}"


def notice_text(value: str | None) -> str:
    """What the last bulk action did, from the cookie its redirect set (``cancel.1.2.3``: see
    :func:`notice_value`); a value that is not an action and counts shows nothing."""
    done, *counts = (value or "").split(".")
    if done not in ACTIONS or not 1 <= len(counts) <= 3:
        return ""
    try:
        count, left, stopping = (
            whole(n, "n", least=0) for n in (*counts, *["0"] * (3 - len(counts)))
        )
    except InvalidRequest:
        return ""
    verb = "Cancelled" if done == "cancel" else "Queued again"
    said = f"{verb}: {count} task{'s' if count != 1 else ''}"
    if stopping:
        said += f"; {stopping} running asked to stop (one may still finish first)"
    if left:
        said += f"; {left} skipped ({SKIPPED_BECAUSE[done]})"
    return said + "."


def notice_cookie(request: Request[Any, Any, Any], value: str) -> Cookie:
    """The notice cookie holding ``value`` (an empty value with no age deletes it)."""
    return Cookie(
        key=NOTICE_COOKIE,
        value=value,
        path=links(request).base or "/",
        max_age=60 if value else 0,
        httponly=True,
        samesite="strict",
    )
