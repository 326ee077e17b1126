"""/api/v1/webhooks: subscriptions, their deliveries, redelivery, the callback secret.

Every route needs the admin scope: a subscription receives the events of every task.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.webhooks import Delivery, NewWebhook, Webhook, WebhookService

_ADMIN = {"scope": "admin"}
_NUMBER = "^[0-9]{1,18}$"


class WebhookOut(msgspec.Struct, frozen=True):
    """A subscription as clients see it (its secret is shown only when it is made)."""

    id: int
    url: str
    event_types: list[str]
    template: str | None
    enabled: bool
    created_at: str

    @classmethod
    def of(cls, hook: Webhook) -> WebhookOut:
        """From a domain webhook."""
        return cls(
            hook.id, hook.url, hook.event_types, hook.template, hook.enabled, hook.created_at
        )


class WebhookCreated(msgspec.Struct, frozen=True):
    """A new subscription, with its signing secret: shown this once, never again."""

    id: int
    url: str
    event_types: list[str]
    template: str | None
    enabled: bool
    created_at: str
    #: The Standard Webhooks secret ("whsec_…") to verify deliveries with.
    secret: str


class WebhookList(msgspec.Struct, frozen=True):
    """Every subscription, oldest first."""

    items: list[WebhookOut]


class AttemptOut(msgspec.Struct, frozen=True):
    """One try at a delivery."""

    attempt: int
    time: str
    status_code: int | None
    latency_ms: float | None
    #: The first 1 KB of the answer's body.
    response: str | None
    error: str | None


class DeliveryOut(msgspec.Struct, frozen=True):
    """One event sent (or to be sent) to a subscription, and every attempt at it."""

    id: int
    #: The ``webhook-id`` header it is sent with: the same on every attempt and redelivery.
    message_id: str
    type: str
    task_id: int | None
    event_seq: int | None
    status: str
    attempts: list[AttemptOut]
    next_attempt_at: str | None
    created_at: str
    finished_at: str | None
    payload: Any

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        """From a domain delivery."""
        return cls(
            id=d.id,
            message_id=f"msg_orchestra_{d.id}",
            type=d.type,
            task_id=d.task_id,
            event_seq=d.event_seq,
            status=d.status.value,
            attempts=[AttemptOut(**msgspec.structs.asdict(a)) for a in d.history],
            next_attempt_at=d.next_attempt_at,
            created_at=d.created_at,
            finished_at=d.finished_at,
            payload=d.payload,
        )


class DeliveryList(msgspec.Struct, frozen=True):
    """A page of deliveries, newest first; ``next_cursor`` continues it."""

    items: list[DeliveryOut]
    next_cursor: str | None


class CallbackSecretOut(msgspec.Struct, frozen=True):
    """The secret that signs every task's callback_url deliveries."""

    secret: str


class WebhookController(Controller):
    """Webhook subscriptions: task events POSTed, signed, to a URL."""

    path = "/api/v1/webhooks"
    tags = ["webhooks"]

    @post("/", opt=_ADMIN, status_code=201, summary="Subscribe", responses=errors(400, 422))
    async def create(
        self, data: JSONBody[NewWebhook], runtime: NamedDependency[Runtime]
    ) -> WebhookCreated:
        """Subscribe ``url`` to ``event_types`` (of ``template``'s tasks only, when given).
        The answer carries the signing secret, shown this once. 422 naming ``url`` when it
        is malformed or resolves to a loopback, private or link-local address."""
        hook, secret = await _service(runtime).create(data)
        return WebhookCreated(**msgspec.structs.asdict(WebhookOut.of(hook)), secret=secret)

    @get("/", opt=_ADMIN, summary="List subscriptions", responses=errors())
    async def list_webhooks(self, runtime: NamedDependency[Runtime]) -> WebhookList:
        """Every subscription, without secrets."""
        return WebhookList([WebhookOut.of(h) for h in await _service(runtime).subscriptions()])

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
            QueryParameter(pattern=_NUMBER, description="next_cursor of the previous page."),
        ] = None,
    ) -> DeliveryList:
        """Deliveries, newest first, each with every attempt: its status code, latency and
        the first 1 KB of the answer."""
        found = await _service(runtime).deliveries(
            webhook_id, limit, None if cursor is None else int(cursor)
        )
        more = len(found) == limit
        return DeliveryList(
            [DeliveryOut.of(d) for d in found], str(found[-1].id) if found and more else None
        )

    @post(
        "/{webhook_id:int}/deliveries/{delivery_id:int}/redeliver",
        opt=_ADMIN,
        status_code=202,
        summary="Redeliver",
        responses=errors(404),
    )
    async def redeliver(
        self,
        webhook_id: FromPath[int],
        delivery_id: FromPath[int],
        runtime: NamedDependency[Runtime],
    ) -> None:
        """Send a delivery again now, with the same ``webhook-id`` and body (a delivered one
        too); its retries start over."""
        await _service(runtime).redeliver(webhook_id, delivery_id)


def _service(runtime: Runtime) -> WebhookService:
    return runtime.webhooks
