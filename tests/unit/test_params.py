from __future__ import annotations

import pytest

from orchestra.errors import InvalidParams
from orchestra.templating import parse_template
from orchestra.templating.params import validate_params

TEMPLATE = parse_template(
    """\
name: p
parameters:
  text: {type: string, required: true, max_length: 5}
  n: {type: integer, default: 3, minimum: 1, maximum: 10}
  style: {type: string, enum: [a, b], default: a}
  tags: {type: array, items: {type: string}, max_length: 2}
  ratio: {type: number}
  flag: {type: boolean}
  extra: {type: object}
  code: {type: string, pattern: "^[A-Z]{3}$"}
steps:
  - id: s
    prompt: hi
"""
)


def test_defaults_are_filled_in() -> None:
    assert validate_params(TEMPLATE, {"text": "hi"}) == {"text": "hi", "n": 3, "style": "a"}


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(InvalidParams) as info:
        validate_params(
            TEMPLATE,
            {
                "n": "3",
                "style": "c",
                "tags": ["x", 1, "z"],
                "ratio": True,
                "flag": "yes",
                "extra": [],
                "code": "abc",
                "colour": "red",
            },
        )
    fields = {f.field: f.message for f in info.value.fields}
    assert fields["params.text"] == "is required"
    assert "not of type 'integer'" in fields["params.n"]
    assert "is not one of" in fields["params.style"]
    assert "params.tags" in fields  # too long
    assert "not of type 'string'" in fields["params.tags[1]"]
    assert "not of type 'number'" in fields["params.ratio"]
    assert "not of type 'boolean'" in fields["params.flag"]
    assert "not of type 'object'" in fields["params.extra"]
    assert "does not match" in fields["params.code"]
    assert fields["params.colour"].startswith("unknown parameter")
    assert len(info.value.fields) == 10


def test_limits() -> None:
    with pytest.raises(InvalidParams) as info:
        validate_params(TEMPLATE, {"text": "too long", "n": 11})
    fields = {f.field for f in info.value.fields}
    assert fields == {"params.text", "params.n"}


@pytest.mark.parametrize(
    ("value", "said"), [(None, "null is not of type 'string'"), (True, "true is not of type")]
)
def test_a_wrong_type_names_the_value_as_json_wrote_it(value: object, said: str) -> None:
    """ "None is not of type 'string'" spoke Python to a JSON API."""
    with pytest.raises(InvalidParams) as info:
        validate_params(TEMPLATE, {"text": value})
    assert info.value.fields[0].message.startswith(said), info.value.fields


def test_an_integer_bound_is_named_as_an_integer() -> None:
    with pytest.raises(InvalidParams) as info:
        validate_params(TEMPLATE, {"text": "hi", "n": 99})
    [problem] = info.value.fields
    assert problem.message == "99 is greater than the maximum of 10"
