"""Fields that take an expression (``when``, ``over``, ``input``, ``format``) take it bare or
wrapped in one ``{{ }}``, and refuse text with placeholders where an expression belongs."""

from __future__ import annotations

from typing import Any

import pytest

from orchestra.errors import RenderError, TemplateError
from orchestra.templating import parse_template
from orchestra.templating.render import evaluate, lone_expression

HEAD = """\
name: x
model: m
parameters:
  text: {type: string}
  items: {type: array}
steps:
  - id: a
    prompt: hi
"""

# (field, the step that uses EXPR in it, an expression that fits there)
FIELDS = [
    ("when", "  - id: b\n    prompt: hi\n    when: EXPR\n", "steps.a.output | length > 2"),
    (
        "over",
        "  - id: b\n    kind: map\n    over: EXPR\n    step: {prompt: hi}\n",
        "params.items",
    ),
    (
        "map item when",
        "  - id: b\n    kind: map\n    over: params.items\n    step: {prompt: hi, when: EXPR}\n",
        "item != 'skip'",
    ),
    (
        "parse_json input",
        "  - id: b\n    kind: parse_json\n    input: EXPR\n",
        "steps.a.output | tojson",
    ),
    ("embed input", "  - id: b\n    kind: embed\n    input: EXPR\n", "steps.a.output"),
    (
        "format",
        "  - id: b\n    prompt: hi\n    format: EXPR\n",
        "{'type': 'object', 'required': [params.text]}",
    ),
]
IDS = [field for field, _, _ in FIELDS]


def load(step: str, expr: str) -> Any:
    # Double quotes in YAML: the expressions above only use single-quoted strings.
    return parse_template(HEAD + step.replace("EXPR", f'"{expr}"'), "t.yaml")


def problems(text: str) -> list[tuple[str, int, int, str]]:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    return [(p.path, p.line, p.column, p.message) for p in info.value.problems]


@pytest.mark.parametrize(("field", "step", "expr"), FIELDS, ids=IDS)
def test_an_expression_field_accepts_the_expression_wrapped_in_braces(
    field: str, step: str, expr: str
) -> None:
    load(step, expr)
    load(step, "{{ " + expr + " }}")
    load(step, "  {{- " + expr + " -}}\\n")


@pytest.mark.parametrize(("field", "step", "expr"), FIELDS, ids=IDS)
def test_references_inside_braces_are_checked_like_bare_ones(
    field: str, step: str, expr: str
) -> None:
    wrong = expr.replace("params.", "params.nope_").replace("steps.a.", "steps.zzz.")
    if wrong == expr:  # the map item's when refers to neither
        wrong = "item != missing"
    bare = problems(HEAD + step.replace("EXPR", f'"{wrong}"'))
    braced = problems(HEAD + step.replace("EXPR", '"{{ ' + wrong + ' }}"'))
    assert bare and braced == bare


@pytest.mark.parametrize(
    ("expr", "scope", "value"),
    [
        ("steps.a.output | tojson", {"steps": {"a": {"output": [1, "b"]}}}, '[1, "b"]'),
        ("params.items", {"params": {"items": ["x", "y"]}}, ["x", "y"]),
        ("item != 'skip'", {"item": "skip"}, False),
        ("{'a': {'b': params.n}}", {"params": {"n": 3}}, {"a": {"b": 3}}),
        ("'}}' ~ params.s", {"params": {"s": "!"}}, "}}!"),
    ],
)
def test_an_expression_gives_the_same_value_with_or_without_braces(
    expr: str, scope: dict[str, Any], value: Any
) -> None:
    assert evaluate(expr, scope, what="t") == value
    assert evaluate("{{ " + expr + " }}", scope, what="t") == value
    assert evaluate("\n {{- " + expr + " -}} \n", scope, what="t") == value


@pytest.mark.parametrize(
    ("source", "inside"),
    [
        ("{{ x }}", "x"),
        ("  {{ params.items | length }}\n", "params.items | length"),
        ("{{- x -}}", "x"),
        ("{{ {'a': {'b': 1}} }}", "{'a': {'b': 1}}"),
        ("{{ '}}' ~ x }}", "'}}' ~ x"),
        ("{{ x\n  | upper }}", "x\n  | upper"),
        ("x", None),
        ("a {{ b }}", None),
        ("{{ a }} b", None),
        ("{{ a }}{{ b }}", None),
        ("{% if a %}b{% endif %}", None),
        ("{# note #}{{ a }}", None),
        ("{{ a }", None),
    ],
)
def test_only_one_lone_placeholder_is_unwrapped(source: str, inside: str | None) -> None:
    assert lone_expression(source) == inside


def test_a_bare_expression_may_hold_braces_in_its_strings() -> None:
    load("  - id: b\n    prompt: hi\n    when: EXPR\n", "'{{' in params.text")
    assert evaluate("'{{' in params.text", {"params": {"text": "a {{ b"}}, what="t") is True


@pytest.mark.parametrize(
    "text",
    [
        "Summary: {{ steps.a.output }}",
        "{{ steps.a.output }} and more",
        "{{ steps.a.output }}{{ params.text }}",
        "{% if params.text %}yes{% endif %}",
    ],
)
@pytest.mark.parametrize(("field", "step", "expr"), FIELDS, ids=IDS)
def test_text_with_placeholders_is_refused_where_an_expression_belongs(
    field: str, step: str, expr: str, text: str
) -> None:
    template = HEAD + step.replace("EXPR", f'"{text}"')
    found = problems(template)
    [(path, line, column, message)] = found
    assert path.endswith(("when", "over", "input", "format"))
    offset = template.index(f'"{text}"')
    assert (line, column) == (
        template.count("\n", 0, offset) + 1,
        offset - template.rfind("\n", 0, offset),
    )
    assert "takes an expression" in message and "with or without {{ }}" in message
    assert "not text with placeholders" in message


def test_evaluating_text_with_placeholders_fails_with_the_same_explanation() -> None:
    with pytest.raises(RenderError, match="takes an expression"):
        evaluate("n={{ params.n }}", {"params": {"n": 1}}, what="steps.a.input")
