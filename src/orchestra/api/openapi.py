"""The OpenAPI document at /schema/openapi.json, a product surface: it says what the service
does, and Schemathesis checks it against the running service in the test suite.

Litestar generates it from the handlers. Each handler declares its error answers with
``errors(...)``. ``refine`` then adds what the generator cannot express:

* **Request bodies made of msgspec structs** are described by msgspec's own JSON Schema of the
  struct, the same one that decodes them. Litestar's version leaves out that unknown fields
  are refused and drops lower bounds of 0 on optional numbers.
* **The YAML bodies** of template registration and validation, which handlers read raw.
* **Operation ids** a code generator can name methods after (``submitTask``, ``getTask``:
  :data:`OPERATION_IDS`), not Litestar's path strings.
* **The answers' times and words**: ``format: date-time`` on each time, the ``enum`` of a
  field that holds one of a few words (:data:`_ANSWER_WORDS`), ``EventType`` in a
  subscription's ``event_types``. The structs say ``str`` there (the client decodes them).
* **Bearer authentication**, and which operations are open without a key.
* **The ``Location`` header** of the answers that make something (201).
* **What a 404 means** on each path (one description cannot say it for every resource),
  and the ``ErrorBody`` of the 400 Litestar adds itself to operations that take parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import msgspec
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    Components,
    Link,
    OpenAPI,
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)

from orchestra.api.auth import PUBLIC_PATHS
from orchestra.api.schemas import REQUEST_BODIES, ErrorBody
from orchestra.config import ProviderKind
from orchestra.db.schedules import Outcome
from orchestra.domain import AttemptStatus, StepStatus
from orchestra.templating.loader import NAME
from orchestra.templating.model import Origin
from orchestra.webhooks import DeliveryStatus

_MEANING = {
    400: "The request is malformed: a path, query or header value, or the JSON body. "
    "`fields` names each bad one.",
    401: "No valid API key (send `Authorization: Bearer <key>`).",
    403: "The API key's scope does not allow this.",
    404: "No such task or template.",
    409: "The request conflicts with the current state (`task_status` says the task's).",
    413: "The body or the template is over its limit in [limits].",
    422: "The content is invalid: `fields` names each bad parameter, `errors` each problem "
    "in a template with its line and column.",
    429: "Too many requests for this key in the last minute.",
    503: "The database cannot be used now: another connection holds its lock (with "
    "`Retry-After`), it is read-only, or an I/O error.",
    507: "The database's disk is full; nothing was written. Free space and retry.",
}
#: Answers any operation behind the API key can give.
_GUARDED = (401, 403, 429, 503)

_TEMPLATE = Schema(
    type=OpenAPIType.OBJECT,
    description="A template: its full language is in docs/templates.md.",
    required=["name", "steps"],
    properties={
        "name": Schema(type=OpenAPIType.STRING, pattern=NAME.pattern),
        "description": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
        "parameters": Schema(type=[OpenAPIType.OBJECT, OpenAPIType.NULL]),
        "steps": Schema(
            type=OpenAPIType.ARRAY,
            min_items=1,
            items=Schema(type=OpenAPIType.OBJECT, required=["id"]),
        ),
    },
)
_EXAMPLE_TEMPLATE = {
    "name": "shout",
    "parameters": {"text": {"type": "string", "max_length": 1000}},
    "steps": [{"id": "loud", "kind": "render", "text": "{{ params.text | upper }}"}],
}
#: Operations whose raw body is YAML, with what the YAML must hold.
_YAML_BODIES = {
    "/api/v1/templates": _TEMPLATE,
    # Any YAML at all: the answer says whether it is a template and lists every problem.
    "/api/v1/templates/validate": Schema(description="A template, valid or not."),
}
_EXAMPLES = {
    "SubmitTask": {"template": "summarize", "params": {"text": "Orchestra runs AI tasks."}},
}
_TASK = {"task_id": "$response.body#/id"}
_NAMED = {"name": "$response.body#/name"}
#: OpenAPI links: what an answer's body names, which other operations take.
_LINKS: dict[tuple[str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("/api/v1/tasks", "post"): {
        "GetTask": ("/api/v1/tasks/{task_id}", "get", _TASK),
        "FollowTask": ("/api/v1/tasks/{task_id}/events", "get", _TASK),
        "CancelTask": ("/api/v1/tasks/{task_id}/cancel", "post", _TASK),
        "RetryTask": ("/api/v1/tasks/{task_id}/retry", "post", _TASK),
    },
    ("/api/v1/templates", "post"): {
        "GetTemplate": ("/api/v1/templates/{name}", "get", _NAMED),
        "TemplateVersions": ("/api/v1/templates/{name}/versions", "get", _NAMED),
        "DeleteTemplate": ("/api/v1/templates/{name}", "delete", _NAMED),
    },
}

_WEBHOOK = "/api/v1/webhooks/{webhook_id}"
#: Each operation's ``operationId``, what code generators name their methods after: a verb
#: and what it acts on, in camelCase (Litestar's own is the path's words run together:
#: ``ApiV1TasksTaskIdCancelCancel``).
OPERATION_IDS = {
    ("get", "/health"): "getHealth",
    ("head", "/health"): "headHealth",
    ("get", "/api/v1/health"): "getApiHealth",
    ("head", "/api/v1/health"): "headApiHealth",
    ("get", "/api/v1/models"): "listModels",
    ("get", "/api/v1/tasks"): "listTasks",
    ("post", "/api/v1/tasks"): "submitTask",
    ("get", "/api/v1/tasks/{task_id}"): "getTask",
    ("post", "/api/v1/tasks/{task_id}/cancel"): "cancelTask",
    ("post", "/api/v1/tasks/{task_id}/retry"): "retryTask",
    ("get", "/api/v1/tasks/{task_id}/events"): "streamTaskEvents",
    ("get", "/api/v1/events"): "streamEvents",
    ("get", "/api/v1/templates"): "listTemplates",
    ("post", "/api/v1/templates"): "registerTemplate",
    ("post", "/api/v1/templates/reload"): "reloadTemplates",
    ("post", "/api/v1/templates/validate"): "validateTemplate",
    ("get", "/api/v1/templates/{name}"): "getTemplate",
    ("delete", "/api/v1/templates/{name}"): "deleteTemplate",
    ("get", "/api/v1/templates/{name}/versions"): "listTemplateVersions",
    ("get", "/api/v1/webhooks"): "listWebhooks",
    ("post", "/api/v1/webhooks"): "createWebhook",
    ("get", "/api/v1/webhooks/callback-secret"): "getCallbackSecret",
    ("get", _WEBHOOK): "getWebhook",
    ("patch", _WEBHOOK): "updateWebhook",
    ("delete", _WEBHOOK): "deleteWebhook",
    ("post", f"{_WEBHOOK}/roll-secret"): "rollWebhookSecret",
    ("get", f"{_WEBHOOK}/deliveries"): "listWebhookDeliveries",
    ("post", f"{_WEBHOOK}/deliveries/{{delivery_id}}/redeliver"): "redeliverWebhookDelivery",
    ("get", "/api/v1/schedules"): "listSchedules",
    ("post", "/api/v1/schedules"): "createSchedule",
    ("get", "/api/v1/schedules/{ref}"): "getSchedule",
    ("patch", "/api/v1/schedules/{ref}"): "updateSchedule",
    ("delete", "/api/v1/schedules/{ref}"): "deleteSchedule",
    ("post", "/api/v1/schedules/{ref}/run"): "runSchedule",
    ("get", "/api/v1/batches"): "listBatches",
    ("post", "/api/v1/batches"): "createBatch",
    ("get", "/api/v1/batches/{batch_id}"): "getBatch",
    ("get", "/api/v1/batches/{batch_id}/results"): "getBatchResults",
    ("post", "/api/v1/batches/{batch_id}/cancel"): "cancelBatch",
    ("post", "/api/v1/batches/{batch_id}/retry"): "retryBatch",
}

#: The answers' fields that hold one of a few words (the structs say ``str``, which the Python
#: client decodes leniently), by component and field: the words, as the service writes them.
_ANSWER_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("StepOut", "status"): tuple(StepStatus),
    ("TaskAttemptOut", "status"): tuple(AttemptStatus),
    ("DeliveryOut", "status"): tuple(DeliveryStatus),
    ("BatchOut", "status"): ("loading", "loaded"),
    ("BatchSummaryOut", "status"): ("loading", "loaded"),
    ("TemplateOut", "origin"): get_args(Origin),
    ("FireOut", "outcome"): get_args(Outcome),
    ("ProviderOut", "kind"): get_args(ProviderKind),
    ("HealthOut", "status"): ("ok", "degraded", "down"),
}
#: The answers' lists of event types (their items the ``EventType`` enum, as the bodies').
_EVENT_TYPES = (("WebhookOut", "event_types"), ("WebhookCreated", "event_types"))
#: Fields named so hold a time (RFC 3339, UTC: ``2026-12-04T19:41:41.123456Z``).
_TIME_SUFFIXES = ("_at", "_until")


#: What a 404 means, by the path's start (the longest that fits): the resource the path
#: names, or one its body names.
_NOT_FOUND = {
    "/api/v1/tasks": "No such task; when submitting, no such template (or version).",
    "/api/v1/templates": "No such template, or no such version of it.",
    "/api/v1/schedules": "No such schedule; when creating or running one, no such template.",
    "/api/v1/batches": "No such batch; when uploading one, no such template (or version).",
    "/api/v1/webhooks": "No such subscription (or delivery of it); when subscribing or "
    "changing one, no such template.",
}
#: Operations whose answers name what they made in ``Location`` (201; and an idempotent
#: replay's or an unchanged template's 200, where there is one), and what it names.
_LOCATION = {
    ("/api/v1/tasks", "post"): "The new task: /api/v1/tasks/{id}.",
    ("/api/v1/templates", "post"): "The version registered: "
    "/api/v1/templates/{name}?version={version}.",
    ("/api/v1/schedules", "post"): "The new schedule: /api/v1/schedules/{id}.",
    ("/api/v1/schedules/{ref}/run", "post"): "The task submitted: /api/v1/tasks/{id}.",
    ("/api/v1/batches", "post"): "The new batch: /api/v1/batches/{id}.",
    ("/api/v1/webhooks", "post"): "The new subscription: /api/v1/webhooks/{id}.",
}


def error(status: int) -> ResponseSpec:
    """One error answer, with the ``ErrorBody`` schema."""
    return ResponseSpec(ErrorBody, description=_MEANING[status], generate_examples=False)


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """The error answers an operation behind the API key can give (``statuses`` and 401,
    403, 429, 503), each with the ``ErrorBody`` schema."""
    return {code: error(code) for code in sorted({*statuses, *_GUARDED})}


def refine(doc: OpenAPI) -> OpenAPI:
    """Add to Litestar's document what it cannot generate (see the module docstring)."""
    components = doc.components if isinstance(doc.components, Components) else Components()
    _answer_schemas(components.schemas or {})
    components.schemas = {**(components.schemas or {}), **_request_schemas()}
    components.security_schemes = {
        "apiKey": SecurityScheme(
            type="http",
            scheme="bearer",
            description="A key from `orchestra keys create`. Needed once any key exists, "
            "or when the service is reachable beyond loopback.",
        )
    }
    doc.components = components
    doc.security = [{"apiKey": []}]
    for path, item in (doc.paths or {}).items():
        for method, operation in _operations(item):
            # An operation left out of the table keeps Litestar's id (a test names it).
            operation.operation_id = OPERATION_IDS.get((method, path), operation.operation_id)
            if path in PUBLIC_PATHS:
                operation.security = []
            for parameter in operation.parameters or []:
                if isinstance(parameter, Parameter) and isinstance(parameter.schema, Schema):
                    parameter.schema = _not_null(parameter.schema)
            _error_answers(path, operation)
        if path in _YAML_BODIES and isinstance(item.post, Operation):
            item.post.request_body = _yaml_body(_YAML_BODIES[path])
    _link(doc)
    _locations(doc)
    return doc


