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
