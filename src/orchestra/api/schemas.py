"""The API's request and response bodies, as the controllers use them.

The response structs live in :mod:`orchestra.wire.schemas` (light, so the client can decode
into them without loading the server) and are re-exported here; the request bodies come from
their services, and :class:`StrictBodyRequest` reads them.
"""

from __future__ import annotations

import functools
import json
import math
from decimal import Decimal
from typing import Any

import msgspec
import msgspec.inspect
from litestar import Request
from litestar.exceptions import ValidationException

from orchestra.schedules import ScheduleChanges, ScheduleSpec
from orchestra.templating.source import format_path
from orchestra.webhooks import NewWebhook, WebhookChanges
from orchestra.wire.schemas import CrashOut as CrashOut
from orchestra.wire.schemas import ErrorBody as ErrorBody
from orchestra.wire.schemas import ErrorOut as ErrorOut
from orchestra.wire.schemas import FieldOut as FieldOut
from orchestra.wire.schemas import HealthOut as HealthOut
from orchestra.wire.schemas import MessageOut as MessageOut
from orchestra.wire.schemas import ModelOut as ModelOut
from orchestra.wire.schemas import ModelsOut as ModelsOut
from orchestra.wire.schemas import ProblemOut as ProblemOut
from orchestra.wire.schemas import ProcessOut as ProcessOut
from orchestra.wire.schemas import ProviderOut as ProviderOut
from orchestra.wire.schemas import StepOut as StepOut
from orchestra.wire.schemas import StepSummary as StepSummary
from orchestra.wire.schemas import TaskAttemptOut as TaskAttemptOut
from orchestra.wire.schemas import TaskList as TaskList
from orchestra.wire.schemas import TaskOut as TaskOut
from orchestra.wire.schemas import TaskSummaryOut as TaskSummaryOut
from orchestra.wire.schemas import TemplateList as TemplateList
from orchestra.wire.schemas import TemplateOut as TemplateOut
from orchestra.wire.schemas import ValidationOut as ValidationOut
from orchestra.wire.tasks import SubmitTask

#: The JSON request bodies; the OpenAPI document describes them with msgspec's own schema.
REQUEST_BODIES: tuple[type[msgspec.Struct], ...] = (
    SubmitTask,
    ScheduleSpec,
    ScheduleChanges,
    NewWebhook,
    WebhookChanges,
)

#: Cursors and event ids are decimal numbers (a task id, an event's sequence number).
NUMBER = "^[0-9]{1,18}$"


#: The UTF-8 byte order mark.
_BOM = b"\xef\xbb\xbf"


#: msgspec's words for a float given where it wants something else: an integer, maybe, given
#: as a number without a fraction (2.0), which is taken as that integer.
_WHOLE_FLOAT = "got `float`"


class StrictBodyRequest(Request[Any, Any, Any]):
    """A request whose JSON body is decoded straight into its handler's body struct (the
    parameter ``data``) by msgspec's strict rules: ``"1"`` is not an integer, ``"true"`` not
    a boolean, ``1`` not a time. (Litestar decodes a body untyped, then converts it with
    ``strict=False``, which took all three.) JSON has one kind of number, and JSON Schema
    (the OpenAPI document) counts ``2.0`` as an integer, so a top-level field that takes an
    integer still takes a number without a fraction.

    A body that does not fit raises Litestar's ValidationException, as its own conversion
    would, so the answer names the field (:func:`orchestra.api.errors.validation_error`); a
    number no float holds (``1e400``) is named by its own path (``params.i``), which msgspec
    does not give inside a ``dict``. A body that is not JSON at all is left to Litestar.

    A UTF-8 byte order mark before the JSON is left out, as RFC 8259 allows a reader to (some
    Windows tools write one); it was a 400 ("invalid character (byte 0)").
    """

    async def json(self) -> Any:
        kind = _body_type(self)
        if kind is None:
            return await super().json()
        body = (await self.body()).removeprefix(_BOM)
        try:
            return _decode(body or b"null", kind)
        except msgspec.ValidationError as exc:
            raise _invalid(str(exc), body) from None
        except msgspec.DecodeError:  # not JSON, or not UTF-8: Litestar's own answer
            return await super().json()