def _answer_schemas(schemas: dict[str, Schema]) -> None:
    """What Litestar cannot tell from an answer's ``str`` fields: that a time is one
    (``format: date-time``), the words a field may hold (``enum``), and that a list of event
    types holds ``EventType``'s."""
    for name, schema in schemas.items():
        for field, value in (schema.properties or {}).items():
            text = _text(value)
            if text is None:
                continue
            if field.endswith(_TIME_SUFFIXES) or field == "time":
                text.format = OpenAPIFormat.DATE_TIME
            words = _ANSWER_WORDS.get((name, field))
            if words is not None:
                text.enum = list(words)
    for name, field in _EVENT_TYPES:
        listed = (schemas[name].properties or {})[field]
        assert isinstance(listed, Schema)
        listed.items = Reference(ref="#/components/schemas/EventType")


def _text(schema: Schema | Reference) -> Schema | None:
    """The string schema of ``schema`` (itself, or the string arm of ``string | null``)."""
    if not isinstance(schema, Schema):
        return None
    if schema.type == OpenAPIType.STRING:
        return schema
    arms = [a for a in schema.one_of or () if isinstance(a, Schema)]
    return next((a for a in arms if a.type == OpenAPIType.STRING), None)


def _error_answers(path: str, operation: Operation) -> None:
    """The 400 Litestar adds by itself (its own error object) as the ``ErrorBody`` the
    service answers; the 404's meaning for ``path``."""
    answers = operation.responses or {}
    bad = answers.get("400")
    if isinstance(bad, OpenAPIResponse) and not _is_error_body(bad):
        answers["400"] = OpenAPIResponse(
            description=_MEANING[400],
            content={"application/json": OpenAPIMediaType(schema=_ERROR_BODY)},
        )
    missing = answers.get("404")
    prefixes = [p for p in _NOT_FOUND if path == p or path.startswith(p + "/")]
    if isinstance(missing, OpenAPIResponse) and prefixes:
        missing.description = _NOT_FOUND[max(prefixes, key=len)]


