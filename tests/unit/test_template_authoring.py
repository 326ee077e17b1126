"""What a template author meets: checks that were missing, found by writing templates from
docs/templates.md (helper-121)."""

from __future__ import annotations

import pytest

from orchestra.errors import TemplateError
from orchestra.templating.loader import load_template, parse_template
from orchestra.templating.registry import builtin_names


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(TemplateError) as caught:
        parse_template(text, "t.yaml")
    return [(p.line, p.path, p.message) for p in caught.value.problems]


def test_a_template_name_is_at_most_100_characters() -> None:
    body = "name: {}\nsteps:\n  - {{id: a, kind: render, text: hi}}\n"
    assert parse_template(body.format("a" * 100), "t.yaml").name == "a" * 100
    [(line, path, message)] = problems(body.format("a" * 300))
    assert (line, path) == (1, "name")
    assert message.endswith("may hold only a-z, 0-9, _ and -, up to 100 of them")
    assert len(message) < 200  # the name is not quoted whole


def test_a_map_s_inner_step_id_follows_the_rule_of_step_ids() -> None:
    body = (
        "name: m\nsteps:\n  - id: each\n    kind: map\n    over: '[1, 2]'\n"
        "    step: {{id: {}, kind: render, text: '{{{{ item }}}}'}}\n"
    )
    assert parse_template(body.format("part"), "t.yaml").steps[0].step.id == "part"  # type: ignore[attr-defined]
    [(line, path, message)] = problems(body.format("'bad id'"))
    assert (line, path) == (6, "steps[0].step.id")
    assert message.startswith("step id 'bad id' ")
    [(_, path, message)] = problems(body.format("''"))  # it became "item" (review)
    assert path == "steps[0].step.id" and message.startswith("step id '' ")


def test_each_built_in_file_is_named_after_its_template() -> None:
    """``builtin_names`` reads the names from the files' names, without parsing them."""
    names = builtin_names()
    assert len(names) == 16
    for name, file in names.items():
        assert load_template(file).name == name


def test_every_parameter_key_of_the_wrong_type_is_reported_in_words() -> None:
    """Only the first was, in msgspec's words ("expected int | float | null, got str")."""
    found = problems(
        "name: x\nparameters:\n  b: {type: integer, minimum: '1', required: maybe}\n"
        "steps:\n  - {id: a, kind: render, text: hi}\n"
    )
    assert [(path, message) for _, path, message in found] == [
        ("parameters.b.minimum", "minimum must be a number, got a string"),
        ("parameters.b.required", "required must be true or false, got a string"),
    ]


def test_a_step_whose_id_is_wrong_is_checked_whole() -> None:
    found = problems("name: x\nsteps:\n  - {id: 5, prompt: hi, when: 1, timeout: 0}\n")
    assert [path for _, path, _ in found] == ["steps[0].id", "steps[0].when", "steps[0].timeout"]


def test_unique_items_applies_to_arrays_and_is_published() -> None:
    body = (
        "name: x\nparameters:\n  f: {{type: {}, unique_items: true}}\n"
        "steps:\n  - {{id: a, kind: render, text: hi}}\n"
    )
    template = parse_template(body.format("array"), "t.yaml")
    assert template.params_schema()["properties"]["f"]["uniqueItems"] is True
    [(_, path, message)] = problems(body.format("string"))
    assert (path, message) == (
        "parameters.f.unique_items",
        "unique_items does not apply to a parameter of type string",
    )


@pytest.mark.parametrize(
    ("text", "path", "says"),
    [
        # YAML reads an unquoted true as a boolean: "parameters[True]: parameter name True …"
        (
            "name: x\nparameters:\n  true: {type: string}\nsteps:\n  - {id: a, prompt: hi}\n",
            "parameters[True]",
            "parameter name true is read by YAML as a boolean; quote it",
        ),
        # 1 == True: a lookup by value called the name 1 "true" (review).
        (
            "name: x\nparameters:\n  1: {type: string}\nsteps:\n  - {id: a, prompt: hi}\n",
            "parameters[1]",
            "parameter name 1 is read by YAML as an integer; quote it",
        ),
        ("name: x\nsteps:\n  - id: a\n    text:\thi\n", "", "(YAML takes spaces there, not tabs)"),
        # An empty model was taken as none, where a task's "model": "" is refused.
        (
            'name: x\nmodel: ""\nsteps:\n  - {id: a, prompt: hi}\n',
            "model",
            "model must not be empty (leave it out for the default)",
        ),
        (
            'name: x\nsteps:\n  - {id: a, prompt: hi, model: ""}\n',
            "steps[0].model",
            "model must not be empty",
        ),
    ],
)
def test_what_yaml_or_an_empty_value_makes_of_a_template_is_said(
    text: str, path: str, says: str
) -> None:
    [(_, found, message)] = problems(text)
    assert found == path and says in message, message


@pytest.mark.parametrize(("char", "code"), [("\x00", "U+0000"), ("\x07", "U+0007")])
def test_a_control_character_yaml_refuses_is_placed_at_its_line_and_column(
    char: str, code: str
) -> None:
    """It was placed at 1:1, with a position in characters."""
    text = f"name: x\nsteps:\n  - id: a\n    prompt: hi{char}there\n"
    with pytest.raises(TemplateError) as raised:
        parse_template(text, "t.yaml")
    [problem] = raised.value.problems
    assert (problem.line, problem.column) == (4, 15), problem
    assert f"the character {code} is not allowed in YAML" in problem.message, problem


def test_an_integer_parameter_s_numbers_written_as_floats_are_whole() -> None:
    """YAML reads 1e3 and 10.0 as floats: the default reached the template as 1000.0 and
    ``range(params.n)`` failed; the schema published ``maximum: 10000.0``."""
    template = parse_template(
        "name: x\nparameters:\n  n: {type: integer, default: 1e3, minimum: 1.0, "
        "maximum: 10000.0, enum: [1000.0, 5]}\n"
        "steps:\n  - {id: a, kind: render, text: '{{ range(params.n) | length }}'}\n",
        "t.yaml",
    )
    published = template.params_schema()["properties"]["n"]
    assert published == {
        "type": "integer",
        "enum": [1000, 5],
        "minimum": 1,
        "maximum": 10000,
        "default": 1000,
    }
    assert all(type(published[k]) is int for k in ("minimum", "maximum", "default"))
    assert (
        parse_template(
            "name: y\nparameters:\n  r: {type: number, default: 2.0}\n"
            "steps:\n  - {id: a, kind: render, text: hi}\n"
        )
        .parameters["r"]
        .default
        == 2.0
    )  # a number stays as written
