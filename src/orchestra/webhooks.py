"""Webhooks: subscriptions to task events, their deliveries, and where they may be sent.

A subscription names a URL, the event types it wants (:class:`~orchestra.event_types.EventType`
words) and optionally a template; a task's ``callback_url`` is a subscription of its own to
its ``task.finished``. Each matching event writes a delivery in the event's own transaction
(:mod:`orchestra.db.webhooks`, the outbox); :mod:`orchestra.webhook_sender` sends them,
signed by the Standard Webhooks spec.

Destinations are checked on the addresses their host resolves to, not on its name: loopback,
private, link-local and other non-public addresses are refused unless ``[webhooks]
allow_private`` is on (:func:`check_destination`). The service itself (its own port on an
address of this host) is refused even then: a delivery from the service to its own API comes
from loopback, which an open service takes for an admin (:func:`is_own`).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import random
import secrets
import socket
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from orchestra.config import WebhookSettings
from orchestra.domain import NewTask, iso, iso_now, now, storable_id
from orchestra.errors import FieldProblem, InvalidRequest, NotFoundError
from orchestra.event_types import EventType
from orchestra.wire.webhooks import message_id

if TYPE_CHECKING:
    from orchestra.db.webhooks import Outline, WebhookStore

#: The longest URL accepted.
MAX_URL = 2048
#: The name of the server-wide secret that signs callback_url deliveries.
CALLBACK_SECRET = "callback"
#: The event a task's callback_url is sent.
CALLBACK_EVENT = EventType.TASK_FINISHED


class DeliveryStatus(StrEnum):
    """Where a delivery is: waiting to be sent (or retried), delivered, or given up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Webhook(msgspec.Struct, frozen=True):
    """A subscription (``task_id`` None) or a task's callback. The secret is not kept here:
    it is shown once, when made."""

    id: int
    url: str
    event_types: list[str]
    template: str | None
    task_id: int | None
    enabled: bool
    created_at: str
    #: Until when the secret before the last rollover still signs deliveries, beside the
    #: current one (None: it was never rolled over).
    previous_secret_until: str | None = None


class DeliveryAttempt(msgspec.Struct, frozen=True):
    """One try at a delivery: the answer's status and its first 1 KB, or why none came."""

    attempt: int
    time: str
    status_code: int | None
    latency_ms: float | None
    response: str | None
    error: str | None


class Delivery(msgspec.Struct, frozen=True):
    """One event for one subscription, with every attempt at it."""

    id: int
    webhook_id: int
    task_id: int | None
    event_seq: int | None
    type: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: str | None
    created_at: str
    finished_at: str | None
    payload: Any
    history: list[DeliveryAttempt]


class Claimed(msgspec.Struct, frozen=True):
    """A delivery a sender holds the lease on, with what it needs to send it."""

    id: int
    webhook_id: int
    url: str
    secret: str
    payload: str
    #: The attempt this send is (the lease guard's number).
    attempt: int
    #: When its retry window started: when it was written, or last redelivered.
    retry_from: str
    #: When its event happened (it is written then): part of its ``webhook-id``.
    created_at: str = ""
    #: The secret before the last rollover, while it still signs (beside ``secret``).
    previous_secret: str | None = None

    @property
    def secrets(self) -> list[str]:
        """The secrets that sign this send: each gives one signature in the header."""
        return (
            [self.secret] if self.previous_secret is None else [self.secret, self.previous_secret]
        )

    @property
    def message_id(self) -> str:
        """The ``webhook-id`` (:func:`~orchestra.wire.webhooks.message_id`)."""
        return message_id(self.id, self.created_at)


class NewWebhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A subscription as a client asks for it (the body of ``POST /api/v1/webhooks``); sent
    without the fields left at their defaults (an older service refuses ``enabled``)."""

    url: Annotated[
        str, msgspec.Meta(min_length=1, max_length=MAX_URL, description="Where to POST events.")
    ]
    event_types: Annotated[
        list[EventType],
        msgspec.Meta(min_length=1, max_length=len(EventType), description="Event types to send."),
    ] = msgspec.field(default_factory=lambda: [CALLBACK_EVENT])
    template: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1, max_length=255, description="Only events of this template's tasks."
            ),
        ]
        | None
    ) = None
    enabled: Annotated[
        bool,
        msgspec.Meta(
            description="false: created paused, to enable (PATCH) once its receiver is ready; "
            "no deliveries are made for it meanwhile."
        ),
    ] = True


class WebhookNotFound(NotFoundError):
    """No webhook has this id."""

    code = "webhook_not_found"


class DestinationRefused(InvalidRequest):
    """This URL cannot be sent to: it is malformed, not http(s), its host does not resolve,
    or it resolves to an address that is not public.

    A field of the request, as any other (the code ``invalid_request``, naming ``url`` or
    ``callback_url``); answered with 422, not 400: the body and the URL are well formed, the
    place it names is what cannot be used. A malformed URL is :class:`MalformedDestination`.
    """


class MalformedDestination(DestinationRefused):
    """The URL is no absolute http(s) URL with a host: a bad field as any other, a 400."""


#: The longest a rolled-over secret may keep signing beside the new one.
MAX_OVERLAP = 7 * 86400.0


class WebhookChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to change of a subscription (the body of ``PATCH /api/v1/webhooks/{id}``): the
    fields given; ``template: null`` makes it receive every template's events again."""

    url: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL, description="Where to POST.")]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    event_types: (
        Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=len(EventType))]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    template: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None | msgspec.UnsetType
    ) = msgspec.UNSET
    enabled: Annotated[
        bool | msgspec.UnsetType,
        msgspec.Meta(
            description="false: no deliveries are made for it, and its pending ones "
            "wait until it is enabled again."
        ),
    ] = msgspec.UNSET

    def values(self) -> dict[str, Any]:
        """The columns to set."""
        values = {
            name: getattr(self, name)
            for name in ("url", "template", "enabled")
            if getattr(self, name) is not msgspec.UNSET
        }
        if self.event_types is not msgspec.UNSET:
            values["event_types"] = list(dict.fromkeys(t.value for t in self.event_types))
        if "enabled" in values:
            values["enabled"] = int(values["enabled"])
        return values


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 24 random bytes in base64 (Standard Webhooks)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _refuse(
    field: str, reason: str, kind: type[DestinationRefused] = DestinationRefused
) -> DestinationRefused:
    return kind(f"{field}: {reason}", [FieldProblem(field, reason)])


def _malformed(field: str, reason: str) -> DestinationRefused:
    return _refuse(field, reason, MalformedDestination)


#: IPv6 prefixes whose last 32 bits are an IPv4 address the packets reach: NAT64's well-known
#: prefix (RFC 6052), IPv4-translated (RFC 2765) and IPv4-compatible (RFC 4291, deprecated)
#: addresses. IPv4-mapped ones (``::ffff:a.b.c.d``) are ``ipv4_mapped``.
_CARRIES_IPV4 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
#: NAT64 prefixes for local use (RFC 8215): not globally reachable, and where the IPv4
#: address sits in them depends on the operator's prefix length.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for, which a connection to it reaches (by
    the host's stack, a NAT64 gateway or a relay): IPv4-mapped, IPv4-translated,
    IPv4-compatible, NAT64 (``64:ff9b::/96``), 6to4 (``2002::/16``) and Teredo
    (``2001::/32``: its server and its client); none for any other address."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if any(ip in network for network in _CARRIES_IPV4):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def is_public(address: str) -> bool:
    """Whether ``address`` is a public unicast address. An IPv6 address that carries an IPv4
    one (IPv4-mapped or -translated, IPv4-compatible, NAT64, 6to4, Teredo:
    :func:`embedded_ipv4`) is public only when the IPv4 address is too: ``64:ff9b::7f00:1``
    is 127.0.0.1 through a NAT64 gateway, ``2002:a9fe:a9fe::`` 169.254.169.254 through
    6to4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64 or ip.is_site_local:
            return False
        carried = embedded_ipv4(ip)
        if carried:
            return all(_is_public_ip(v4) for v4 in carried)
    return _is_public_ip(ip)


def _is_public_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def parse_destination(url: str, field: str = "url") -> tuple[str, str, int]:
    """A destination URL's scheme, host and port.

    Raises:
        MalformedDestination: not an absolute http(s) URL with a host (naming ``field``).
    """
    import httpx

    if len(url) > MAX_URL:
        raise _malformed(field, f"is longer than {MAX_URL} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _malformed(field, "is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise _malformed(field, "must be an http:// or https:// URL")
    if not parsed.host:
        raise _malformed(field, "has no host")
    if "%" in parsed.host:  # a space or <> in it, which the URL parser percent-encodes
        raise _malformed(
            field, f"has {parsed.host!r} as its host: a host name holds no spaces or % escapes"
        )
    if parsed.userinfo:
        raise _malformed(field, "must not carry a user name or password")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise _malformed(field, f"has port {parsed.port}; a port is 1 to 65535")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.host, port


async def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (an IP address resolves to itself)."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


#: Where the service listens: ``[server]``'s host and port.
Own = tuple[str, int]


def is_own(addresses: list[str], port: int, own: Own | None) -> bool:
    """Whether a destination on ``port`` whose host resolves to ``addresses`` is the service
    itself, which listens on ``own`` (host, port): the same port, on an address that reaches
    the service's (an unspecified ``[server] host`` listens on every address of this host).
    None or port 0: nothing is known to be the service."""
    if own is None or not own[1] or port != own[1]:
        return False
    return any(_reaches(address, own[0]) for address in addresses)


def _reaches(address: str, listen_host: str) -> bool:
    """Whether a connection to ``address`` reaches a server listening on ``listen_host``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:  # a connection to 0.0.0.0 or :: goes to this host
        return True
    try:
        listen = ipaddress.ip_address(listen_host.strip("[]").split("%", 1)[0])
    except ValueError:  # a name ("localhost", the host's own): any address of this host
        return ip.is_loopback or _is_local(address)
    if listen.is_unspecified:
        return ip.is_loopback or _is_local(address)
    # A loopback listener is judged by loopback alone: "localhost" resolves to 127.0.0.1 or
    # ::1, and either may be the one the service is reached on.
    return ip == listen or (ip.is_loopback and listen.is_loopback)


