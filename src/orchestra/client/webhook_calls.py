"""The webhook operations' calls (:class:`~orchestra.client.core.Call`, as every
operation's): subscriptions, their deliveries, sending one again, and the tasks' callback
secret."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict, cast

from orchestra.client.core import _JSON, Call, _as, _given, _nothing, page_size, words
from orchestra.client.json_body import encode as _encode
from orchestra.webhooks import NewWebhook
from orchestra.wire.webhooks import (
    CallbackSecretOut,
    DeliveryList,
    DeliveryOut,
    WebhookCreated,
    WebhookList,
    WebhookOut,
)


class WebhookFields(TypedDict, total=False):
    """What ``update_webhook`` may change of a subscription: ``template=None`` makes it
    receive every template's events; ``enabled=False`` holds its deliveries."""

    url: str
    event_types: str | Iterable[str]
    template: str | None
    enabled: bool


def new_webhook(
    url: str, event_types: str | Iterable[str] | None, template: str | None, enabled: bool
) -> NewWebhook:
    """A subscription's body (the event types are checked by the service: 400 naming them)."""
    if event_types is None:
        return NewWebhook(url=url, template=template, enabled=enabled)
    types = cast(Any, words(event_types))
    return NewWebhook(url=url, event_types=types, template=template, enabled=enabled)


def create_webhook(hook: NewWebhook) -> Call[WebhookCreated]:
    return Call(
        "POST",
        "/api/v1/webhooks",
        _as(WebhookCreated),
        content=_encode(hook),
        headers=_JSON,
        ok=frozenset({201}),
    )


def webhooks_page(limit: int, cursor: str | None) -> Call[WebhookList]:
    params = _given({"limit": page_size(limit), "cursor": cursor})
    return Call("GET", "/api/v1/webhooks", _as(WebhookList), params=params)


def get_webhook(webhook_id: int) -> Call[WebhookOut]:
    return Call("GET", f"/api/v1/webhooks/{webhook_id}", _as(WebhookOut))


def update_webhook(webhook_id: int, changes: WebhookFields) -> Call[WebhookOut]:
    """PATCH: only the fields given are sent (``template=None`` clears it; the event types
    are checked by the service: 400 naming them)."""
    return Call(
        "PATCH",
        f"/api/v1/webhooks/{webhook_id}",
        _as(WebhookOut),
        content=_encode(
            {
                k: words(v) if k == "event_types" and v is not None else v
                for k, v in cast(Any, changes).items()
            }
        ),
        headers=_JSON,
    )


def roll_webhook_secret(webhook_id: int, overlap: float) -> Call[WebhookCreated]:
    """POST …/roll-secret: a new secret; the old one signs beside it for ``overlap`` s."""
    path = f"/api/v1/webhooks/{webhook_id}/roll-secret"
    return Call("POST", path, _as(WebhookCreated), params={"overlap": overlap})


def delete_webhook(webhook_id: int) -> Call[None]:
    return Call("DELETE", f"/api/v1/webhooks/{webhook_id}", _nothing, ok=frozenset({200, 204}))


def deliveries_page(webhook_id: int, limit: int, cursor: str | None) -> Call[DeliveryList]:
    """One page of a subscription's deliveries (newest first)."""
    params = _given({"limit": page_size(limit, most=200), "cursor": cursor})
    return Call(
        "GET", f"/api/v1/webhooks/{webhook_id}/deliveries", _as(DeliveryList), params=params
    )


def redeliver(webhook_id: int, delivery_id: int) -> Call[DeliveryOut]:
    """POST …/redeliver: the delivery, queued to be sent again."""
    path = f"/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
    return Call("POST", path, _as(DeliveryOut), ok=frozenset({202}))


def callback_secret() -> Call[str]:
    decode = _as(CallbackSecretOut)
    return Call("GET", "/api/v1/webhooks/callback-secret", lambda r: decode(r).secret)
