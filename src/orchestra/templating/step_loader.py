"""Validating the ``steps`` of a template: every kind, every field, every reference.

References are checked statically: a prompt may use ``params.X`` only for a declared
parameter and ``steps.Y`` only for a step that runs before it; inside a ``map``, ``item`` and
``index`` are in scope too.
"""

from __future__ import annotations

from typing import Any

import jinja2
import jsonschema
import msgspec

from orchestra.templating.model import (
    STEP_KINDS,
    EmbedStep,
    LlmStep,
    MapStep,
    Message,
    ParseJsonStep,
    RenderStep,
    StepSpec,
)
from orchestra.templating.options import check_options
from orchestra.templating.references import references
from orchestra.templating.regex import check_schema
from orchestra.templating.render import NotAnExpression, compile_expression, compile_text
from orchestra.templating.source import IDENT, IDENT_RULE, Checker, Path_, describe, format_path

#: A step id, matched with fullmatch (match would let a final newline through "$").
COMMON_KEYS = ("id", "kind", "when", "timeout")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "llm": (
        "prompt",
        "system",
        "messages",
        "model",
        "options",
        "format",
        "repair_attempts",
        "think",
        "cache",
    ),
    "render": ("text",),
    "parse_json": ("input", "schema"),
    "embed": ("input", "model"),
    "map": ("over", "step", "concurrency"),
}
ROLES = ("system", "user", "assistant")


class Scope(msgspec.Struct, frozen=True):
    """What expressions at one place in a template may refer to."""

    params: frozenset[str]
    #: Every top-level step id and its position.
    order: dict[str, int]
    #: The position of the step being checked; None (the output) may use every step.
    position: int | None = None
    #: Extra names, e.g. item and index inside a map.
    extra: frozenset[str] = frozenset()

    def check(self, c: Checker, path: Path_, source: str, *, expression: bool = False) -> None:
        """Report syntax errors, unknown filters and tests, uses of other templates and
        references this scope does not allow, each at its line inside the value."""
        try:
            # Compile, not just parse: unknown filters and tests are compile-time errors
            # (outside an {% if %}; references() finds those inside one).
            if expression:
                compile_expression(source)
            else:
                compile_text(source)
            refs = references(source, expression=expression)
        except NotAnExpression as exc:
            c.add(path, str(exc.message))
            return
        except jinja2.TemplateSyntaxError as exc:
            at = None if expression else c.src.where_in_value(path, exc.lineno or 1)
            c.add(path, f"Jinja syntax error: {exc.message}", at=at)
            return
        # Jinja's parser and compiler recurse once per level; Python's compiler refuses the
        # code of 20 nested blocks (loops) and of about 100 levels of indentation (macros).
        except (RecursionError, SyntaxError):
            at = c.src.where_in_value(path, _deepest_line(source))
            c.add(path, "Jinja: this nests too deeply to be compiled; split it up", at=at)
            return

        def add(key: str, message: str) -> None:
            c.add(path, message, at=c.src.where_in_value(path, refs.lines.get(key, 1)))

        for lineno, message in refs.problems:
            c.add(path, message, at=c.src.where_in_value(path, lineno))
        allowed = {"params", "steps"} | self.extra
        for name in sorted(refs.names - allowed):
            add(
                name,
                f"unknown name {name!r}; expressions here can use {', '.join(sorted(allowed))}",
            )
        for param in sorted(refs.params - self.params):
            takes = ", ".join(sorted(self.params)) or "none"
            add(f"params.{param}", f"unknown parameter {param!r} (the template takes: {takes})")
        for step in sorted(refs.steps):
            where = self.order.get(step)
            key = f"steps.{step}"
            if where is None:
                known = ", ".join(self.order) or "none"
                add(key, f"unknown step {step!r} (the steps are: {known})")
            elif self.position is not None and where == self.position:
                add(key, f"a step cannot use its own output (steps.{step})")
            elif self.position is not None and where > self.position:
                add(
                    key,
                    f"step {step!r} runs later (steps[{where}]); a step can only use "
                    "the outputs of steps before it",
                )


#: Brackets nested this deep are where a too-deep expression is reported.
_DEEP = 100


