"""The quick check of parameters says valid only where the JSON Schema validator finds
nothing, so validate_params answers (and words its problems) exactly as before."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestra.templating import parse_template
from orchestra.templating.fast_params import quick_check
from orchestra.templating.model import Parameter, Template
from orchestra.templating.params import _validator

SCALARS = parse_template(
    """\
name: scalars
parameters:
  text: {type: string, required: true, min_length: 1, max_length: 5}
  n: {type: integer, default: 3, minimum: 1, maximum: 10}
  style: {type: string, enum: [a, b], default: a}
  ratio: {type: number, minimum: 0.5}
  flag: {type: boolean}
steps:
  - id: s
    prompt: hi
"""
)


def test_a_template_of_bounded_scalars_has_a_quick_check() -> None:
    check = quick_check(SCALARS)
    assert check is not None and quick_check(SCALARS) is check  # compiled once
    assert check({"text": "hi", "n": 3, "style": "b", "ratio": 0.5, "flag": False})
    assert check({"text": "x", "n": 1}) and check({"text": "fivee", "n": 10})  # the bounds
    for bad in (
        {"n": 3},  # text is required
        {"text": ""},  # too short
        {"text": "sixsix"},  # one over max_length
        {"text": "x", "n": True},  # a bool is not an integer
        {"text": "x", "n": 0},  # one under the minimum
        {"text": "x", "n": 11},
        {"text": "x", "n": 3.0},  # an integer to JSON Schema: not sure, so the full check
        {"text": "x", "style": "c"},
        {"text": "x", "ratio": 0.4},
        {"text": "x", "flag": 1},
        {"text": "x", "colour": "red"},  # unknown
    ):
        assert not check(bad), bad


def test_parameters_it_does_not_cover_leave_the_template_to_the_full_check() -> None:
    for spec in (
        "{type: string, pattern: '^a$'}",
        "{type: array, items: {type: string}}",
        "{type: object}",
        "{type: integer, enum: [1, 2]}",
    ):
        template = parse_template(
            f"name: t\nparameters:\n  p: {spec}\nsteps:\n  - id: s\n    prompt: hi\n"
        )
        assert quick_check(template) is None, spec


# Small sets, so that values fall on and beside the bounds often.
TYPED = {
    "string": st.sampled_from(["", "a", "b", "ab", "abc", "c"]),
    "integer": st.integers(-1, 3),
    "number": st.one_of(st.integers(-1, 3), st.sampled_from([0.5, 1.0, 1.5, 2.0, -0.5])),
    "boolean": st.booleans(),
}
JSON_SCALARS = st.one_of(st.none(), *TYPED.values())
BOUND = st.sampled_from([None, None, 0, 1, 2, 1.5])
LENGTH = st.sampled_from([None, None, 0, 1, 2])


@st.composite
def parameters(draw: st.DrawFn) -> Parameter:
    kind = draw(st.sampled_from(["string", "integer", "number", "boolean"]))
    enum = draw(st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", ""]), min_size=1)))
    return Parameter(
        name=draw(st.sampled_from(["p", "q", "r"])),
        type=kind,  # type: ignore[arg-type]
        required=draw(st.booleans()),
        enum=enum if kind == "string" else None,
        minimum=draw(BOUND),
        maximum=draw(BOUND),
        min_length=draw(LENGTH),
        max_length=draw(LENGTH),
    )


def template_of(params: list[Parameter]) -> Template:
    base = parse_template("name: t\nsteps:\n  - id: s\n    prompt: hi\n")
    return msgspec.structs.replace(base, parameters={p.name: p for p in params})


# 800 examples took 23 s under load: room past the 60 s default. No example database: it
# would be written into the source tree (.hypothesis/).
@pytest.mark.timeout(180)
@settings(max_examples=800, deadline=None, database=None)
@given(st.lists(parameters(), max_size=3, unique_by=lambda p: p.name), st.data())
def test_a_quick_yes_is_always_the_json_schemas_yes(
    params: list[Parameter], data: st.DataObject
) -> None:
    template = template_of(params)
    check = quick_check(template)
    assert check is not None
    values: dict[str, Any] = {}
    for p in params:  # mostly given, at times left out
        if data.draw(st.sampled_from([True, True, True, False])):
            # Mostly of the parameter's type, at times of any.
            values[p.name] = data.draw(st.one_of(TYPED[p.type], TYPED[p.type], JSON_SCALARS))
    if data.draw(st.sampled_from([False, False, False, True])):
        values["s"] = data.draw(JSON_SCALARS)  # never a parameter
    errors = list(_validator(template).iter_errors(values))
    if check(values):
        assert errors == [], (params, values)
