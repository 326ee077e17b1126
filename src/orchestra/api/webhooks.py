"""/api/v1/webhooks: subscriptions, their deliveries, redelivery, the callback secret.

Every route needs the admin scope: a subscription receives the events of every task.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import NUMBER, StrictBodyRequest
from orchestra.api.scope import location
from orchestra.domain import first_page
from orchestra.webhooks import MAX_OVERLAP, NewWebhook, WebhookChanges, WebhookService
from orchestra.wire.webhooks import CallbackSecretOut as CallbackSecretOut
from orchestra.wire.webhooks import DeliveryAttemptOut as DeliveryAttemptOut
from orchestra.wire.webhooks import DeliveryList as DeliveryList
from orchestra.wire.webhooks import DeliveryOut as DeliveryOut
from orchestra.wire.webhooks import WebhookCreated as WebhookCreated
from orchestra.wire.webhooks import WebhookList as WebhookList
from orchestra.wire.webhooks import WebhookOut as WebhookOut

_ADMIN = {"scope": "admin"}


class WebhookController(Controller):
    """Webhook subscriptions: task events POSTed, signed, to a URL."""

    path = "/api/v1/webhooks"
    tags = ["webhooks"]

    @post(
        "/",
        opt=_ADMIN,
        status_code=201,
        summary="Subscribe",
        request_class=StrictBodyRequest,
        responses=errors(400, 404, 413, 422, 507),
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[NewWebhook],
        runtime: NamedDependency[Runtime],
    ) -> Response[WebhookCreated]:
        """Subscribe ``url`` to ``event_types`` (of ``template``'s tasks only, when given).
        The answer carries the signing secret, shown this once. 422 (``invalid_request``)
        naming ``url`` when it is malformed or resolves to a loopback, private or link-local
        address; 404 when ``template`` names no template."""
        if data.template is not None:  # 404 for a template that does not exist
            await runtime.tasks.template(data.template)
        hook, secret = await _service(runtime).create(data)
        return Response(
            WebhookCreated.of(hook, secret),
            status_code=201,
            headers={"Location": location(request, f"{self.path}/{hook.id}")},
        )

    @get("/", opt=_ADMIN, summary="List subscriptions", responses=errors(400))
    async def list_webhooks(
        self,
        runtime: NamedDependency[Runtime],
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="Page size.")] = 100,
        cursor: Annotated[
            str | None,
            QueryParameter(pattern=NUMBER, description="next_cursor of the previous page."),
        ] = None,
    ) -> WebhookList:
        """Subscriptions, oldest first, without secrets, a page at a time."""
        after = None if cursor is None else int(cursor)
        page, last = first_page(await _service(runtime).subscriptions(after, limit + 1), limit)
        return WebhookList([WebhookOut.of(h) for h in page], str(last.id) if last else None)

    @get(
        "/callback-secret",
        opt=_ADMIN,
        summary="The callback_url signing secret",
        responses=errors(),
    )
    async def callback_secret(self, runtime: NamedDependency[Runtime]) -> CallbackSecretOut:
        """The secret that signs deliveries to tasks' ``callback_url``."""
        return CallbackSecretOut(await _service(runtime).callback_secret())

    @get("/{webhook_id:int}", opt=_ADMIN, summary="Get a subscription", responses=errors(404))
    async def get_webhook(
        self, webhook_id: FromPath[int], runtime: NamedDependency[Runtime]
    ) -> WebhookOut:
        """One subscription, without its secret."""
        return WebhookOut.of(await _service(runtime).get(webhook_id))

    @patch(
        "/{webhook_id:int}",
        opt=_ADMIN,
        summary="Change a subscription",
        request_class=StrictBodyRequest,
        responses=errors(400, 404, 413, 422, 507),
    )
    async def update_webhook(
        self,
        webhook_id: FromPath[int],
        data: JSONBody[WebhookChanges],
        runtime: NamedDependency[Runtime],
    ) -> WebhookOut:
        """Change the fields given: ``url`` (checked as at creation: 422), ``event_types``,
        ``template`` (404 when it names none; null: every template), ``enabled`` (false: no
        deliveries are made for it, and its pending ones wait until it is enabled again)."""
        if isinstance(data.template, str):
            await runtime.tasks.template(data.template)
        return WebhookOut.of(await _service(runtime).update(webhook_id, data))

    @post(
        "/{webhook_id:int}/roll-secret",
        opt=_ADMIN,
        status_code=200,
        summary="Roll its signing secret over",
        responses=errors(400, 404, 507),
    )
    async def roll_secret(
        self,
        webhook_id: FromPath[int],
        runtime: NamedDependency[Runtime],
        overlap: Annotated[
            float,
            QueryParameter(
                ge=0,
                le=MAX_OVERLAP,
                description="Seconds the old secret keeps signing beside the new one.",
            ),
        ] = 86400.0,
    ) -> WebhookCreated:
        """A new signing secret, shown this once. For ``overlap`` seconds (a day by default)
        every delivery is signed with both (two signatures in ``webhook-signature``), so the
        receiver can switch to the new secret whenever it likes in that time."""
        hook, secret = await _service(runtime).roll_secret(webhook_id, overlap)
        return WebhookCreated.of(hook, secret)

    @delete("/{webhook_id:int}", opt=_ADMIN, summary="Unsubscribe", responses=errors(404))
    async def delete_webhook(
        self, webhook_id: FromPath[int], runtime: NamedDependency[Runtime]
    ) -> None:
        """Delete the subscription and its deliveries (pending ones are not sent)."""
        await _service(runtime).delete(webhook_id)

    @get(
        "/{webhook_id:int}/deliveries",
        opt=_ADMIN,
        summary="List a subscription's deliveries",
        responses=errors(400, 404),
    )
    async def deliveries(
        self,
        webhook_id: FromPath[int],
        runtime: NamedDependency[Runtime],
        limit: Annotated[int, QueryParameter(ge=1, le=200, description="Page size.")] = 50,
        cursor: Annotated[
            str | None,
            QueryParameter(pattern=NUMBER, description="next_cursor of the previous page."),
        ] = None,
    ) -> DeliveryList:
        """Deliveries, newest first, each with every attempt: its status code, latency and
        the first 1 KB of the answer."""
        found = await _service(runtime).deliveries(
            webhook_id, limit + 1, None if cursor is None else int(cursor)
        )
        page, last = first_page(found, limit)
        return DeliveryList([DeliveryOut.of(d) for d in page], str(last.id) if last else None)

    @post(
        "/{webhook_id:int}/deliveries/{delivery_id:int}/redeliver",
        opt=_ADMIN,
        status_code=202,
        summary="Redeliver",
        responses=errors(404, 507),
    )
    async def redeliver(
        self,
        webhook_id: FromPath[int],
        delivery_id: FromPath[int],
        runtime: NamedDependency[Runtime],
    ) -> DeliveryOut:
        """Send a delivery again now, with the same ``webhook-id`` and body (a delivered one
        too); its retries start over. The answer is the delivery queued again: ``pending``,
        due now (on a paused subscription, at its resume), with its attempts so far."""
        return DeliveryOut.of(await _service(runtime).redeliver(webhook_id, delivery_id))


def _service(runtime: Runtime) -> WebhookService:
    return runtime.webhooks
