"""Validation of the v2 step kinds and of references, with positions."""

from __future__ import annotations

import pytest

from orchestra.errors import TemplateError
from orchestra.templating import parse_template
from orchestra.templating.model import EmbedStep, LlmStep, MapStep, ParseJsonStep, RenderStep


def problems(text: str) -> dict[str, tuple[int, int, str]]:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    return {p.path: (p.line, p.column, p.message) for p in info.value.problems}


def test_every_step_kind_loads() -> None:
    t = parse_template(
        """\
name: all
model: llama3.2
parameters:
  text: {type: string}
  items: {type: array}
  deep: {type: boolean, default: false}
steps:
  - id: chat
    messages:
      - {role: system, content: Be brief.}
      - {role: user, content: "{{ params.text }}"}
    format: {type: object, properties: {a: {type: string}}}
  - id: note
    kind: render
    text: "{{ steps.chat.output.a }}"
  - id: parsed
    kind: parse_json
    input: steps.note.output
    schema: {type: object}
    when: params.deep
  - id: each
    kind: map
    over: params.items
    concurrency: 2
    step:
      prompt: "Item {{ index }}: {{ item }}"
  - id: vectors
    kind: embed
    input: steps.each.output
"""
    )
    kinds = [type(s) for s in t.steps]
    assert kinds == [LlmStep, RenderStep, ParseJsonStep, MapStep, EmbedStep]
    chat, _, parsed, each, _ = t.steps
    assert isinstance(chat, LlmStep) and chat.messages[1].content == "{{ params.text }}"
    assert isinstance(parsed, ParseJsonStep) and parsed.when == "params.deep"
    assert isinstance(each, MapStep) and each.concurrency == 2 and each.step.id == "item"


BASE = "name: x\nparameters:\n  text: {type: string}\nsteps:\n"


def test_unknown_parameter_in_a_prompt() -> None:
    found = problems(BASE + "  - id: a\n    prompt: 'Hi {{ params.txt }}'\n")
    line, column, message = found["steps[0].prompt"]
    assert (line, column) == (6, 13)
    assert message == "unknown parameter 'txt' (the template takes: text)"


def test_references_to_unknown_later_and_own_steps() -> None:
    text = (
        BASE
        + "  - id: a\n    prompt: '{{ steps.b.output }} {{ steps.a.output }}'\n"
        + "  - id: b\n    prompt: '{{ steps.zzz.output }}'\n"
    )
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    found = [(p.path, p.line, p.message) for p in info.value.problems]
    assert found == [
        ("steps[0].prompt", 6, "a step cannot use its own output (steps.a)"),
        (
            "steps[0].prompt",
            6,
            "step 'b' runs later (steps[1]); a step can only use the outputs of steps before it",
        ),
        ("steps[1].prompt", 8, "unknown step 'zzz' (the steps are: a, b)"),
    ]


def test_unknown_names_and_map_scope() -> None:
    found = problems(
        BASE
        + "  - id: a\n    prompt: '{{ item }}'\n"
        + "  - id: m\n    kind: map\n    over: params.text.split()\n"
        + "    step: {prompt: '{{ index }} {{ item }} {{ oops }}'}\n"
    )
    assert found["steps[0].prompt"][2].startswith("unknown name 'item'")
    assert found["steps[1].step.prompt"][2].startswith("unknown name 'oops'")
    assert "item" in found["steps[1].step.prompt"][2]


def test_output_may_use_every_step_but_not_unknown_ones() -> None:
    found = problems(
        BASE + "  - id: a\n    prompt: hi\noutput: '{{ steps.a.output }}{{ steps.q }}'\n"
    )
    assert found["output"][2] == "unknown step 'q' (the steps are: a)"


