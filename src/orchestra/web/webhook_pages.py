"""Webhook subscriptions (admin scope, as in the API: a subscription receives the events of
every task): the list, one subscription with its deliveries and their attempts, pausing and
resuming it, sending a delivery again."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from orchestra.api.scope import runtime_of
from orchestra.domain import first_page
from orchestra.web.forms import whole
from orchestra.web.notices import NOTICE_COOKIE, notice_cookie
from orchestra.web.render import links, page
from orchestra.webhooks import WebhookChanges

#: Deliveries shown on one page of a subscription's.
PAGE_SIZE = 25
#: Subscriptions shown on one page of the list.
LIST_SIZE = 50


class WebhookPages(Controller):
    """Subscriptions and their deliveries."""

    path = "/webhooks"
    opt = {"scope": "admin"}

    @get("/", name="ui.webhooks")
    async def webhooks(
        self, request: Request[Any, Any, Any], after: FromQuery[str] = ""
    ) -> Template:
        """The subscriptions, oldest first (``after``: past that id), a page at a time, with
        their waiting deliveries and their latest one."""
        service = runtime_of(request.scope).webhooks
        past = whole(after, "after") if after else None
        hooks, last = first_page(await service.subscriptions(past, LIST_SIZE + 1), LIST_SIZE)
        outlines = await service.outlines()
        return page(
            request,
            "webhooks.html",
            section="webhooks",
            rows=[{"hook": h, "outline": outlines.get(h.id)} for h in hooks],
            later=last.id if last else None,
            paged=past is not None,
        )

    @get("/{webhook_id:int}", name="ui.webhook")
    async def webhook(
        self,
        request: Request[Any, Any, Any],
        webhook_id: FromPath[int],
        before: FromQuery[str] = "",
    ) -> Template:
        """One subscription and its deliveries, newest first (``before``: older than that
        delivery id), each with its attempts and the body sent."""
        service = runtime_of(request.scope).webhooks
        hook = await service.get(webhook_id)
        older_than = whole(before, "before") if before else None
        deliveries = await service.deliveries(webhook_id, PAGE_SIZE + 1, older_than)
        shown, last = first_page(deliveries, PAGE_SIZE)
        flashed = request.cookies.get(NOTICE_COOKIE)
        return page(
            request,
            "webhook.html",
            section="webhooks",
            hook=hook,
            deliveries=shown,
            older=last.id if last else None,
            paged=older_than is not None,
            before=before if older_than is not None else "",
            notice=_sent_again(flashed, hook.enabled),
            cookies=[notice_cookie(request, "")] if flashed is not None else None,
        )

    @get(
        [
            "/{webhook_id:int}/pause",
            "/{webhook_id:int}/resume",
            "/{webhook_id:int}/deliveries/{delivery_id:int}/redeliver",
        ]
    )
    async def form_page(
        self, request: Request[Any, Any, Any], webhook_id: FromPath[int]
    ) -> Redirect:
        """No page of their own (the forms POST): the subscription's page."""
        return _back(request, webhook_id)

    @post("/{webhook_id:int}/pause", status_code=303)
    async def pause(self, request: Request[Any, Any, Any], webhook_id: FromPath[int]) -> Redirect:
        """Pause a subscription: its pending deliveries wait until it is resumed, and the events
        meanwhile are not queued for it."""
        await runtime_of(request.scope).webhooks.update(webhook_id, WebhookChanges(enabled=False))
        return _back(request, webhook_id)

    @post("/{webhook_id:int}/resume", status_code=303)
    async def resume(self, request: Request[Any, Any, Any], webhook_id: FromPath[int]) -> Redirect:
        """Resume a subscription: its waiting deliveries are sent, oldest first."""
        await runtime_of(request.scope).webhooks.update(webhook_id, WebhookChanges(enabled=True))
        return _back(request, webhook_id)

    @post("/{webhook_id:int}/deliveries/{delivery_id:int}/redeliver", status_code=303)
    async def redeliver(
        self, request: Request[Any, Any, Any], webhook_id: FromPath[int], delivery_id: FromPath[int]
    ) -> Redirect:
        """Send a delivery again now (same ``webhook-id``, same body; its retries start over).
        Back to the page of deliveries it was on, which says so once."""
        await runtime_of(request.scope).webhooks.redeliver(webhook_id, delivery_id)
        form = await request.form()
        before = str(form.get("before", ""))
        return Redirect(
            links(request).ui(
                f"/webhooks/{webhook_id}", before=before if before.isdigit() else None
            ),
            status_code=303,
            cookies=[notice_cookie(request, f"{SENT}.{delivery_id}")],
        )


#: The notice of a delivery sent again: ``sent.ID``.
SENT = "sent"


def _sent_again(value: str | None, enabled: bool) -> str:
    """What "Send again" did, from the notice cookie its redirect set (else nothing)."""
    done, _, number = (value or "").partition(".")
    if done != SENT or not number.isdigit():
        return ""
    if not enabled:
        return (
            f"Delivery #{number} will be sent again when this subscription is resumed "
            "(it is paused)."
        )
    return f"Delivery #{number} is queued to be sent again now."


def _back(request: Request[Any, Any, Any], webhook_id: int) -> Redirect:
    return Redirect(links(request).ui(f"/webhooks/{webhook_id}"), status_code=303)