_ERROR_BODY = Reference(ref="#/components/schemas/ErrorBody")


def _is_error_body(answer: OpenAPIResponse) -> bool:
    media = (answer.content or {}).get("application/json")
    return media is None or media.schema == _ERROR_BODY


def _locations(doc: OpenAPI) -> None:
    paths = doc.paths or {}
    for (path, method), names in _LOCATION.items():
        operation = getattr(paths[path], method)
        for answer in (operation.responses.get(status) for status in ("200", "201")):
            if not isinstance(answer, OpenAPIResponse):
                continue
            answer.headers = {
                **(answer.headers or {}),
                "Location": OpenAPIHeader(
                    schema=Schema(type=OpenAPIType.STRING), description=names, required=True
                ),
            }


def _request_schemas() -> dict[str, Schema]:
    out = {}
    for struct in REQUEST_BODIES:
        _, defs = msgspec.json.schema_components(
            [struct], ref_template="#/components/schemas/{name}"
        )
        for name, body in defs.items():
            out[name] = _object(body)
            if name in _EXAMPLES:
                out[name].examples = [_EXAMPLES[name]]
    return out


def _yaml_body(schema: Schema) -> RequestBody:
    example = _EXAMPLE_TEMPLATE if schema is _TEMPLATE else None
    return RequestBody(
        content={"application/yaml": OpenAPIMediaType(schema=schema, example=example)},
        description="YAML text, UTF-8 (any content type is read as YAML).",
        required=True,
    )


