"""The run form: controls built from a template's parameters, and typed values read back."""

from __future__ import annotations

import math
from typing import Any

import pytest

from orchestra.errors import FieldProblem, InvalidParams
from orchestra.templating import parse_template
from orchestra.templating.params import validate_params
from orchestra.web.forms import Field, field_of, fields, params_from_form

TEMPLATE = parse_template(
    """\
name: form
parameters:
  text: {type: string, required: true, description: The text.}
  note: {type: string, max_length: 40, default: none}
  flag: {type: boolean}
  on_by_default: {type: boolean, default: true}
  level: {type: integer, enum: [1, 2, 3]}
  strict: {type: boolean, enum: [true, false], required: true}
  style: {type: string, enum: [short, long], default: short}
  count: {type: integer, minimum: 1, maximum: 10}
  ratio: {type: number, minimum: 0, maximum: 10}
  scores: {type: array, items: {type: number}}
  words: {type: array, items: {type: string}}
  points: {type: array, items: {type: object}}
  extra: {type: object}
steps:
  - id: s
    kind: render
    text: '{{ params.text }}'
"""
)
SCHEMA = TEMPLATE.params_schema()


def _read(**form: str | list[str]) -> dict[str, Any]:
    """The parameters a form gives, each value as a browser sends it (a list per name)."""
    return _read_all(**form)[0]


def _read_all(**form: str | list[str]) -> tuple[dict[str, Any], list[FieldProblem]]:
    """The parameters a form gives and the JSON fields that do not parse."""
    return params_from_form(SCHEMA, {k: v if isinstance(v, list) else [v] for k, v in form.items()})


def _by_name(made: list[Field]) -> dict[str, Field]:
    return {f.name: f for f in made}


# -- the controls ---------------------------------------------------------------------------


def test_each_parameter_gets_the_control_its_type_calls_for() -> None:
    controls = {f.name: f.control for f in fields(SCHEMA)}
    assert controls == {
        "text": "textarea",
        "note": "text",
        "flag": "checkbox",
        "on_by_default": "checkbox",
        "level": "select",
        "strict": "select",
        "style": "select",
        "count": "number",
        "ratio": "number",
        "scores": "lines",
        "words": "lines",
        "points": "lines",
        "extra": "json",
    }


def test_required_parameters_are_marked_and_optional_ones_are_not() -> None:
    made = _by_name(fields(SCHEMA))
    assert {name for name, f in made.items() if f.required} == {"text", "strict"}
    assert made["text"].description == "The text."


def test_an_empty_form_shows_the_defaults() -> None:
    made = _by_name(fields(SCHEMA))
    assert made["note"].value == "none"
    assert made["on_by_default"].checked and not made["flag"].checked
    assert made["style"].value == '"short"'
    assert made["count"].value == "" and made["count"].step == "1"
    assert (made["ratio"].minimum, made["ratio"].maximum, made["ratio"].step) == (0, 10, "any")


def test_enum_options_carry_their_values_as_json_and_optional_ones_may_be_left_empty() -> None:
    made = _by_name(fields(SCHEMA))
    assert made["level"].options == [("", "—"), ("1", "1"), ("2", "2"), ("3", "3")]
    assert made["strict"].options == [("true", "true"), ("false", "false")]  # required: no blank
    assert made["style"].options == [("", "—"), ('"short"', "short"), ('"long"', "long")]


def test_values_fill_their_controls() -> None:
    values = {
        "text": "  spaced  ",
        "flag": True,
        "level": 2,
        "strict": False,
        "scores": [1.5, 2],
        "words": ["a b", "c"],
        "points": [{"x": 1}],
        "extra": {"k": "v"},
    }
    made = _by_name(fields(SCHEMA, values))
    assert made["text"].value == "  spaced  "
    assert made["flag"].checked
    assert made["level"].value == "2" and made["strict"].value == "false"
    assert made["scores"].value == "1.5\n2"
    assert made["words"].value == "a b\nc"
    assert made["points"].value == '{"x": 1}'
    assert made["extra"].value == '{\n  "k": "v"\n}'


def test_problems_go_beside_the_field_their_path_names() -> None:
    assert field_of("params.items[2]") == "items"
    assert field_of("params.extra.k") == "extra"
    assert field_of("params.text") == "text"
    assert field_of("priority") == "priority"
    problems = [
        FieldProblem("params.scores[1]", "is not of type 'number'"),
        FieldProblem("params.scores", "is too long"),
        FieldProblem("params.text", "is required"),
    ]
    made = _by_name(fields(SCHEMA, {}, problems))
    # Where inside the field, as the API names it (which item, which key).
    assert made["scores"].errors == ["[1]: is not of type 'number'", "is too long"]
    assert made["text"].errors == ["is required"]
    assert made["ratio"].errors == []


# -- the answers ----------------------------------------------------------------------------


def test_a_checked_box_is_true_and_an_unchecked_one_false() -> None:
    assert _read(flag="true")["flag"] is True
    answers = _read()  # an unchecked box sends nothing
    assert answers["flag"] is False and answers["on_by_default"] is False


