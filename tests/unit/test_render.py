from __future__ import annotations

import pytest

from orchestra.errors import RenderError
from orchestra.templating.render import (
    choose,
    evaluate,
    from_json,
    lines,
    parse_json_text,
    render_output,
    render_text,
)


def test_single_expression_output_keeps_its_value() -> None:
    scope = {"steps": {"a": {"output": [1, 2]}}, "params": {}}
    assert render_output("{{ steps.a.output }}", scope) == [1, 2]
    assert render_output(" {{ steps.a.output | length }} ", scope) == 2
    assert render_output("n={{ steps.a.output | length }}", scope) == "n=2"
    assert render_output({"x": "{{ steps.a.output[0] }}"}, scope) == {"x": 1}


def test_undefined_names_fail_loudly() -> None:
    with pytest.raises(RenderError, match="undefined value") as caught:
        render_text("{{ params.missing }}", {"params": {}}, what="steps.a.prompt")
    # An optional parameter left out, with no default: said so, with what to write instead.
    assert "if missing is a parameter" in str(caught.value)
    assert "params.missing | default('')" in str(caught.value)
    with pytest.raises(RenderError, match="undefined value"):
        render_output("{{ steps.nope.output }}", {"steps": {}})


def test_a_key_missing_from_a_steps_output_gets_no_hint_about_parameters() -> None:
    """``steps.a.output.age`` on a parsed answer without ``age`` said "if age is a parameter":
    the hint named the wrong thing; it is for a key missing from ``params`` alone."""
    scope = {"steps": {"a": {"output": {"name": "Ann"}}}, "params": {"x": 1}}
    for fail in (
        lambda: render_text("{{ steps.a.output.age }}", scope, what="steps.b.prompt"),
        lambda: render_output("{{ steps.a.output.age }}", scope),
        lambda: evaluate("steps.a.output.age > 3", scope, what="steps.b.when"),
    ):
        with pytest.raises(RenderError, match="has no attribute 'age'") as caught:
            fail()
        assert "parameter" not in str(caught.value), caught.value
        assert "params.age" not in str(caught.value), caught.value
    for fail in (
        lambda: render_text("{{ params.age }}", scope, what="steps.b.prompt"),
        lambda: render_output("{{ params.age }}", scope),
        lambda: evaluate("params.age > 3", scope, what="steps.b.when"),
    ):
        with pytest.raises(RenderError, match="if age is a parameter") as caught:
            fail()
        assert "params.age | default('')" in str(caught.value)


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(RenderError, match="SecurityError|unsafe|undefined"):
        render_text("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}, what="prompt")


def test_choose_maps_free_text_to_a_label() -> None:
    labels = ["billing", "bug", "feature request"]
    assert choose("Bug", labels) == "bug"
    assert choose("  billing. ", labels) == "billing"
    assert choose("I think this is a feature request.", labels) == "feature request"
    assert choose("bug, or maybe billing", labels) == "bug"
    with pytest.raises(RenderError, match="none of: billing, bug, feature request"):
        choose("no idea", labels)


def test_from_json_tolerates_fences_and_chatter() -> None:
    assert from_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert from_json('Sure! Here it is: {"a": [1, 2]} Hope that helps.') == {"a": [1, 2]}
    with pytest.raises(RenderError, match="not JSON"):
        from_json("no json here")


def test_lines_drops_bullets_and_numbers() -> None:
    assert lines("- one\n* two\n\n3. three\n4) four") == ["one", "two", "three", "four"]


def test_mapping_keys_win_over_dict_methods() -> None:
    scope = {"params": {"items": [1, 2], "keys": "k"}}
    assert render_output("{{ params.items }}", scope) == [1, 2]
    assert render_text("{{ params.keys }}", scope, what="t") == "k"
    assert render_output("{{ params.get('items') }}", scope) == [1, 2]  # methods still work


def test_a_missing_key_named_as_a_dict_method_is_undefined_not_the_method() -> None:
    """An optional ``items`` left out rendered "<built-in method items of dict…>": the
    documented ``| default`` and ``is defined`` did not see it was missing."""
    scope = {"params": {"text": "t"}, "steps": {"j": {"output": {"a": 1}}}}
    got = render_text(
        "{{ params.items | default('(none)') }}/{{ 'yes' if params.copy is defined else 'no' }}",
        scope,
        what="t",
    )
    assert got == "(none)/no"
    with pytest.raises(RenderError, match="undefined value"):
        render_text("{{ params.values }}", scope, what="t")
    with pytest.raises(RenderError, match="undefined value"):
        render_output("{{ steps.j.output.keys }}", scope)
    # Nor through a subscript, or map(attribute=…) (review).
    assert render_text("{{ params['items'] | default('D') }}", scope, what="t") == "D"
    assert render_text("{{ params['items'] is defined }}", scope, what="t") == "False"
    with pytest.raises(RenderError, match="undefined value"):
        render_output("{{ [params] | map(attribute='items') | list }}", scope)
    # Called, it is the mapping's method still: a loop over a mapping's items works.
    assert render_output("{{ params.items() | list }}", scope) == [["text", "t"]]
    assert (
        render_text("{% for k in steps.j.output.keys() %}{{ k }}{% endfor %}", scope, what="t")
        == "a"
    )


def test_tojson_of_a_lazy_sequence_is_its_list() -> None:
    """``map(attribute='name') | tojson``, what a prompt writes to hand a model names, failed:
    "Object of type generator is not JSON serializable" (range and dict views too)."""
    scope = {"steps": {"a": {"output": [{"name": "x"}, {"name": "é"}]}}}
    assert (
        render_text("{{ steps.a.output | map(attribute='name') | tojson }}", scope, what="t")
        == '["x", "é"]'
    )
    assert render_text("{{ range(3) | tojson }}", scope, what="t") == "[0, 1, 2]"
    assert render_text("{{ {'a': 1}.keys() | tojson }}", scope, what="t") == '["a"]'
    # Its size is checked as a list's is (review: 2.4 MB went past the 1 MB cap).
    with pytest.raises(RenderError, match="tojson's text would be over"):
        render_text(
            "{{ range(100000) | map('string') | map('center', 20) | tojson }}", scope, what="t"
        )


@pytest.mark.parametrize(
    "expression",
    [
        "steps.a.output | map(attribute='nmae') | list",
        "steps.a.output | map(attribute='nmae') | tojson",
        "[params.nothing]",
    ],
)
def test_a_missing_name_inside_a_list_fails_as_any_missing_name(expression: str) -> None:
    """A misspelt attribute in ``map`` rendered "[Undefined, Undefined]" in text, and as an
    output failed as "the value is a function (StrictUndefined)"."""
    scope = {"params": {}, "steps": {"a": {"output": [{"name": "x"}, {"name": "y"}]}}}
    with pytest.raises(RenderError, match="undefined value"):
        render_text("{{ " + expression + " }}", scope, what="t")
    with pytest.raises(RenderError, match="undefined value"):
        render_output("{{ " + expression + " }}", scope)


def test_choose_prefers_the_earliest_then_the_longest_label_and_returns_it_as_given() -> None:
    assert choose("C++ is the language", ["C", "C++"]) == "C++"
    assert choose("It is a bug report.", ["bug", "bug report"]) == "bug report"
    assert choose("a bug, then a bug report", ["bug report", "bug"]) == "bug"
    assert choose(5, [5, 6]) == 5
    assert choose("I pick 6", [5, 6]) == 6


@pytest.mark.parametrize(
    "output",
    [
        "{{ steps.p.output | map(attribute='name') }}",
        "{{ range(3) }}",
        "{{ [1, 2, 1] | unique }}",
        "{{ {'a': range(2)} }}",
    ],
)
def test_an_iterator_output_becomes_a_list(output: str) -> None:
    scope = {"params": {}, "steps": {"p": {"output": [{"name": 0}, {"name": 1}, {"name": 2}]}}}
    value = render_output(output, scope)
    assert value in ([0, 1, 2], [1, 2], {"a": [0, 1]})


@pytest.mark.parametrize("output", ["{{ cycler(1, 2) }}", "{{ namespace(a=1) }}", "{{ lipsum }}"])
def test_an_output_that_is_not_data_fails_naming_the_output(output: str) -> None:
    with pytest.raises(RenderError, match="cannot render output: .* is not JSON data"):
        render_output(output, {"params": {}, "steps": {}})


def test_an_evaluated_input_that_is_an_iterator_becomes_a_list() -> None:
    assert evaluate("range(3)", {}, what="steps.a.input") == [0, 1, 2]


def test_json_nested_too_deeply_is_not_json() -> None:
    with pytest.raises(ValueError, match="deep"):
        parse_json_text("[" * 5000 + "]" * 5000)


@pytest.mark.parametrize("text", ["NaN", '{"a": Infinity}', "[-Infinity]", '{"a": 1e400}'])
def test_non_finite_numbers_are_not_json(text: str) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_json_text(text)


def test_from_json_finds_the_json_among_words_and_any_fence() -> None:
    assert from_json('The answer [see below] is {"a": 1}') == {"a": 1}
    assert from_json('```python\n{"a": 1}\n```') == {"a": 1}
    assert from_json("```\n[1]\n```") == [1]
    assert from_json('{"a": 1} I hope {that} helps') == {"a": 1}
    with pytest.raises(RenderError, match="more than one JSON value"):
        from_json('{"a":1}{"b":2}')


def test_from_json_prefers_a_bracketed_value_to_a_leading_number() -> None:
    assert from_json('3 items: ["a", "b", "c"]') == ["a", "b", "c"]
    assert from_json("[ see below ] then [1]") == [1]
    assert from_json(" 42 ") == 42
    assert from_json('"a [quoted] string"') == "a [quoted] string"
    with pytest.raises(RenderError, match="not JSON"):
        from_json('{"a": oops, "b": {"c": 1}}')  # not the object inside the broken one


def test_a_failing_field_of_an_output_mapping_is_named() -> None:
    scope = {"params": {}, "steps": {"m": {"output": "text"}}}
    spec = {"first": "{{ steps.m.output }}", "bad": "{{ steps.m.output.nope }}"}
    with pytest.raises(RenderError, match=r"^cannot render output\.bad: "):
        render_output(spec, scope)


def test_with_a_schema_the_first_value_that_fits_it_is_the_answer() -> None:
    """ "Note [1]: the answer is {"a": 4}" failed an object schema with "[1] is not of type
    'object'": the search stopped at the citation, though words around the JSON are fine."""
    is_object = lambda value: isinstance(value, dict)  # noqa: E731
    assert parse_json_text('Note [1]: the answer is {"a": 4} ok', fits=is_object) == {"a": 4}
    # Without a schema, the first value is still the answer.
    assert parse_json_text('Note [1]: the answer is {"a": 4} ok') == [1]
    # Nothing fits: the first value, for the schema's check to say why.
    assert parse_json_text("[1] and [2]", fits=is_object) == [1]
    # Citations side by side, or straight before the object (review: "more than one value").
    assert parse_json_text('Sources [1][2]: {"a": 1}', fits=is_object) == {"a": 1}
    assert parse_json_text('See [1] {"a": 1}', fits=is_object) == {"a": 1}
    with pytest.raises(ValueError, match="more than one JSON value"):
        parse_json_text('See [1] {"a": 1}')  # without a schema, which one is ambiguous
    # A value inside one that does not fit is not taken for the answer.
    assert parse_json_text('[{"a": 1}] and more', fits=is_object) == [{"a": 1}]