def _link(doc: OpenAPI) -> None:
    paths = doc.paths or {}
    for (path, method), links in _LINKS.items():
        source = getattr(paths[path], method)
        made = {
            name: Link(
                operation_id=getattr(paths[target], verb).operation_id, parameters=parameters
            )
            for name, (target, verb, parameters) in links.items()
        }
        for status in ("200", "201"):
            answer = source.responses.get(status)
            if isinstance(answer, OpenAPIResponse):
                answer.links = dict(made)


def _not_null(schema: Schema) -> Schema:
    """An optional text parameter is optional by being left out: ``null`` is a string.

    Litestar writes ``str | None`` as ``oneOf: [string, null]``, with the constraints beside
    the ``oneOf``, but the text ``null`` in a query or header is the string "null" (to match
    the pattern, if any). The schema is the string arm with those constraints. For other
    types (``int | None``, an enum) the text ``null`` does mean "left out", as documented.
    """
    arms = [a for a in schema.one_of or () if not (isinstance(a, Schema) and a.type == "null")]
    if len(arms) != 1 or len(schema.one_of or ()) != 2:
        return schema
    if not isinstance(arms[0], Schema) or arms[0].type != OpenAPIType.STRING:
        return schema
    outer = {
        f.name: getattr(schema, f.name)
        for f in dataclasses.fields(Schema)
        if f.name != "one_of" and getattr(schema, f.name) is not None
    }
    inner = {f.name: v for f in dataclasses.fields(Schema) if (v := getattr(arms[0], f.name))}
    return Schema(**{**outer, **inner})