def _is_local(address: str) -> bool:
    """Whether ``address`` is one of this host's own (a socket can be bound to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


async def check_destination(
    url: str, allow_private: bool, field: str = "url", own: Own | None = None
) -> list[str]:
    """Check that ``url`` may be sent to; returns the addresses its host resolves to (every
    one public, unless ``allow_private``; none the service's own, ``own``).

    Raises:
        DestinationRefused: a malformed URL, a host that does not resolve, one that resolves
            to a loopback, private, link-local or other non-public address, or the service
            itself (naming ``field``).
    """
    _scheme, host, port = parse_destination(url, field)
    try:
        addresses = await resolve(host, port)
    except (OSError, UnicodeError):
        raise _refuse(field, f"its host {host!r} does not resolve") from None
    if not addresses:
        raise _refuse(field, f"its host {host!r} does not resolve")
    if is_own(addresses, port, own):
        raise _refuse(field, own_reason(host, port))
    if not allow_private:
        blocked = [a for a in addresses if not is_public(a)]
        if blocked:
            raise _refuse(
                field,
                f"resolves to {blocked[0]}, a loopback, private or link-local address; "
                "webhooks are sent to public addresses only ([webhooks] allow_private)",
            )
    return addresses


def own_reason(host: str, port: int) -> str:
    """Why a destination that is the service itself is refused."""
    return (
        f"{host} port {port} is this Orchestra service itself; webhooks are not sent to "
        "the service's own API"
    )


def backoff(attempt: int, settings: WebhookSettings, rand: random.Random | None = None) -> float:
    """Seconds before the retry after attempt ``attempt`` (1 = the first): the base doubled
    per attempt, capped, with "equal jitter" (half fixed, half random), so that many
    deliveries that failed together do not come back together."""
    ceiling = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** (attempt - 1))
    return float(ceiling / 2 + (rand or random).uniform(0, ceiling / 2))


class WebhookService:
    """What the API can do with webhooks."""

    def __init__(
        self,
        store: WebhookStore,
        settings: WebhookSettings,
        wake: Any = None,
        *,
        own: Own | None = None,
    ) -> None:
        """``own``: where the service listens (``[server]``'s host and port), refused as a
        destination (:func:`is_own`); None: not known here."""
        self.store = store
        self.settings = settings
        self.own = own
        #: Wakes the sender (a redelivery is due now).
        self.wake = wake or (lambda: None)
        self._callback_secret: str | None = settings.callback_secret or None

    async def create(self, new: NewWebhook) -> tuple[Webhook, str]:
        """Check the destination and store the subscription; returns it and its secret (shown
        this once).

        Raises:
            DestinationRefused: the URL is malformed or not allowed (names ``url``).
        """
        await check_destination(new.url, self.settings.allow_private, own=self.own)
        hook = Webhook(
            id=0,
            url=new.url,
            event_types=list(dict.fromkeys(t.value for t in new.event_types)),
            template=new.template,
            task_id=None,
            enabled=new.enabled,
            created_at=iso_now(),
        )
        secret = new_secret()
        return await self.store.create(hook, secret), secret

    async def subscriptions(
        self, after: int | None = None, limit: int | None = None
    ) -> list[Webhook]:
        """Subscriptions, oldest first (tasks' callbacks are not listed): every one, or the
        first ``limit`` after the id ``after``."""
        return await self.store.subscriptions(after, limit)

    async def outlines(self) -> dict[int, Outline]:
        """Each subscription's waiting deliveries and latest one, by id (for a list)."""
        return await self.store.outlines()

    async def get(self, webhook_id: int) -> Webhook:
        """One subscription (a task's callback is not one: its row is the task's).

        Raises:
            WebhookNotFound: no subscription has this id.
        """
        hook = await self.store.get(webhook_id) if storable_id(webhook_id) else None
        if hook is None or hook.task_id is not None:
            raise WebhookNotFound(f"no webhook with id {webhook_id}")
        return hook

    async def delete(self, webhook_id: int) -> None:
        """Delete a subscription and its deliveries.

        Raises:
            WebhookNotFound: none has this id.
        """
        await self.get(webhook_id)
        if not await self.store.delete(webhook_id):
            raise WebhookNotFound(f"no webhook with id {webhook_id}")

    async def update(self, webhook_id: int, changes: WebhookChanges) -> Webhook:
        """Change a subscription: its URL (checked as at creation), event types, template,
        whether it is enabled.

        Raises:
            WebhookNotFound: no subscription has this id.
            DestinationRefused: the new URL is malformed or not allowed (names ``url``).
        """
        hook = await self.get(webhook_id)  # a 404 comes before a URL's 422
        if isinstance(changes.url, str):
            await check_destination(changes.url, self.settings.allow_private, own=self.own)
        values = changes.values()
        if values:
            changed = await self.store.update(webhook_id, values, iso_now())
            if changed is None:  # deleted meanwhile
                raise WebhookNotFound(f"no webhook with id {webhook_id}")
            hook = changed
        if values.get("enabled"):
            self.wake()  # its waiting deliveries may be due
        return hook

    async def roll_secret(self, webhook_id: int, overlap: float) -> tuple[Webhook, str]:
        """Give a subscription a new secret (returned, shown this once); the one it replaces
        keeps signing deliveries beside it for ``overlap`` seconds, while receivers move to
        the new one (each delivery then carries two signatures: either verifies).

        Raises:
            WebhookNotFound: no subscription has this id.
        """
        secret = new_secret()
        until = iso(now() + timedelta(seconds=overlap))
        # None: no subscription (an id past a 64-bit integer is none, not sent to the database)
        hook = (
            await self.store.roll_secret(webhook_id, secret, until)
            if storable_id(webhook_id)
            else None
        )
        if hook is None:
            raise WebhookNotFound(f"no webhook with id {webhook_id}")
        return hook, secret

    async def deliveries(
        self, webhook_id: int, limit: int = 50, before: int | None = None
    ) -> list[Delivery]:
        """A subscription's deliveries, newest first, with their attempts."""
        await self.get(webhook_id)
        return await self.store.deliveries(webhook_id, limit, before)

    async def redeliver(self, webhook_id: int, delivery_id: int) -> Delivery:
        """Send a delivery again (same ``webhook-id``, same body), now; returns it as it
        stands then: pending, due now (on a paused subscription, at its resume), with its
        attempts so far.

        Raises:
            WebhookNotFound: no such subscription, or it has no such delivery.
        """
        await self.get(webhook_id)
        missing = WebhookNotFound(f"webhook {webhook_id} has no delivery {delivery_id}")
        # Below 2**63 - 1: the read below names delivery_id + 1, a 64-bit integer too.
        if not (0 < delivery_id < 2**63 - 1) or not await self.store.redeliver(
            webhook_id, delivery_id, iso_now()
        ):
            raise missing
        # Read before the sender is woken: the answer is the delivery queued again. (Newest
        # first, below delivery_id + 1: the delivery itself, unless deleted meanwhile.)
        found = await self.store.deliveries(webhook_id, 1, delivery_id + 1)
        self.wake()
        if not found or found[0].id != delivery_id:
            raise missing
        return found[0]

    async def callback_secret(self) -> str:
        """The secret that signs every task's callback_url deliveries: the configured one,
        else the one stored in the database (made by the first process that needed it)."""
        if self._callback_secret is None:
            self._callback_secret = await self.store.shared_secret(
                CALLBACK_SECRET, new_secret(), iso_now()
            )
        return self._callback_secret

    async def check_callback(self, url: str) -> None:
        """Check a submit's ``callback_url`` (before the task is queued).

        Raises:
            DestinationRefused: malformed or not allowed (names ``callback_url``).
        """
        await check_destination(
            url, self.settings.allow_private, field="callback_url", own=self.own
        )

    async def enqueue_with_callback(self, new: NewTask, url: str) -> dict[str, Any] | None:
        """Queue ``new`` with its callback subscription to ``url``, in one transaction; the
        new task's row, or None when its idempotency key was used already."""
        at = iso_now()
        callback = {
            "url": url,
            "event_types": f'["{CALLBACK_EVENT.value}"]',
            "template": None,
            "secret": await self.callback_secret(),
            "enabled": 1,
            "created_at": at,
        }
        return await self.store.enqueue_with_callback(new, at, callback)
