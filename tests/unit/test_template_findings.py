"""Findings of an exploratory test of templates: durations, versions, odd YAML, deep Jinja,
the wrapped filters, lone surrogates, positions in quoted scalars and the built-in filters."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
from jinja2.filters import FILTERS
from jinja2.tests import TESTS
from jinja2.utils import _PassArg

from orchestra.api.errors import too_deep
from orchestra.domain import RetryPolicy, TaskError, decide_retry
from orchestra.errors import InvalidOutput, InvalidParams, RenderError, TemplateError
from orchestra.sizes import check_size
from orchestra.templating import TemplateProblem, parse_template
from orchestra.templating.params import validate_params
from orchestra.templating.render import (
    choose,
    chunk,
    environment,
    from_json,
    lines,
    parse_json_text,
    render_text,
)
from orchestra.web.render import described
from tests.unit.test_retry_decision import _task

STEPS = "steps:\n  - id: a\n    prompt: hi\n"
#: The longest wait between attempts (domain.MAX_RETRY_DELAY): a year.
MAX_RETRY_DELAY = 365 * 86_400


def problems(text: str) -> list[TemplateProblem]:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    return info.value.problems


def one(text: str) -> TemplateProblem:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# H1: durations are finite and bounded.


@pytest.mark.parametrize(
    ("extra", "path", "column", "reason"),
    [
        ("timeout: .nan\n", "timeout", 10, "finite"),
        ("timeout: .inf\n", "timeout", 10, "finite"),
        ("timeout: 1e308\n", "timeout", 10, "at most 8760h"),
        ("timeout: 99999999999999h\n", "timeout", 10, "at most 8760h"),
        ("timeout: 8761h\n", "timeout", 10, "at most 8760h"),
        (
            "retry: {initial_delay: 99999999999999h, max_delay: 99999999999999h}\n",
            "retry.initial_delay",
            24,
            "at most 8760h",
        ),
        ("retry: {initial_delay: .inf, max_delay: .inf}\n", "retry.initial_delay", 24, "finite"),
        ("retry: {backoff: fixed, initial_delay: 1e300}\n", "retry.initial_delay", 40, "at most"),
    ],
)
def test_a_duration_that_is_not_finite_or_past_its_bound_is_refused_at_its_value(
    extra: str, path: str, column: int, reason: str
) -> None:
    found = [p for p in problems(f"name: d\n{extra}{STEPS}") if p.path == path]
    assert found, problems(f"name: d\n{extra}{STEPS}")
    assert (found[0].line, found[0].column) == (2, column)
    assert reason in found[0].message


def test_a_step_timeout_past_a_year_is_refused_at_its_value() -> None:
    p = one("name: d\nsteps:\n  - id: a\n    timeout: 99999999999999h\n    prompt: hi\n")
    assert (p.line, p.column, p.path) == (4, 14, "steps[0].timeout")
    assert "at most 8760h" in p.message


def test_durations_at_their_bounds_are_taken() -> None:
    t = parse_template(
        "name: d\ntimeout: 8760h\nretry: {initial_delay: 8760h, max_delay: 8760h}\n" + STEPS
    )
    assert t.timeout == 365 * 86_400
    assert t.retry is not None and t.retry.max_delay == MAX_RETRY_DELAY


@pytest.mark.parametrize("delay", [1e300, math.inf, math.nan, 99999999999999 * 3600.0])
def test_a_retry_delay_the_calendar_cannot_hold_is_capped(delay: float) -> None:
    error = TaskError(type="model_unavailable", message="refused", retryable=True)
    policy = RetryPolicy(initial_delay=delay, max_delay=delay)
    at = datetime(2026, 11, 22, tzinfo=UTC)
    retry = decide_retry(_task(60, max_attempts=100), error, policy, at=at)
    assert retry is not None
    assert retry.delay <= MAX_RETRY_DELAY
    assert (retry.at - at).total_seconds() <= MAX_RETRY_DELAY


# H2: a file's version fits the database.


@pytest.mark.parametrize("version", ["99999999999999999999999999", str(2**63), str(2**53)])
def test_a_version_too_large_is_refused_at_its_value(version: str) -> None:
    p = one(f"name: v\nversion: {version}\n{STEPS}")
    assert (p.line, p.column, p.path) == (2, 10, "version")
    assert "from 1 to 9007199254740991" in p.message


def test_the_largest_version_is_taken() -> None:
    assert parse_template(f"name: v\nversion: {2**53 - 1}\n{STEPS}").version == 2**53 - 1


# H3: malformed YAML and Jinja are problems, never crashes.


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("name: m\nx: &x\n  <<: *x\n" + STEPS, 3, 3),
        ("name: m\nx: &x\n  a: 1\n  <<: [*x]\n" + STEPS, 4, 3),
        ("name: m\nx: &x\n  y:\n    <<: *x\n" + STEPS, 4, 5),
    ],
)
def test_a_merge_key_that_merges_its_own_mapping_is_a_problem_at_the_merge_key(
    text: str, line: int, column: int
) -> None:
    p = one(text)
    assert (p.line, p.column) == (line, column)
    assert "merge" in p.message


def test_an_omap_is_read_as_a_mapping() -> None:
    t = parse_template(STEPS.join(["name: o\n", "output: !!omap [a: '{{ 1 }}']\n"]))
    assert t.output == {"a": "{{ 1 }}"}


DEEP = "(" * 500 + "1" + ")" * 500


@pytest.mark.parametrize(
    ("step", "line", "column", "path"),
    [
        (f'    prompt: "{{{{ {DEEP} }}}}"\n', 4, 13, "steps[0].prompt"),
        (f'    when: "{DEEP}"\n    prompt: hi\n', 4, 11, "steps[0].when"),
        (f"    prompt: |\n      line\n      {{{{ {DEEP} }}}}\n", 6, 7, "steps[0].prompt"),
        (f'    prompt: "{{% if {"not " * 800}x %}}{{% endif %}}"\n', 4, 13, "steps[0].prompt"),
    ],
)
def test_a_jinja_expression_nested_too_deeply_is_a_problem_at_its_line(
    step: str, line: int, column: int, path: str
) -> None:
    p = one(f"name: j\nsteps:\n  - id: a\n{step}")
    assert (p.line, p.column, p.path) == (line, column, path)
    assert "nests too deeply" in p.message


def test_a_recursion_error_from_a_template_is_not_taken_for_the_request_body() -> None:
    try:
        environment().from_string("{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}")
    except RecursionError as exc:
        error = exc
    else:
        raise AssertionError("Jinja read 2,000 parentheses")
    request: Any = SimpleNamespace(url=SimpleNamespace(path="/x"), method="POST")
    assert too_deep(request, error).status_code == 500
    assert too_deep(request, RecursionError()).status_code == 400  # msgspec's, from a body
    # The dashboard's pages answer it the same way (their own Jinja pages included).
    assert described(error)[:2] == (500, "internal error")
    assert described(RecursionError())[:2] == (400, "the request is not valid")


# M1, M2: every wrapped filter takes what Jinja's own takes.


def test_every_filter_and_test_takes_what_jinjas_own_takes() -> None:
    env = environment()
    for name, original in FILTERS.items():
        assert _PassArg.from_obj(env.filters[name]) == _PassArg.from_obj(original), name
    for name, original in TESTS.items():
        assert _PassArg.from_obj(env.tests[name]) == _PassArg.from_obj(original), name


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ 'abc def ghi'|wordwrap(3) }}", "abc\ndef\nghi"),
        ("{{ 'abc def'|wordwrap(3, wrapstring='|') }}", "abc|def"),
        ("{{ [1,2,3]|slice(2)|list }}", "[[1, 2], [3]]"),
        ("{{ [1,2,3]|slice(2, 0)|list }}", "[[1, 2], [3, 0]]"),
        ("{{ 'a'|center(5) }}|", "  a  |"),
        ("{{ 'a\nb'|indent(2, first=true) }}", "  a\n  b"),
        ("{{ 'aaa'|replace('a','b',2) }}", "bba"),
        ("{{ [1,2]|join(',') }}", "1,2"),
        ("{{ [{'n':1},{'n':2}]|join(',', attribute='n') }}", "1,2"),
        ("{{ '%s-%d'|format('a', 3) }}", "a-3"),
        ("{{ [1,2,3]|batch(2, 0)|list }}", "[[1, 2], [3, 0]]"),
        ("{{ [1,2,3]|sum(start=10) }}", "16"),
        ("{{ [[1],[2]]|sum(start=[]) }}", "[1, 2]"),
        ("{{ {'a': [1, none]}|tojson }}", '{"a": [1, null]}'),
        ("{{ 5|string }}", "5"),
        ("{{ {'a': 1}|pprint }}", "{'a': 1}"),
        ("{{ lipsum(1, false, 3, 4)|length > 0 }}", "True"),
        ("{{ 4 is divisibleby 2 }}", "True"),
    ],
)
def test_each_wrapped_filter_works_on_a_harmless_input(source: str, expected: str) -> None:
    assert render_text(source, {}, what="t") == expected


# M3: lone surrogates.


@pytest.mark.parametrize(
    ("text", "line", "column", "path"),
    [
        ('    prompt: "hi \\ud800 there"\n', 4, 13, "steps[0].prompt"),
        ('    kind: render\n    text: "a \\udfff"\n', 5, 11, "steps[0].text"),
        ('    prompt: hi\n    options: {stop: ["\\ud800"]}\n', 5, 22, "steps[0].options.stop[0]"),
    ],
)
def test_a_lone_surrogate_in_the_yaml_is_refused_at_its_value(
    text: str, line: int, column: int, path: str
) -> None:
    p = one(f"name: s\nsteps:\n  - id: a\n{text}")
    assert (p.line, p.column, p.path) == (line, column, path)
    assert "\\ud8" in p.message or "\\udf" in p.message
    assert "surrogate" in p.message
    str(p).encode()  # the problem itself can be sent


def test_a_surrogate_pair_written_as_escapes_is_its_character() -> None:
    t = parse_template('name: s\nsteps:\n  - id: a\n    prompt: "hi \\ud83d\\ude00"\n')
    assert t.steps[0].prompt == "hi 😀"  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ['{"a": "\\ud800"}', '["x", {"\\udfff": 1}]', '"\\ud83d x"'])
def test_json_with_a_lone_surrogate_escape_is_not_json(text: str) -> None:
    with pytest.raises(ValueError, match="surrogate"):
        parse_json_text(text)
    with pytest.raises(RenderError, match="surrogate"):
        from_json(text)
    assert parse_json_text('{"a": "\\ud83d\\ude00"}') == {"a": "😀"}


def test_a_rendered_text_with_a_lone_surrogate_fails_its_render() -> None:
    with pytest.raises(RenderError, match=r"steps.a.text.*\\ud800"):
        render_text("{{ '%c' % 55296 }}", {}, what="steps.a.text")


def test_a_value_with_a_lone_surrogate_fails_its_size_check_as_invalid_output() -> None:
    with pytest.raises(InvalidOutput, match=r"the step's output.*\\ud800"):
        check_size({"a": ["\ud800"]}, 1000, "the step's output", "max_step_output_bytes")


def test_a_lone_surrogate_escape_in_a_body_is_found() -> None:
    from orchestra.api.errors import _lone_surrogate

    assert _lone_surrogate(b'{"params": {"t": "\\ud800"}}') == ("\\ud800", 18)
    assert _lone_surrogate(b'{"t": "\\ud83d\\ude00"}') is None
    assert _lone_surrogate(b'{"t": "\\\\ud800"}') is None  # an escaped backslash, then text


# M4: positions inside quoted and plain scalars.


@pytest.mark.parametrize(
    ("prompt", "line", "column"),
    [
        ('"a\\nb\\nc\\nd\\n{{ params.q }}"', 4, 26),
        ('"a\\n\\n  {{ params.q }}"', 4, 19),
        ("'a\n\n      b\n\n\n      {{ params.q }}'", 9, 7),
        ('"a\n\n      {{ params.q }}"', 6, 7),
        ("a\n\n      {{ params.q }}", 6, 7),
        ('"x {{ params.q }}"', 4, 13),
    ],
)
def test_a_line_inside_a_flow_scalar_is_placed_on_its_own_source_line(
    prompt: str, line: int, column: int
) -> None:
    p = one(f"name: p\nsteps:\n  - id: a\n    prompt: {prompt}\n  - id: b\n    prompt: hi\n")
    assert "unknown parameter 'q'" in p.message
    assert (p.line, p.column) == (line, column)


def test_a_syntax_error_after_an_escaped_newline_is_placed_on_its_line() -> None:
    p = one('name: p\nsteps:\n  - id: a\n    kind: render\n    text: "{% if true %}\\n{{ 1 + }}"\n')
    assert (p.line, p.column) == (5, 27)


# Lows: the built-in filters take what they say; options and parameters are finite.


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: chunk([1, 2], 1, 0), "chunk takes text, got a list"),
        (lambda: chunk("abc", "2", 0), "chunk's size must be a whole number, got a str"),
        (lambda: lines(None), "lines takes text, got none"),
        (lambda: lines(["a"]), "lines takes text, got a list"),
        (lambda: choose("abc", "abc"), "choose takes a list of options, got a str"),
        (lambda: choose(None, ["a"]), "choose takes an answer that is text or a number"),
        (lambda: choose("a", []), "no options"),
    ],
)
def test_the_built_in_filters_refuse_what_they_do_not_take(call: Any, message: str) -> None:
    with pytest.raises(RenderError, match=message):
        call()


def test_the_built_in_filters_refuse_in_a_template_too() -> None:
    with pytest.raises(RenderError, match="chunk takes text, got a list"):
        render_text("{{ [1,2]|chunk(1,0) }}", {}, what="t")
    assert render_text("{{ 'yes'|choose(['yes', 'no']) }}", {}, what="t") == "yes"
    assert render_text("{{ 'b'|choose(['A', 'B']|map('lower')) }}", {}, what="t") == "b"


@pytest.mark.parametrize("options", ["{temperature: .nan}", "{top_p: .inf}", "{custom: [1, .nan]}"])
def test_an_option_that_is_not_finite_is_refused_at_its_key(options: str) -> None:
    p = one(f"name: o\nsteps:\n  - id: a\n    prompt: hi\n    options: {options}\n")
    assert p.path.startswith("steps[0].options.")
    assert ".inf or .nan" in p.message


def test_an_integer_no_double_holds_is_refused_for_a_number_parameter() -> None:
    t = parse_template("name: n\nparameters:\n  n: {type: number}\n" + STEPS)
    with pytest.raises(InvalidParams) as info:
        validate_params(t, {"n": 10**400})
    [problem] = info.value.fields
    assert problem.field == "params.n"
    assert "401 digits" in problem.message
    assert validate_params(t, {"n": 10**300}) == {"n": 10**300}


def test_jinja_still_raises_its_own_syntax_errors() -> None:
    with pytest.raises(jinja2.TemplateSyntaxError):
        environment().from_string("{{ 1 + }}")


def test_tojson_gives_a_model_the_json_as_written() -> None:
    """Jinja's ``tojson`` is made for HTML pages: it wrote ``Don\\u0027t \\u003cb\\u003e`` and
    ``caf\\u00e9`` into prompts, and sorted a schema's keys out of the author's order."""
    value = {"z": "Don't <b>bold</b> & café 😀", "a": ["thé", 1]}
    assert render_text("{{ v | tojson }}", {"v": value}, what="t") == (
        '{"z": "Don\'t <b>bold</b> & café 😀", "a": ["thé", 1]}'
    )
    assert render_text("{{ v | tojson(2) }}", {"v": {"a": 1}}, what="t") == '{\n  "a": 1\n}'
    assert render_text("{{ v | tojson(indent=1) }}", {"v": [1]}, what="t") == "[\n 1\n]"
    with pytest.raises(RenderError, match="indent must be a whole number from 0 to 16"):
        render_text("{{ v | tojson(10**6) }}", {"v": [[1]] * 50}, what="t")