def _operations(item: Any) -> list[tuple[str, Operation]]:
    methods = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
    return [(m, op) for m in methods if isinstance(op := getattr(item, m, None), Operation)]


# JSON Schema keywords to the fields of Litestar's Schema.
_FIELDS = {f.metadata.get("alias", f.name): f.name for f in dataclasses.fields(Schema)}
_ONE = {"items", "additionalProperties", "not"}
_MANY = {"anyOf", "oneOf", "allOf", "prefixItems"}


def _object(body: dict[str, Any]) -> Schema:
    schema = _schema(body)
    assert isinstance(schema, Schema), "a struct's schema is an object, not a reference"
    return schema


def _schema(body: dict[str, Any]) -> Schema | Reference:
    """A JSON Schema (as msgspec writes it) as Litestar's Schema object."""
    if "$ref" in body:
        return Reference(ref=body["$ref"])
    fields: dict[str, Any] = {}
    for key, value in body.items():
        if key == "properties":
            value = {name: _schema(sub) for name, sub in value.items()}
        elif key in _ONE and isinstance(value, dict):
            value = _schema(value)
        elif key in _MANY:
            value = [_schema(sub) for sub in value]
        elif key == "type":
            value = OpenAPIType(value)
        elif key == "format":
            value = OpenAPIFormat(value)
        fields[_FIELDS[key]] = value
    return Schema(**fields)


class _RefinedOpenAPI(OpenAPIPlugin):
    """Litestar's OpenAPI plugin, whose document is refined once, when first built."""

    __slots__ = ()

    def provide_openapi(self) -> OpenAPI:
        doc = super().provide_openapi()
        if doc.security is None:  # not refined yet: refine() sets it
            refine(doc)
        return doc


def refine_when_built(app: Litestar) -> None:
    """Have ``app``'s OpenAPI document :func:`refine`-d when it is first built: when something
    first asks for it (/schema, a test), not when the app is made. Building it took 0.25 s of
    every start (half of making the app), which every test that starts a service paid.

    Litestar makes its OpenAPI plugin itself and offers no hook after the build: the plugin's
    class is swapped for a subclass that refines (one that adds no state, so the swap is
    allowed).
    """
    plugin = app.plugins.get(OpenAPIPlugin)
    plugin.__class__ = _RefinedOpenAPI
