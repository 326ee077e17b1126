"""What a loaded template is: frozen structs, built only by the loader after validation."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from orchestra.domain import RetryPolicy

ParamType = Literal["string", "integer", "number", "boolean", "array", "object"]
#: Where a template comes from: builtin (shipped), file (a [templates] dirs folder) or api
#: (registered).
Origin = Literal["builtin", "file", "api"]
PARAM_TYPES: tuple[str, ...] = ("string", "integer", "number", "boolean", "array", "object")


class Parameter(msgspec.Struct, frozen=True, omit_defaults=True):
    """One typed parameter a task passes to its template."""

    name: str
    type: ParamType
    required: bool = False
    description: str | None = None
    default: Any = msgspec.UNSET
    enum: list[Any] | None = None
    #: Kept as written: an integer stays one (the published schema says 10, not 10.0).
    minimum: int | float | None = None
    maximum: int | float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    #: For arrays: a JSON Schema every item must match, e.g. {type: string}.
    items: dict[str, Any] | None = None
    #: For arrays: no item may appear twice (JSON Schema's uniqueItems).
    unique_items: bool = False

    def json_schema(self) -> dict[str, Any]:
        """This parameter as a JSON Schema (what the API publishes and validation uses)."""
        schema: dict[str, Any] = {"type": self.type}
        items = self.items
        if isinstance(items, dict) and "$id" not in items and _refers(items):
            # Its references were checked with ``#`` as the items' schema; inside the
            # parameters' schema ``#`` would be that whole object. An $id makes it its own.
            items = {"$id": f"urn:orchestra:parameter:{self.name}:items", **items}
        for key, value in (
            ("description", self.description),
            ("enum", self.enum),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("pattern", self.pattern),
            ("items", items),
        ):
            if value is not None:
                schema[key] = value
        if self.default is not msgspec.UNSET:
            schema["default"] = self.default
        # min_length/max_length count characters of a string and items of an array.
        prefix = "Items" if self.type == "array" else "Length"
        if self.min_length is not None:
            schema[f"min{prefix}"] = self.min_length
        if self.max_length is not None:
            schema[f"max{prefix}"] = self.max_length
        if self.unique_items:
            schema["uniqueItems"] = True
        return schema


def _refers(node: Any) -> bool:
    """Whether a ``$ref`` is anywhere in ``node``."""
    if isinstance(node, dict):
        return "$ref" in node or any(_refers(v) for v in node.values())
    if isinstance(node, list):
        return any(_refers(v) for v in node)
    return False


class Message(msgspec.Struct, frozen=True):
    """One chat message of an llm step; ``content`` is a Jinja template."""

    role: Literal["system", "user", "assistant"]
    content: str


class _Step(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    #: A Jinja expression (bare or in one {{ }}); when false the step is skipped (output null).
    when: str | None = None
    #: Seconds this step may take; what it runs is cancelled past it (None: no limit).
    timeout: float | None = None


class LlmStep(_Step, frozen=True, kw_only=True):
    """Render a prompt (or chat messages) and ask a model."""

    prompt: str | None = None
    system: str | None = None
    messages: tuple[Message, ...] = ()
    model: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Structured output: "json", a JSON Schema, or a Jinja expression yielding a schema.
    format: str | dict[str, Any] | None = None
    #: How many times an invalid structured reply is sent back to the model to fix.
    repair_attempts: int = 2
    #: Let a thinking model think before it answers (Ollama's ``think``); None: its default.
    think: bool | None = None
    #: The cache of model answers: True use it, False bypass it, None: when deterministic
    #: (temperature 0 or a seed set); see docs/cache.md.
    cache: bool | None = None
    kind: Literal["llm"] = "llm"


class RenderStep(_Step, frozen=True, kw_only=True):
    """Render a Jinja template into text, with no model call."""

    text: str
    kind: Literal["render"] = "render"


class ParseJsonStep(_Step, frozen=True, kw_only=True):
    """Parse JSON out of a value (a fenced ```json block is fine), optionally checking it."""

    input: str
    schema: dict[str, Any] | None = None
    kind: Literal["parse_json"] = "parse_json"


class EmbedStep(_Step, frozen=True, kw_only=True):
    """Embeddings of a string (one vector) or a list of strings (a list of vectors)."""

    input: str
    model: str | None = None
    kind: Literal["embed"] = "embed"


class MapStep(_Step, frozen=True, kw_only=True):
    """Run ``step`` once per item of ``over``; the output is the list of results, in order."""

    over: str
    step: StepSpec
    concurrency: int = 4
    kind: Literal["map"] = "map"


StepSpec = LlmStep | RenderStep | ParseJsonStep | EmbedStep | MapStep
STEP_KINDS: tuple[str, ...] = ("llm", "render", "parse_json", "embed", "map")


class Template(msgspec.Struct, frozen=True):
    """A validated task template."""

    name: str
    version: int
    steps: tuple[StepSpec, ...]
    description: str = ""
    model: str | None = None
    parameters: dict[str, Parameter] = msgspec.field(default_factory=dict)
    #: A Jinja string, a mapping of names to Jinja strings, or None for the last step's output.
    output: str | dict[str, str] | None = None
    #: How the task is retried after a retryable error; None: the service's default.
    retry: RetryPolicy | None = None
    #: Seconds one attempt may take in all; None: no limit.
    timeout: float | None = None
    #: Where it was loaded from (a file path) — for error messages and listings.
    source: str = "<string>"
    #: builtin (shipped), file (a [templates] dirs folder) or api (registered).
    origin: Origin = "file"
    #: The YAML it was read from, as written (the dashboard shows it).
    text: str = ""

    def params_schema(self) -> dict[str, Any]:
        """The parameters as one JSON Schema object."""
        return {
            "type": "object",
            "properties": {p.name: p.json_schema() for p in self.parameters.values()},
            "required": [p.name for p in self.parameters.values() if p.required],
            "additionalProperties": False,
        }
