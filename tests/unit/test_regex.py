"""Template regexes run on RE2: JSON Schema's semantics, linear time, clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from orchestra.errors import InvalidParams, StepError, TemplateError
from orchestra.kinds import _schema_problems
from orchestra.templating import TemplateProblem, parse_template
from orchestra.templating.params import validate_params
from orchestra.templating.regex import (
    MAX_TOTAL_SIZE,
    PatternBudget,
    PatternError,
    SchemaValidator,
    compile_pattern,
    schema_problems,
    search,
)

#: On a backtracking engine each extra "a" doubles the time: this would not finish.
NASTY = "a" * 100_000 + "!"


def problems(text: str) -> list[TemplateProblem]:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    return info.value.problems


def errors(schema: dict[str, Any], value: Any) -> list[str]:
    return [e.message for e in SchemaValidator(schema).iter_errors(value)]


def test_a_pattern_matches_anywhere_unless_it_anchors_itself() -> None:
    assert search("[0-9]", "abc1def")
    assert not search("^[0-9]+$", "abc1def")
    assert search("^[0-9]+$", "123")
    # As in ECMA-262, $ is the very end: Python's re would accept the trailing newline.
    assert not search("^[0-9]+$", "123\n")


def test_backtracking_patterns_take_linear_time() -> None:
    assert not search("^(a+)+$", NASTY)
    assert not search("^(a|a)*$", NASTY)
    assert not search("^(a|aa)+$", NASTY)
    assert search("^(a+)+$", NASTY[:-1])


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"^(\w+) \1$", "invalid escape sequence: \\1"),
        ("^(?=a)", "invalid perl operator"),
        ("(?<!a)b", "invalid perl operator"),
        ("a++", "bad repetition operator"),
        ("(", "missing )"),
    ],
)
def test_what_re2_cannot_take_is_refused_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(pattern)
    message = str(info.value)
    assert why in message and "RE2" in message
    assert "backreferences, lookarounds and possessive quantifiers" in message


def test_a_pattern_too_large_for_re2_is_refused_with_a_hint() -> None:
    with pytest.raises(PatternError) as info:
        compile_pattern(r"\p{L}{1000}")
    assert "too large" in str(info.value) and "length limit" in str(info.value)


def test_escapes_json_schema_authors_write_are_understood() -> None:
    assert search(r"^caf\u00e9$", "café")
    assert search(r"^\U0001F600$", "😀")
    assert search(r"abc\Z", "xabc") and not search(r"abc\Z", "abc\n")
    # An escaped backslash followed by u is a backslash and a u.
    assert search(r"^\\u0041$", "\\u0041")


def test_a_lone_surrogate_in_the_text_is_matched_not_a_crash() -> None:
    assert search("^a", "a\ud800")
    assert not search("^b", "a\ud800")


def test_the_validator_runs_pattern_keywords_on_re2() -> None:
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}},
        "patternProperties": {"^(b+)+$": {"type": "integer"}},
        "additionalProperties": False,
        "propertyNames": {"pattern": "^(code|(b+)+!?)$"},
    }
    found = errors(schema, {"code": NASTY, "b" * 50 + "!": 1, "b" * 50: "x"})
    assert f"{NASTY!r} does not match '^(a+)+$'" in found
    assert "'x' is not of type 'integer'" in found
    assert any("not match any of the regexes: '^(b+)+$'" in e for e in found)
    assert errors(schema, {"code": "aaa", "bb": 2}) == []


def test_the_validator_reports_an_unusable_pattern_instead_of_raising() -> None:
    [message] = errors({"pattern": "(?=x)"}, "x")
    assert message.startswith("pattern '(?=x)' cannot be used: ")


def test_schema_problems_finds_patterns_in_subschemas_only() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"pattern": "(?=1)"}, "pattern": {"type": "string"}},
        "patternProperties": {"(x)\\1": True},
        "items": [{"pattern": "ok"}, {"pattern": "(?!2)"}],
        "allOf": [{"$defs": {"d": {"pattern": "(?<=3)"}}}],
        "enum": [{"pattern": "(?=4)"}],
        "const": {"pattern": "(?=5)"},
        "default": {"pattern": "(?=6)"},
    }
    found = {path: at_key for path, _, at_key in schema_problems(schema, ("root",))}
    assert found == {
        ("root", "properties", "a", "pattern"): False,
        ("root", "patternProperties", "(x)\\1"): True,
        ("root", "items", 1, "pattern"): False,
        ("root", "allOf", 0, "$defs", "d", "pattern"): False,
    }


def test_unevaluated_properties_cannot_be_combined_with_pattern_properties() -> None:
    schema = {
        "allOf": [{"patternProperties": {"^x": True}}],
        "unevaluatedProperties": False,
    }
    [(path, why, _)] = schema_problems(schema)
    assert path == ("unevaluatedProperties",)
    assert "additionalProperties instead" in why
    assert schema_problems({"unevaluatedProperties": False, "properties": {"a": True}}) == []


def test_the_budget_bounds_the_compiling_of_many_large_patterns() -> None:
    budget = PatternBudget()
    whys = [budget.problem(rf"\p{{L}}{{1000}}x{i}") for i in range(20)]
    assert all(why and "too large" in why for why in whys[:5])
    assert whys[-1] and f"over {MAX_TOTAL_SIZE} RE2 instructions" in whys[-1]
    assert budget.problem("^ok$") is not None  # nothing more is compiled once it is spent
    assert PatternBudget().problem("^ok$") is None


TEMPLATE = """\
name: t
model: llama3.2
parameters:
  word: {type: string, pattern: '^(\\w+) \\1$'}
  tags:
    type: array
    items: {type: string, pattern: '(?<=#)'}
