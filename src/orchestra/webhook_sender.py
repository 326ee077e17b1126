"""The webhook sender: a background loop that sends the outbox's due deliveries.

It never blocks the workers: they only write delivery rows (in their events' transactions);
this loop claims due rows with a lease (:meth:`~orchestra.db.webhooks.WebhookStore.claim`, so
several processes on one database share the work and never send one attempt twice), and sends
each in a task of its own, at most ``[webhooks] concurrency`` at once and ``max_per_host`` to
one host and port (a host at its limit is left out of the next claims, so its backlog does
not hold back the deliveries to other hosts).

Each attempt is one signed POST (Standard Webhooks: ``webhook-id``, ``webhook-timestamp``,
``webhook-signature``), bounded by ``[webhooks] timeout``, redirects not followed. A 2xx
answer delivers it; anything else is retried with exponential backoff and jitter until
``retry_hours`` after the delivery was written, then given up. Without ``allow_private`` the
host is resolved at every send, every address checked, and the request goes to the checked
address (the name stays in ``Host`` and TLS's SNI): a name cannot be pointed at a private
address between the check and the connection. A destination that resolves to the service
itself (its own port on an address of this host: :func:`~orchestra.webhooks.is_own`) is
refused at every send, ``allow_private`` or not.

Wake-ups: a commit of this process that wrote deliveries (the store's change signal, with
:class:`~orchestra.db.outbox.Hint`), a redelivery, a retry falling due, or the poll (other
processes' writes). On stop, sends in flight get a second to end; the rest are cancelled and
their deliveries handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook as Signer

from orchestra import __version__, logs, metrics
from orchestra.config import WebhookSettings
from orchestra.db.webhooks import Hint, WebhookStore
from orchestra.domain import iso, now
from orchestra.notify import TaskSignals
from orchestra.retry_after import retry_after
from orchestra.tls import client_context
from orchestra.webhooks import (
    Claimed,
    DeliveryAttempt,
    DeliveryStatus,
    DestinationRefused,
    Own,
    backoff,
    is_own,
    is_public,
    own_reason,
    parse_destination,
    resolve,
)

log = logs.get("orchestra.webhooks")

#: How much of an answer's body is kept with its attempt.
RESPONSE_BYTES = 1024
#: The answer that ends a delivery at once: the receiver says the address is gone for good.
GONE = 410
#: Seconds a delivery's lease lasts beyond the attempt's timeout.
LEASE_MARGIN = 5.0
#: How long a delivery handed back because its host was busy waits before it is due again.
BUSY_HOST_DELAY = 0.2
#: Seconds a stop gives the sends in flight to end before it cancels them.
STOP_GRACE = 1.0


class _Refused(Exception):
    """The destination may not be sent to (it resolves to a private address now)."""


class WebhookSender:
    """Sends the outbox's deliveries in the background of one process."""

    def __init__(
        self,
        store: WebhookStore,
        settings: WebhookSettings,
        signals: TaskSignals | None = None,
        *,
        clock: Callable[[], datetime] = now,
        own: Own | None = None,
    ) -> None:
        """``own``: where the service listens (``[server]``'s host and port), never sent to
        (:func:`~orchestra.webhooks.is_own`); None: not known here."""
        self.store = store
        self.settings = settings
        self.signals = signals
        self.clock = clock
        self.own = own
        self.owner = f"webhooks-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        #: A delivery's lease: the attempt's timeout and room for the database writes. A
        #: delivery in flight when its process died is due again once it runs out.
        self.lease_seconds = settings.timeout + LEASE_MARGIN
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._sending: dict[asyncio.Task[None], Claimed] = {}
        self._per_host: dict[str, int] = {}
        #: The host and port of each subscription claimed from (bounded by the subscriptions:
        #: a URL changed since is learned at its next claim).
        self._host_of: dict[int, str] = {}
        self._client: httpx.AsyncClient | None = None

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the loop (its first look is at once: deliveries a killed process left)."""
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(self.settings.timeout),
            # A proxy from the environment would connect by name, past the address check.
            trust_env=False,
            verify=client_context(),
            headers={"user-agent": f"orchestra-webhooks/{__version__}"},
        )
        self._loop_task = asyncio.create_task(self._run(), name="webhook-sender")

    def notify(self) -> None:
        """Look for due deliveries now."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop promptly: no more claims; sends in flight get :data:`STOP_GRACE` seconds to
        end (one answered meanwhile is recorded, not sent again at the next start), then the
        rest are cancelled and their deliveries handed back (due at once for the next start,
        or for another process)."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        cut = dict(self._sending)
        if cut:
            await asyncio.wait(cut, timeout=STOP_GRACE)
        for task in cut:
            task.cancel()
        await asyncio.gather(*cut, return_exceptions=True)
        due = iso(self.clock())
        for task, delivery in cut.items():
            if task.cancelled():
                with contextlib.suppress(Exception):
                    await self.store.release(self.owner, delivery, due)
        if self._client is not None:
            await self._client.aclose()

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        poll = self.settings.poll_interval
        with contextlib.ExitStack() as stack:
            changed = (
                stack.enter_context(self.signals.watch_all())
                if self.signals is not None
                else asyncio.Event()
            )
            seen = -1
            next_poll = loop.time()
            outage = logs.Outage(log, "webhooks.claim_failed")
            while not self._stopping:
                commit_woke = changed.is_set()
                changed.clear()
                due_to_poll = loop.time() >= next_poll
                if self._wake.is_set() or due_to_poll or (commit_woke and Hint.written != seen):
                    self._wake.clear()
                    seen = Hint.written
                    next_poll = loop.time() + poll
                    try:
                        full = await self._claim_and_send()
                        outage.succeeded()
                    except Exception as exc:  # a side loop logs and carries on
                        outage.failed(exc)
                        full = False
                    if full:
                        continue
                await self._sleep(changed, max(0.0, next_poll - loop.time()))

    async def _sleep(self, changed: asyncio.Event, seconds: float) -> None:
        """Until woken, a commit of this process, or ``seconds``."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(changed.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _claim_and_send(self) -> bool:
        """Claim what free slots allow and start sending; True when every slot was filled
        (more may be due)."""
        free = self.settings.concurrency - len(self._sending)
        if free <= 0:
            return False
        moment = self.clock()
        if not await self.store.any_due(iso(moment)):
            return False
        # Every subscription of a host at its limit is left out of the claim: claimed and
        # handed back, their oldest-due backlog came first at every claim, and another
        # host's fresh deliveries waited behind it for minutes. (Not only those with a send
        # in flight: another subscription of the busy host filled the claims so, 40 s.)
        cap = self.settings.max_per_host
        busy = {host for host, sending in self._per_host.items() if sending >= cap}
        full = {webhook for webhook, host in self._host_of.items() if host in busy}
        claimed = await self.store.claim(
            self.owner,
            free,
            iso(moment),
            iso(moment + timedelta(seconds=self.lease_seconds)),
            skip=full,
        )
        started = 0
        for delivery in claimed:
            host = self._host_of[delivery.webhook_id] = _host(delivery.url)
            if self._per_host.get(host, 0) >= self.settings.max_per_host:
                later = iso(self.clock() + timedelta(seconds=BUSY_HOST_DELAY))
                await self.store.release(self.owner, delivery, later)
                continue
            self._per_host[host] = self._per_host.get(host, 0) + 1
            task = asyncio.create_task(self._deliver(delivery, host), name=f"webhook-{delivery.id}")
            self._sending[task] = delivery
            task.add_done_callback(self._sent)
            started += 1
        return started > 0 and len(claimed) == free

    def _sent(self, task: asyncio.Task[None]) -> None:
        delivery = self._sending.pop(task, None)
        if delivery is not None:
            host = _host(delivery.url)
            left = self._per_host.get(host, 1) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)
        if not self._stopping:
            self._wake.set()  # a slot is free: deliveries left waiting may go now

    # -- one delivery -----------------------------------------------------------------------

    async def _deliver(self, delivery: Claimed, host: str) -> None:
        started_at = self.clock()
        status_code: int | None = None
        body: str | None = None
        error: str | None = None
        permanent = False
        clock_start = time.perf_counter()
        asked: float | None = None  # the wait a 429 or 503 asked for (Retry-After)
        try:
            async with asyncio.timeout(self.settings.timeout):
                status_code, body, asked = await self._post(delivery)
        except _Refused as exc:
            error, permanent = str(exc), True
        except TimeoutError:
            error = f"no answer within {self.settings.timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        latency = round((time.perf_counter() - clock_start) * 1000, 3)
        tried = DeliveryAttempt(
            attempt=delivery.attempt,
            time=iso(started_at),
            status_code=status_code,
            latency_ms=latency,
            response=body,
            error=error,
        )
        ok = status_code is not None and 200 <= status_code < 300
        next_at: str | None = None
        if ok:
            status, result = DeliveryStatus.DELIVERED, "delivered"
        else:
            wait, moment = backoff(delivery.attempt, self.settings), self.clock()
            since = datetime.fromisoformat(delivery.retry_from.replace("Z", "+00:00"))
            give_up = since + timedelta(hours=self.settings.retry_hours)
            if asked is not None and asked > wait:  # at the window's end at the latest
                wait = max(wait, min(asked, (give_up - moment).total_seconds()))
            due = moment + timedelta(seconds=wait)
            if permanent or status_code == GONE or due > give_up:
                status, result = DeliveryStatus.FAILED, "failed"
            else:
                status, result, next_at = DeliveryStatus.PENDING, "retrying", iso(due)
                asyncio.get_running_loop().call_later(wait, self._wake.set)
        try:
            # False: the lease was lost (a redelivery took the delivery over): the attempt is
            # kept, the delivery's state is the other send's to write.
            held = await self.store.record(self.owner, delivery, tried, status, next_at)
        except Exception as exc:  # the lease runs out; the delivery is sent again then
            log.warning("webhooks.record_failed", delivery=delivery.id, error=str(exc))
            return
        if held:
            metrics.webhook_delivery(result)
        # A delivery given up is a failure to see; an attempt to be retried is not yet.
        logs.by_outcome(log, result == "failed")(
            "webhook.attempt",
            delivery=delivery.id,
            webhook=delivery.webhook_id,
            host=host,
            attempt=delivery.attempt,
            status_code=status_code,
            latency_ms=latency,
            error=error,
            result=result,
            lease_held=held,
        )

    async def _post(self, delivery: Claimed) -> tuple[int, str, float | None]:
        """One signed POST; returns the answer's status, the first 1 KB of its body, and the
        seconds a 429 or 503 asks to wait (its ``Retry-After``; None: it names none)."""
        assert self._client is not None
        try:
            scheme, host, port = parse_destination(delivery.url)
        except DestinationRefused as exc:
            raise _Refused(exc.message) from None
        url = httpx.URL(delivery.url)
        targets = [url]
        headers = {"content-type": "application/json"}
        extensions = {}
        if not self.settings.allow_private or self.own is not None:
            try:
                addresses = await resolve(host, port)
            except OSError as exc:
                raise httpx.ConnectError(f"{host} does not resolve: {exc}") from None
            if is_own(addresses, port, self.own):
                raise _Refused(own_reason(host, port))
        if not self.settings.allow_private:
            blocked = [a for a in addresses if not is_public(a)]
            if blocked or not addresses:
                raise _Refused(f"{host} resolves to {blocked[0] if blocked else 'nothing'}")
            # Connect to the addresses checked, not to the name again: each in turn, as a
            # client connecting to the name would (IPv6 first on a host without its route).
            targets = [url.copy_with(host=address) for address in addresses]
            headers["host"] = httpx.URL(delivery.url).netloc.decode("ascii")
            if scheme == "https":
                extensions["sni_hostname"] = host
        moment = datetime.now(UTC)
        # One signature per secret, space-separated (Standard Webhooks): during a rollover
        # the new secret's and the old one's, so a receiver verifies with either.
        signature = " ".join(
            Signer(secret).sign(delivery.message_id, moment, delivery.payload)
            for secret in delivery.secrets
        )
        headers["webhook-id"] = delivery.message_id
        headers["webhook-timestamp"] = str(int(moment.timestamp()))
        headers["webhook-signature"] = signature
        response = await self._connected(targets, delivery.payload.encode(), headers, extensions)
        try:
            kept = bytearray()
            async for chunk in response.aiter_bytes():
                kept += chunk
                if len(kept) >= RESPONSE_BYTES:
                    break
        finally:
            await response.aclose()
        asked = None
        if response.status_code in (429, 503):
            asked = retry_after(response.headers.get("retry-after"))
        text = bytes(kept[:RESPONSE_BYTES]).decode("utf-8", "replace")
        return response.status_code, text, asked

    async def _connected(
        self,
        targets: list[httpx.URL],
        body: bytes,
        headers: dict[str, str],
        extensions: dict[str, Any],
    ) -> httpx.Response:
        """The answer's head from the first of ``targets`` that takes the connection (the
        last one's connection error when none does)."""
        assert self._client is not None
        # Each address gets its share of the attempt's time to connect: one that drops the
        # connection silently would take all of it, and the next would never be tried.
        share = self.settings.timeout / len(targets)
        timeout = httpx.Timeout(self.settings.timeout, connect=share)
        for index, target in enumerate(targets):
            request = self._client.build_request(
                "POST",
                target,
                content=body,
                headers=headers,
                extensions=extensions,
                timeout=timeout,
            )
            try:
                with logs.requests_unlogged():  # the URL may be the secret; logged: its host
                    return await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if index == len(targets) - 1:
                    raise
        raise AssertionError("no address to send to")  # parse_destination gives a host


def _host(url: str) -> str:
    """The host and port a delivery goes to, for the per-host limit (two ports of a host
    are two servers: one's backlog does not hold the other's deliveries)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return url
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.host.lower()}:{port}"