def _deepest_line(source: str) -> int:
    """The line (1-based) where ``source``'s brackets first nest :data:`_DEEP` levels deep,
    or where they nest deepest (1 when it has none)."""
    depth, deepest, line, at = 0, 0, 1, 1
    for char in source:
        if char in "([{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, line
                if depth >= _DEEP:
                    break
        elif char in ")]}":
            depth -= 1
        elif char == "\n":
            line += 1
    return at


def _schema(c: Checker, path: Path_, value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        c.add(path, f"expected a JSON Schema (a mapping), got {describe(value)}")
        return None
    try:
        check_schema(value)
    except jsonschema.SchemaError as exc:
        where = format_path(tuple(exc.absolute_path))
        c.add(path, f"invalid JSON Schema{(' at ' + where) if where else ''}: {exc.message}")
        return None
    return value


def _int(
    c: Checker, data: dict[str, Any], path: Path_, key: str, default: int, low: int, high: int
) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        c.add((*path, key), f"{key} must be a whole number from {low} to {high}, got {value!r}")
        return default
    return value


def _flag(c: Checker, data: dict[str, Any], path: Path_, key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        c.add((*path, key), f"{key} must be true or false, got {value!r}")
        return None
    return value


class _StepReader:
    """Reads one step mapping of any kind."""

    def __init__(self, c: Checker, data: dict[str, Any], path: Path_, scope: Scope) -> None:
        self.c, self.data, self.path, self.scope = c, data, path, scope

    def template(self, key: str, required: bool = False) -> str | None:
        text: str | None = self.c.string(self.data, self.path, key, required=required)
        if text is not None:
            self.scope.check(self.c, (*self.path, key), text)
        return text

    def expression(self, key: str, required: bool = False) -> str | None:
        text: str | None = self.c.string(self.data, self.path, key, required=required)
        if text is not None:
            self.scope.check(self.c, (*self.path, key), text, expression=True)
        return text

    def when(self) -> str | None:
        """The step's condition: an expression, or a YAML boolean (``when: false`` turns a
        step off), kept as the expression it stands for."""
        value = self.data.get("when")
        if isinstance(value, bool):
            return "true" if value else "false"
        return self.expression("when")

    def llm(self, common: dict[str, Any]) -> LlmStep | None:
        c, data, path = self.c, self.data, self.path
        messages = self._messages()
        if data.get("prompt") is None and data.get("messages") is None:
            c.add(path, "'prompt' or 'messages' is required")
        prompt = self.template("prompt")
        if prompt is not None and messages:
            c.add((*path, "messages"), "give either prompt (and system) or messages, not both")
        system = self.template("system")
        if system is not None and messages:
            c.add((*path, "system"), "with messages, put the system message in the list")
        options = data.get("options", {})
        if not isinstance(options, dict):
            c.add((*path, "options"), f"'options' must be a mapping, got {describe(options)}")
            options = {}
        check_options(c, (*path, "options"), options)
        fmt = data.get("format")
        if isinstance(fmt, dict):
            fmt = _schema(c, (*path, "format"), fmt)
        elif isinstance(fmt, str):
            if fmt != "json":
                # Anything but "json" is an expression that yields a schema at run time.
                self.scope.check(c, (*path, "format"), fmt, expression=True)
        elif fmt is not None:
            c.add(
                (*path, "format"),
                f"format must be json, a JSON Schema or an expression, got {describe(fmt)}",
            )
            fmt = None
        return LlmStep(
            **common,
            prompt=prompt,
            system=system,
            messages=tuple(messages),
            model=c.model(data, path),
            options=options,
            format=fmt,
            repair_attempts=_int(c, data, path, "repair_attempts", 2, 0, 5),
            think=_flag(c, data, path, "think"),
            cache=_flag(c, data, path, "cache"),
        )

    def _messages(self) -> list[Message]:
        c, raw = self.c, self.data.get("messages")
        if raw is None:
            return []
        path = (*self.path, "messages")
        if not isinstance(raw, list) or not raw:
            c.add(path, "'messages' must be a non-empty list of {role, content}")
            return []
        out = []
        for index, item in enumerate(raw):
            where = (*path, index)
            entry = c.mapping(item, where, "a message")
            if entry is None:
                continue
            c.keys(entry, where, ("role", "content"))
            role, content = entry.get("role"), entry.get("content")
            if role not in ROLES:
                c.add((*where, "role"), f"role must be one of {', '.join(ROLES)}, got {role!r}")
                continue
            if not isinstance(content, str):
                c.add((*where, "content"), f"content must be a string, got {describe(content)}")
                continue
            self.scope.check(c, (*where, "content"), content)
            out.append(Message(role=role, content=content))
        return out

    def render(self, common: dict[str, Any]) -> RenderStep | None:
        text = self.template("text", required=True)
        return None if text is None else RenderStep(**common, text=text)

    def parse_json(self, common: dict[str, Any]) -> ParseJsonStep | None:
        source = self.expression("input", required=True)
        schema = self.data.get("schema")
        if schema is not None:
            schema = _schema(self.c, (*self.path, "schema"), schema)
        return None if source is None else ParseJsonStep(**common, input=source, schema=schema)

    def embed(self, common: dict[str, Any]) -> EmbedStep | None:
        source = self.expression("input", required=True)
        model = self.c.model(self.data, self.path)
        return None if source is None else EmbedStep(**common, input=source, model=model)

    def map(self, common: dict[str, Any]) -> MapStep | None:
        over = self.expression("over", required=True)
        concurrency = _int(self.c, self.data, self.path, "concurrency", 4, 1, 64)
        inner_path = (*self.path, "step")
        raw = self.data.get("step")
        if raw is None:
            self.c.add(self.path, "'step' is required: the step to run for each item")
            return None
        inner_scope = msgspec.structs.replace(
            self.scope, extra=self.scope.extra | {"item", "index"}
        )
        inner = read_step(self.c, raw, inner_path, inner_scope, nested=True)
        if over is None or inner is None:
            return None
        if isinstance(inner, MapStep):
            self.c.add(inner_path, "a map cannot contain another map; split it into two steps")
            return None
        return MapStep(**common, over=over, step=inner, concurrency=concurrency)


def read_step(
    c: Checker, raw: Any, path: Path_, scope: Scope, *, nested: bool = False
) -> StepSpec | None:
    """Validate one step of any kind; None (with problems reported) when it is invalid."""
    data = c.mapping(raw, path, "a step")
    if data is None:
        return None
    kind = data.get("kind", "llm")
    if kind not in STEP_KINDS:
        c.add((*path, "kind"), f"unknown step kind {kind!r} (known: {', '.join(STEP_KINDS)})")
        return None
    c.keys(data, path, COMMON_KEYS + KIND_KEYS[kind])
    reader = _StepReader(c, data, path, scope)
    step_id = c.string(data, path, "id", required=not nested)
    if nested and step_id is None:
        step_id = "item"  # an inner step's id is optional ("" is no id: checked below)
    if nested and step_id is not None and not IDENT.fullmatch(step_id):
        c.add((*path, "id"), f"step id {step_id!r} {IDENT_RULE}")  # a top-level one: read_steps
    common = {
        "id": step_id or "_",  # a step without a valid id is still checked whole
        "when": reader.when(),
        "timeout": c.duration(data, path, "timeout"),
    }
    build = {
        "llm": reader.llm,
        "render": reader.render,
        "parse_json": reader.parse_json,
        "embed": reader.embed,
        "map": reader.map,
    }[kind]
    step: StepSpec | None = build(common)
    return step if step_id is not None else None


def read_steps(c: Checker, value: Any, params: frozenset[str]) -> list[StepSpec]:
    """Validate the ``steps`` list: ids first (unique, well formed), then each step."""
    if not isinstance(value, list) or not value:
        c.add(("steps",), "'steps' must be a non-empty list of steps")
        return []
    order: dict[str, int] = {}
    for index, raw in enumerate(value):
        step_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(step_id, str):
            continue
        path: Path_ = ("steps", index, "id")
        if not IDENT.fullmatch(step_id):
            c.add(path, f"step id {step_id!r} {IDENT_RULE}")
        elif step_id in order:
            c.add(path, f"duplicate step id {step_id!r} (also steps[{order[step_id]}])")
        else:
            order[step_id] = index
    steps = []
    for index, raw in enumerate(value):
        scope = Scope(params=params, order=order, position=index)
        step = read_step(c, raw, ("steps", index), scope)
        if step is not None:
            steps.append(step)
    return steps