steps:
  - id: a
    prompt: "{{ params.word }} {{ params.tags }}"
    format:
      type: object
      properties:
        code: {type: string, pattern: '^(?!x)'}
  - id: b
    kind: map
    over: "params.tags"
    step:
      kind: parse_json
      input: "{{ item }}"
      schema:
        patternProperties:
          'a++': true
"""


def test_a_template_with_patterns_re2_cannot_take_is_refused_with_positions() -> None:
    found = {p.path: (p.line, p.column, p.message) for p in problems(TEMPLATE)}
    assert set(found) == {
        "parameters.word.pattern",
        "parameters.tags.items.pattern",
        "steps[0].format.properties.code.pattern",
        "steps[1].step.schema.patternProperties.a++",
    }
    assert found["parameters.word.pattern"][:2] == (4, 33)
    assert found["parameters.tags.items.pattern"][:2] == (7, 36)
    assert found["steps[0].format.properties.code.pattern"][:2] == (14, 39)
    # A patternProperties key is pointed at where it is written.
    assert found["steps[1].step.schema.patternProperties.a++"][:2] == (23, 11)
    assert all("RE2" in message for _, _, message in found.values())


def test_a_default_is_checked_against_a_backtracking_pattern_in_linear_time() -> None:
    body = f"name: t\nparameters:\n  c: {{type: string, pattern: '^(a+)+$', default: {NASTY}}}\n"
    [problem] = problems(body + "steps:\n  - id: a\n    kind: render\n    text: x\n")
    assert problem.path == "parameters.c.default" and "does not match" in problem.message


def test_params_are_checked_against_patterns_in_linear_time() -> None:
    template = parse_template(
        "name: t\nparameters:\n  c: {type: string, pattern: '^(a+)+$'}\n"
        "  l: {type: array, items: {type: string, pattern: '^(b+)+$'}}\n"
        "steps:\n  - id: a\n    kind: render\n    text: x\n"
    )
    with pytest.raises(InvalidParams) as info:
        validate_params(template, {"c": NASTY, "l": ["bb", "b" * 1000 + "!"]})
    assert [f.field for f in info.value.fields] == ["params.c", "params.l[1]"]
    assert validate_params(template, {"c": "aaa", "l": ["b"]}) == {"c": "aaa", "l": ["b"]}


def test_a_step_fails_on_a_runtime_schema_re2_cannot_take() -> None:
    schema = {"type": "object", "properties": {"x": {"pattern": "(a)\\1"}}}
    with pytest.raises(StepError, match="properties.x.pattern: pattern is not a valid"):
        _schema_problems({"x": "aa"}, schema)
    assert _schema_problems({"x": NASTY}, {"properties": {"x": {"pattern": "^(a+)+$"}}})


def test_a_deeply_nested_pattern_is_checked_by_re2_not_by_pythons_recursive_parser() -> None:
    deep = "(" * 1000 + "a" + ")" * 1000
    template = parse_template(
        f"name: t\nparameters:\n  l: {{type: array, items: {{type: string, pattern: '{deep}'}}}}\n"
        "steps:\n  - id: a\n    kind: render\n    text: x\n"
    )
    assert validate_params(template, {"l": ["a"]}) == {"l": ["a"]}