def _body_type(request: Request[Any, Any, Any]) -> Any:
    """The struct type of the handler's ``data`` parameter; None when it has none."""
    parameters = request.route_handler.parsed_fn_signature.parameters
    data = parameters.get("data")
    kind = None if data is None else data.annotation
    return kind if isinstance(kind, type) and issubclass(kind, msgspec.Struct) else None


_decoders: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {}


def _decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """``body`` as a ``kind``, strictly; a top-level integer given as a whole float (2.0)
    is taken as the integer.

    Raises:
        msgspec.ValidationError: it does not fit.
        msgspec.DecodeError: it is not JSON.
    """
    decoder = _decoders.get(kind) or _decoders.setdefault(kind, msgspec.json.Decoder(kind))
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        if _WHOLE_FLOAT not in str(exc):
            raise
    value = msgspec.json.decode(body)
    if isinstance(value, dict):
        value = _wholes(value, kind)
    return msgspec.convert(value, kind)


def _wholes(value: dict[str, Any], kind: type[msgspec.Struct]) -> dict[str, Any]:
    """The fields of ``value`` (a ``kind``) with each whole float as an integer, in the
    structs nested in it too (a schedule's ``options``); a free-form dict (``params``) is
    left as sent."""
    nested = {f.encode_name: _struct_in(f.type) for f in _fields(kind)}
    return {
        k: _wholes(v, sub) if (sub := nested.get(k)) and isinstance(v, dict) else _whole(v)
        for k, v in value.items()
    }


@functools.cache
def _fields(kind: type[msgspec.Struct]) -> tuple[msgspec.inspect.Field, ...]:
    info = msgspec.inspect.type_info(kind)
    return info.fields if isinstance(info, msgspec.inspect.StructType) else ()


def _struct_in(t: msgspec.inspect.Type) -> type[msgspec.Struct] | None:
    """The struct a field holds (through ``X | None`` and ``X | UNSET``); None if none."""
    if isinstance(t, msgspec.inspect.StructType):
        return t.cls
    if isinstance(t, msgspec.inspect.UnionType):
        return next((c for x in t.types if (c := _struct_in(x)) is not None), None)
    return None


def _whole(value: Any) -> Any:
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _invalid(error: str, body: bytes) -> ValidationException:
    """msgspec's ``error`` as Litestar reports a body's problem: its key is the path
    (``options.timeout``; ``data`` for the body itself), its message the reason."""
    reason, _, at = error.rpartition(" - at `")
    if not reason:
        reason, at = error, ""
    path = at.rstrip("`").removeprefix("$").removeprefix(".")
    if "[...]" in path:  # within a dict, whose key msgspec does not name
        found = _out_of_range(body)
        if found is not None:
            path, reason = found
        else:
            path = path.partition("[...]")[0]
    extra = [{"key": path or "data", "message": reason, "source": "body"}]
    return ValidationException(detail=error, extra=extra)


class _Integer(Decimal):
    """An integer as written in the body (any number of digits)."""


def _out_of_range(body: bytes) -> tuple[str, str] | None:
    """The path of the first number in ``body`` (in the order written, as msgspec met it)
    that no float holds (``1e400``, or an integer of more digits than msgspec reads), and
    why; None when there is none. Read again by the standard library, which keeps every
    number as written: this runs only for a body already refused."""
    try:
        value = json.loads(body, parse_float=Decimal, parse_int=_Integer)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, Decimal) and not math.isfinite(float(item)):
            return format_path(path), (
                f"is {_number(item)}, out of range: a number must fit a 64-bit float "
                "(up to about ±1.8e308)"
            )
        if isinstance(item, dict):
            stack.extend((v, (*path, k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(item))))
    return None


def _number(item: Decimal) -> str:
    digits = len(item.as_tuple().digits)
    if isinstance(item, _Integer):
        return f"an integer of {digits:,} digits"
    return f"a number of {digits:,} digits" if digits > 40 else str(item)