@pytest.mark.parametrize(
    ("step", "path", "message"),
    [
        (
            "  - id: a\n    prompt: hi\n    format: {type: objekt}\n",
            "steps[0].format",
            "invalid JSON Schema",
        ),
        (
            "  - id: a\n    kind: parse_json\n    input: params.text\n    schema: {type: 3}\n",
            "steps[0].schema",
            "invalid JSON Schema",
        ),
        (
            "  - id: a\n    prompt: hi\n    messages: [{role: user, content: hi}]\n",
            "steps[0].messages",
            "not both",
        ),
        (
            "  - id: a\n    messages: [{role: robot, content: hi}]\n",
            "steps[0].messages[0].role",
            "role must be one of",
        ),
        (
            "  - id: a\n    prompt: hi\n    when: 'params.text =='\n",
            "steps[0].when",
            "Jinja syntax error",
        ),
        ("  - id: a\n    kind: map\n    over: params.text\n", "steps[0]", "'step' is required"),
        (
            "  - id: a\n    kind: map\n    over: params.text\n    step: {kind: map, over: item, "
            "step: {prompt: hi}}\n",
            "steps[0].step",
            "cannot contain another map",
        ),
        (
            "  - id: a\n    kind: map\n    over: params.text\n    concurrency: 0\n"
            "    step: {prompt: hi}\n",
            "steps[0].concurrency",
            "from 1 to 64",
        ),
        ("  - id: a\n    kind: render\n", "steps[0]", "'text' is required"),
        (
            "  - id: a\n    kind: embed\n    input: params.text\n    prompt: hi\n",
            "steps[0].prompt",
            "unknown field 'prompt'",
        ),
        (
            "  - id: a\n    prompt: hi\n    repair_attempts: 9\n",
            "steps[0].repair_attempts",
            "from 0 to 5",
        ),
    ],
)
def test_step_problems(step: str, path: str, message: str) -> None:
    found = problems(BASE + step)
    assert path in found, found
    assert message in found[path][2]


def position_of(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of ``needle`` in ``text``."""
    offset = text.index(needle)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


HEAD = "name: x\nmodel: m\nparameters:\n  text: {type: string}\nsteps:\n"

# (what, template text, path, the text the problem must point at, words of the message)
POSITIONED = [
    ("yaml syntax", "name: x\nsteps:\n  - id: a\n    prompt: [oops\n", "", "\n", "YAML"),
    (
        "unknown field",
        HEAD + "  - id: a\n    prompt: hi\n    temprature: 1\n",
        "steps[0].temprature",
        "temprature",
        "unknown field",
    ),
    ("wrong type", "name: 5\nsteps:\n  - id: a\n    prompt: hi\n", "name", "5\n", "string"),
    (
        "duplicate id",
        HEAD + "  - id: a\n    prompt: hi\n  - id: a\n    prompt: yo\n",
        "steps[1].id",
        "a\n    prompt: yo",
        "duplicate step id",
    ),
    (
        "unknown parameter",
        HEAD + "  - id: a\n    prompt: '{{ params.txt }}'\n",
        "steps[0].prompt",
        "'{{ params.txt",
        "unknown parameter 'txt'",
    ),
    (
        "unknown step",
        HEAD + "  - id: a\n    prompt: '{{ steps.q.output }}'\n",
        "steps[0].prompt",
        "'{{ steps.q",
        "unknown step 'q'",
    ),
    (
        "later step",
        HEAD + "  - id: a\n    prompt: '{{ steps.b.output }}'\n  - id: b\n    prompt: hi\n",
        "steps[0].prompt",
        "'{{ steps.b",
        "runs later",
    ),
    (
        "jinja syntax",
        HEAD + "  - id: a\n    prompt: |\n      fine\n      {% if %}\n",
        "steps[0].prompt",
        "{% if %}",
        "Jinja syntax error",
    ),
    (
        "json schema",
        HEAD + "  - id: a\n    prompt: hi\n    format: {type: objekt}\n",
        "steps[0].format",
        "{type: objekt}",
        "invalid JSON Schema",
    ),
    (
        "parameter default",
        "name: x\nparameters:\n  n: {type: integer, default: ten}\nsteps:\n"
        "  - id: a\n    prompt: hi\n",
        "parameters.n.default",
        "ten}",
        "does not fit",
    ),
    (
        "duration",
        HEAD + "  - id: a\n    prompt: hi\n    timeout: soon\n",
        "steps[0].timeout",
        "soon",
        "expected a duration",
    ),
    (
        "when expression",
        HEAD + "  - id: a\n    prompt: hi\n    when: params.nope\n",
        "steps[0].when",
        "params.nope",
        "unknown parameter 'nope'",
    ),
]


@pytest.mark.parametrize(
    ("what", "text", "path", "needle", "words"), POSITIONED, ids=[case[0] for case in POSITIONED]
)
def test_each_validation_error_points_at_its_value(
    what: str, text: str, path: str, needle: str, words: str
) -> None:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    matching = [p for p in info.value.problems if p.path == path and words in p.message]
    assert matching, [str(p) for p in info.value.problems]
    problem = matching[0]
    if what == "yaml syntax":
        assert problem.line == 5  # the stream ended inside the flow sequence
        return
    assert (problem.line, problem.column) == position_of(text, needle)