def test_enums_give_back_their_typed_values() -> None:
    answers = _read(level="2", strict="false", style='"long"')
    assert answers["level"] == 2
    assert answers["strict"] is False
    assert answers["style"] == "long"


def test_an_enum_answer_that_is_not_json_is_passed_on_as_typed() -> None:
    assert _read(style="long")["style"] == "long"


def test_empty_optional_fields_are_left_out_so_their_defaults_apply() -> None:
    answers = _read(text="hi", strict="true", note="", count=" ", scores="\n", extra="", level="")
    assert answers == {"text": "hi", "strict": True, "flag": False, "on_by_default": False}
    full = validate_params(TEMPLATE, answers)
    assert full["note"] == "none" and full["style"] == "short"


def test_strings_are_kept_as_typed_spaces_and_all() -> None:
    assert _read(text="  two  spaces  ")["text"] == "  two  spaces  "
    assert _read(text="   ")["text"] == "   "


@pytest.mark.parametrize(
    ("typed", "read"),
    [("3", 3), ("3.0", 3), (" 7 ", 7), ("1e1", 10), ("3.5", 3.5), ("three", "three")],
)
def test_integers_are_read_as_whole_numbers_where_they_are_whole(typed: str, read: Any) -> None:
    answer = _read(count=typed)["count"]
    assert answer == read and type(answer) is type(read)


@pytest.mark.parametrize(
    ("typed", "read"), [("2.5", 2.5), ("4", 4.0), ("-0.5", -0.5), ("ten", "ten")]
)
def test_numbers_are_read_as_numbers(typed: str, read: Any) -> None:
    assert _read(ratio=typed)["ratio"] == read


@pytest.mark.parametrize("typed", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400"])
@pytest.mark.parametrize("name", ["count", "ratio"])
def test_nan_and_infinity_stay_text_for_validation_to_name(name: str, typed: str) -> None:
    assert _read(**{name: typed})[name] == typed


@pytest.mark.parametrize("typed", ["nan", "inf", "-Infinity"])
def test_nan_and_infinity_in_a_list_of_numbers_stay_text(typed: str) -> None:
    assert _read(scores=f"1\n{typed}\n2.5")["scores"] == [1, typed, 2.5]


def test_nan_from_the_form_is_refused_beside_its_field() -> None:
    answers = _read(text="hi", strict="true", ratio="nan")
    with pytest.raises(InvalidParams) as info:
        validate_params(TEMPLATE, answers)
    assert [f.field for f in info.value.fields] == ["params.ratio"]
    assert "number" in info.value.fields[0].message


def test_arrays_are_read_one_item_per_line() -> None:
    answers = _read(
        scores="1\n 2.5 \n\nx",
        words="  first word \nsecond\n\n",
        points='{"x": 1}\n{"x": 2}\nnot json',
    )
    assert answers["scores"] == [1.0, 2.5, "x"]
    assert answers["words"] == ["first word", "second"]
    assert answers["points"] == [{"x": 1}, {"x": 2}, "not json"]


def test_objects_are_read_as_json_or_passed_on_as_typed() -> None:
    assert _read(extra='{"k": [1, 2]}')["extra"] == {"k": [1, 2]}
    params, unreadable = _read_all(extra="{not json")
    assert params["extra"] == "{not json"  # kept as typed, shown so
    assert unreadable == [
        FieldProblem(
            "params.extra",
            "not valid JSON: Expecting property name enclosed in double quotes (line 1 column 2)",
        )
    ]
    assert _read_all(extra="[1]")[1] == []  # JSON, of the wrong type: validation says so
    with pytest.raises(InvalidParams) as info:
        validate_params(TEMPLATE, _read(text="hi", strict="true", extra="{not json"))
    assert [f.field for f in info.value.fields] == ["params.extra"]


def test_the_last_of_repeated_values_counts() -> None:
    assert _read(text=["first", "second"])["text"] == "second"


def test_fields_not_in_the_template_are_ignored() -> None:
    assert "opt.model" not in _read(**{"text": "hi", "opt.model": "x"})


# -- non-finite numbers, whoever sends them ------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_validation_refuses_non_finite_numbers_wherever_they_are(bad: float) -> None:
    params = {
        "text": "hi",
        "strict": True,
        "ratio": bad,
        "scores": [1.0, bad],
        "extra": {"deep": [{"x": bad}]},
    }
    with pytest.raises(InvalidParams) as info:
        validate_params(TEMPLATE, params)
    problems = {f.field: f.message for f in info.value.fields}
    assert set(problems) == {"params.ratio", "params.scores[1]", "params.extra.deep[0].x"}
    assert all("finite" in message for message in problems.values())


def test_finite_numbers_at_their_bounds_pass() -> None:
    full = validate_params(TEMPLATE, {"text": "hi", "strict": True, "ratio": 10.0, "count": 1})
    assert full["ratio"] == 10.0
