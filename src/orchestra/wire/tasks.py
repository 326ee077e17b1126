"""The body of ``POST /api/v1/tasks``: a task as a client asks for it. The service
(:mod:`orchestra.tasks`) applies the template's defaults; the client sends it."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any

import msgspec

_canonical = msgspec.json.Encoder(order="sorted").encode

#: The longest idempotency key, in the body or the Idempotency-Key header.
MAX_IDEMPOTENCY_KEY = 255


Priority = Annotated[
    int, msgspec.Meta(ge=-1000, le=1000, description="Higher runs first; -1000 to 1000.")
]


class SubmitTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A task as a client asks for it (the body of ``POST /api/v1/tasks``), before the
    template's defaults apply."""

    template: Annotated[str, msgspec.Meta(min_length=1, description="The template's name.")]
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    template_version: (
        Annotated[int, msgspec.Meta(ge=1, description="Run this version, not the current one.")]
        | None
    ) = None
    priority: Priority = 0
    model: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=255,
                description="Use this model instead of the template's (leave it out for that).",
            ),
        ]
        | None
    ) = None
    run_at: Annotated[
        # RFC 3339 is what clients should send; a time without a zone is taken as UTC.
        Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})] | None,
        msgspec.Meta(
            description="Do not start before this time (an RFC 3339 date and time; no zone "
            "means UTC)."
        ),
    ] = None
    delay: (
        Annotated[
            float, msgspec.Meta(ge=0, le=31_536_000, description="Seconds to wait before starting.")
        ]
        | None
    ) = None
    max_attempts: (
        Annotated[
            int,
            msgspec.Meta(ge=1, le=100, description="Attempts allowed (overrides the template)."),
        ]
        | None
    ) = None
    timeout: (
        Annotated[float, msgspec.Meta(gt=0, le=86_400, description="Seconds one attempt may take.")]
        | None
    ) = None
    idempotency_key: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=MAX_IDEMPOTENCY_KEY,
                description="Submitting again with the same key returns the same task "
                "(the Idempotency-Key header does the same).",
            ),
        ]
        | None
    ) = None
    callback_url: (
        Annotated[
            str,
            msgspec.Meta(
                min_length=1,
                max_length=2048,
                description="POST the task's task.finished event here, signed as webhooks are "
                "with the server's callback secret.",
            ),
        ]
        | None
    ) = None

    cache: (
        Annotated[
            bool,
            msgspec.Meta(
                description="true: answer model calls from the cache of model answers even "
                "when not deterministic; false: never (docs/cache.md). Unset: as each step says.",
            ),
        ]
        | None
    ) = None

    def fingerprint(self) -> str:
        """A hash of everything but the key: "the same body" for idempotency."""
        body = msgspec.to_builtins(msgspec.structs.replace(self, idempotency_key=None))
        if body["cache"] is None:  # as before the field existed: a key used then still fits
            del body["cache"]
        return hashlib.sha256(_canonical(body)).hexdigest()

    def matches(self, request_hash: str | None) -> bool:
        """Whether ``request_hash`` (kept with an idempotency key) is this body's: its
        :meth:`fingerprint`, or, without a ``callback_url``, the one versions before that
        field computed (which hashed no ``callback_url`` at all), so a key used then still
        fits after an upgrade."""
        if request_hash == self.fingerprint():
            return True
        if self.callback_url is not None or self.cache is not None:
            return False
        body = msgspec.to_builtins(msgspec.structs.replace(self, idempotency_key=None))
        del body["cache"], body["callback_url"]
        return request_hash == hashlib.sha256(_canonical(body)).hexdigest()
