"""``orchestra.client``: call an Orchestra service from Python, blocking (:class:`Client`) or
with asyncio (:class:`AsyncClient`). Answers are the server's own msgspec structs; errors are
:class:`~orchestra.client.errors.ApiError` subclasses carrying the API's status, code, fields
and message. See docs/client.md.

Both clients send the calls :mod:`orchestra.client.core` builds and read the answers it
decodes, so the two differ only in how they wait; the CLI uses :class:`Client`.
"""

from __future__ import annotations

from orchestra.client.aio import AsyncClient
from orchestra.client.batch_calls import BatchOptions
from orchestra.client.core import DEFAULT_URL, Registered, RetryPolicy, SubmitOptions
from orchestra.client.errors import (
    ApiError,
    AuthenticationFailed,
    BadRequest,
    ClientClosed,
    ClientError,
    Conflict,
    ConnectionFailed,
    InvalidApiKey,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    TooLarge,
    Unavailable,
    Unprocessable,
    UnsendableValue,
)
from orchestra.client.follow import ReconnectPolicy
from orchestra.client.schedule_calls import ScheduleFields
from orchestra.client.sync import Client
from orchestra.client.webhook_calls import WebhookFields
from orchestra.schedules import ScheduleSpec
from orchestra.wire.tasks import SubmitTask

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "AsyncClient",
    "AuthenticationFailed",
    "BadRequest",
    "BatchOptions",
    "Client",
    "ClientError",
    "Conflict",
    "ClientClosed",
    "ConnectionFailed",
    "InvalidApiKey",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ReconnectPolicy",
    "Registered",
    "RetryPolicy",
    "ScheduleFields",
    "ScheduleSpec",
    "ServerError",
    "SubmitOptions",
    "SubmitTask",
    "TooLarge",
    "Unavailable",
    "Unprocessable",
    "UnsendableValue",
    "WebhookFields",
]
