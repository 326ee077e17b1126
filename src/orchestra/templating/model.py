"""What a loaded template is: frozen structs, built only by the loader after validation."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from orchestra.domain import RetryPolicy

ParamType = Literal["string", "integer", "number", "boolean", "array", "object"]
PARAM_TYPES: tuple[str, ...] = ("string", "integer", "number", "boolean", "array", "object")


class Parameter(msgspec.Struct, frozen=True, omit_defaults=True):
    """One typed parameter a task passes to its template."""

    name: str
    type: ParamType
    required: bool = False
    description: str | None = None
    default: Any = msgspec.UNSET
    enum: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    #: For arrays: a JSON Schema every item must match, e.g. {type: string}.
    items: dict[str, Any] | None = None

    def json_schema(self) -> dict[str, Any]:
        """This parameter as a JSON Schema (what the API publishes and validation uses)."""
        schema: dict[str, Any] = {"type": self.type}
        for key, value in (
            ("description", self.description),
            ("enum", self.enum),
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("pattern", self.pattern),
            ("items", self.items),
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
        return schema


class LlmStep(msgspec.Struct, frozen=True):
    """A step that renders a prompt and asks a model."""

    id: str
    prompt: str
    system: str | None = None
    model: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Seconds this step may take; the model call is cancelled past it (None: no limit).
    timeout: float | None = None
    kind: Literal["llm"] = "llm"


StepSpec = LlmStep


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

    def params_schema(self) -> dict[str, Any]:
        """The parameters as one JSON Schema object."""
        return {
            "type": "object",
            "properties": {p.name: p.json_schema() for p in self.parameters.values()},
            "required": [p.name for p in self.parameters.values() if p.required],
            "additionalProperties": False,
        }
