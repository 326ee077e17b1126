"""The answers of ``/api/v1/webhooks``: subscriptions, their deliveries, the callback
secret. (A subscription's request body, :class:`~orchestra.webhooks.NewWebhook`, lives with
the service.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from orchestra.wire.schemas import rounded_ms

if TYPE_CHECKING:  # the service's types, for the constructors only
    from orchestra.webhooks import Delivery, DeliveryAttempt, Webhook


def message_id(delivery_id: int, created_at: str) -> str:
    """A delivery's ``webhook-id``: the same for every attempt and redelivery, so a receiver
    can tell a repeat from a new event, and no other delivery's, also of another database (a
    second service, a backup restored, whose delivery ids count from the same start): its id
    and when its event happened (``msg_orchestra_42_20261204194141123456``)."""
    return f"msg_orchestra_{delivery_id}_{''.join(c for c in created_at if c.isdigit())}"


class WebhookOut(msgspec.Struct, frozen=True):
    """A subscription as clients see it (its secret is shown only when it is made)."""

    id: int
    url: str
    event_types: list[str]
    template: str | None
    enabled: bool
    created_at: str
    #: Until when the secret it had before its last rollover still signs deliveries beside
    #: the current one (null: never rolled over).
    previous_secret_until: str | None = None

    @classmethod
    def of(cls, hook: Webhook) -> WebhookOut:
        """From a domain webhook."""
        return cls(
            hook.id,
            hook.url,
            hook.event_types,
            hook.template,
            hook.enabled,
            hook.created_at,
            hook.previous_secret_until,
        )


class WebhookCreated(msgspec.Struct, frozen=True):
    """A new subscription, or one whose secret was rolled over, with its signing secret:
    shown this once, never again."""

    id: int
    url: str
    event_types: list[str]
    template: str | None
    enabled: bool
    created_at: str
    #: The Standard Webhooks secret ("whsec_…") to verify deliveries with.
    secret: str
    previous_secret_until: str | None = None

    @classmethod
    def of(cls, hook: Webhook, secret: str) -> WebhookCreated:
        """From a domain webhook and its secret."""
        return cls(**msgspec.structs.asdict(WebhookOut.of(hook)), secret=secret)


class WebhookList(msgspec.Struct, frozen=True):
    """A page of subscriptions, oldest first; ``next_cursor`` (the last one's id) gives the
    next page (None: this is the last)."""

    items: list[WebhookOut]
    next_cursor: str | None


class DeliveryAttemptOut(msgspec.Struct, frozen=True):
    """One try at a delivery."""

    attempt: int
    time: str
    status_code: int | None
    latency_ms: float | None
    #: The first 1 KB of the answer's body.
    response: str | None
    error: str | None

    @classmethod
    def of(cls, attempt: DeliveryAttempt) -> DeliveryAttemptOut:
        """From a stored attempt, its latency to the microsecond."""
        fields = msgspec.structs.asdict(attempt)
        return cls(**{**fields, "latency_ms": rounded_ms(attempt.latency_ms)})


class DeliveryOut(msgspec.Struct, frozen=True):
    """One event sent (or to be sent) to a subscription, and every attempt at it."""

    id: int
    #: The ``webhook-id`` header it is sent with: the same on every attempt and redelivery.
    message_id: str
    type: str
    task_id: int | None
    event_seq: int | None
    status: str
    attempts: list[DeliveryAttemptOut]
    next_attempt_at: str | None
    created_at: str
    finished_at: str | None
    payload: Any

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        """From a domain delivery."""
        return cls(
            id=d.id,
            message_id=message_id(d.id, d.created_at),
            type=d.type,
            task_id=d.task_id,
            event_seq=d.event_seq,
            status=d.status.value,
            attempts=[DeliveryAttemptOut.of(a) for a in d.history],
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
