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


NESTED = parse_template(
    """\
name: nested
parameters:
  people:
    type: array
    items:
      type: object
      properties: {name: {type: string}}
      required: [name]
      additionalProperties: false
  fields: {type: array, items: {type: object}, unique_items: true, max_length: 50}
  words: {type: array, items: {type: string}}
steps:
  - id: s
    prompt: hi
"""
)


def problems(params: dict[str, object]) -> dict[str, str]:
    with pytest.raises(InvalidParams) as info:
        validate_params(NESTED, params)
    return {f.field: f.message for f in info.value.fields}


def test_a_problem_inside_an_array_item_is_named_at_that_item() -> None:
    """A missing or unknown key of an item was named as if it were a parameter:
    ``params.name: is required`` for the second person."""
    assert problems({"people": [{"name": "x"}, {}]}) == {"params.people[1].name": "is required"}
    found = problems({"people": [{"name": "x", "extra": 1}]})
    assert list(found) == ["params.people[0].extra"], found
    assert (
        "unknown" in found["params.people[0].extra"] and "name" in found["params.people[0].extra"]
    )


def test_unique_items_takes_time_in_proportion_to_the_items() -> None:
    """jsonschema compares every pair of objects: 4,000 held the event loop 12 s."""
    import time

    items = [{"a": i, "b": [i, {"c": str(i)}]} for i in range(20_000)]
    # CPU time, not the clock's: a loaded run (other processes on the cores) took 2.2 s.
    began = time.process_time()
    found = problems({"fields": items})
    assert time.process_time() - began < 2.0
    assert found == {"params.fields": "has 20000 items; the template allows at most 50"}
    twice = problems({"fields": [{"a": 1}, {"a": 2}, {"a": 1.0}]})
    assert twice == {"params.fields": "has non-unique elements (items 0 and 2 are equal)"}
    # JSON Schema's equality: true is not 1, key order does not count.
    validate_params(NESTED, {"fields": [{"a": True}, {"a": 1}, {"a": [1, False]}, {"a": [1, 0]}]})
    same = problems({"fields": [{"a": 1, "b": 2}, {"b": 2, "a": 1}]})
    assert same == {"params.fields": "has non-unique elements (items 0 and 1 are equal)"}


def test_a_flood_of_bad_items_is_answered_with_the_first_problems_quickly() -> None:
    """300,000 bad items made a 21 MB answer, one problem each."""
    import time

    began = time.process_time()
    with pytest.raises(InvalidParams) as info:
        validate_params(NESTED, {"words": [0] * 300_000})
    assert time.process_time() - began < 2.0
    assert len(info.value.fields) == 100
    assert "the first 100" in info.value.message, info.value.message
    # One error for many keys: 110,000 unknown parameters made a 13 MB answer.
    with pytest.raises(InvalidParams) as info:
        validate_params(NESTED, {f"{i:x}": 0 for i in range(110_000)})
    assert len(info.value.fields) == 100 and "the first 100" in info.value.message
    # Exactly 100 is not "more than 100".
    with pytest.raises(InvalidParams) as info:
        validate_params(NESTED, {"words": [0] * 100})
    assert len(info.value.fields) == 100 and info.value.message.startswith("100 invalid")
