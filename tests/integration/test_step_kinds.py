"""Every step kind end to end against the fake model server over real HTTP."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestra.config import Settings, TemplateSettings
from tests.conftest import Service, StartService
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import load_slack

TEMPLATES = {
    "chat": """\
name: chat
model: llama3.2
parameters:
  question: {type: string, required: true}
steps:
  - id: answer
    messages:
      - {role: system, content: You answer in one word.}
      - {role: user, content: "Q: {{ params.question }}"}
      - {role: assistant, content: "Understood."}
      - {role: user, content: "Answer now."}
    options: {temperature: 0, seed: 7, num_ctx: 4096}
""",
    "person": """\
name: person
model: llama3.2
parameters:
  text: {type: string, required: true}
steps:
  - id: person
    prompt: "Who is in: {{ params.text }}"
    format:
      type: object
      properties:
        name: {type: string}
        age: {type: integer, minimum: 0}
      required: [name, age]
    repair_attempts: 2
output: "{{ steps.person.output }}"
""",
    "anyjson": """\
name: anyjson
model: llama3.2
steps:
  - id: data
    prompt: "Any JSON"
    format: {type: [object, array]}
""",
    "pipeline": """\
name: pipeline
model: llama3.2
parameters:
  raw: {type: string, required: true}
  deep: {type: boolean, default: false}
steps:
  - id: parsed
    kind: parse_json
    input: params.raw
    schema: {type: object, required: [items], properties: {items: {type: array}}}
  - id: listing
    kind: render
    text: "{% for x in steps.parsed.output.items %}- {{ x }}\\n{% endfor %}"
  - id: deep_dive
    when: params.deep
    prompt: "Go deep on {{ steps.listing.output }}"
  - id: summary
    prompt: "Summarize {{ steps.listing.output }} (deep: {{ steps.deep_dive.output }})"
""",
    "fanout": """\
name: fanout
model: llama3.2
parameters:
  items: {type: array, items: {type: string}}
steps:
  - id: each
    kind: map
    over: params.items
    concurrency: 3
    step:
      when: item != "skip"
      prompt: "#{{ index }} {{ item }}"
""",
    "divide": """\
name: divide
parameters:
  xs: {type: array, default: [1, 2, 0, 4]}
steps:
  - id: m
    kind: map
    over: params.xs
    concurrency: 1
    step: {kind: render, text: "{{ 10 / item }}"}
""",
    "chunks": """\
name: chunks
model: llama3.2
parameters:
  text: {type: string}
steps:
  - id: parts
    kind: map
    over: params.text | chunk(40, 0)
    step:
      prompt: "{{ item }}"
  - id: combined
    prompt: "{{ steps.parts.output | join(' | ') }}"
""",
    "vectors": """\
name: vectors
model: llama3.2
parameters:
  one: {type: string}
  many: {type: array}
steps:
  - id: single
    kind: embed
    input: params.one
  - id: batch
    kind: embed
    input: params.many
output:
  single: "{{ steps.single.output }}"
  batch: "{{ steps.batch.output }}"
""",
    "dynamic": """\
name: dynamic
model: llama3.2
parameters:
  labels: {type: array, items: {type: string}}
steps:
  - id: pick
    prompt: "Pick one of {{ params.labels | join(', ') }}"
    format: >-
      {{ {'type': 'object', 'properties': {'label': {'enum': params.labels}},
      'required': ['label']} }}
output: "{{ steps.pick.output.label }}"
""",
    "dynamic_bare": """\
name: dynamic_bare
model: llama3.2
parameters:
  labels: {type: array, items: {type: string}}
steps:
  - id: pick
    prompt: "Pick one of {{ params.labels | join(', ') }}"
    # Ends in }}: a bare expression, not one wrapped in {{ }}.
    format: >-
      {'type': 'object', 'required': ['label'],
      'properties': {'label': {'enum': params.labels}}}
output: "{{ steps.pick.output.label }}"
""",
}


def braced(name: str) -> str:
    """Template ``name`` with every expression field (input, over, when) wrapped in {{ }}."""

    def wrap(match: re.Match[str]) -> str:
        indent, key, expression = match.groups()
        return f"{indent}{key}: '{{{{ {expression.replace(chr(39), chr(39) * 2)} }}}}'"

    text = re.sub(r"^(\s*)(input|over|when): (.+)$", wrap, TEMPLATES[name], flags=re.MULTILINE)
    return text.replace(f"name: {name}\n", f"name: {name}_braced\n", 1)


TEMPLATES.update({f"{name}_braced": braced(name) for name in ("pipeline", "fanout", "vectors")})


@pytest.fixture
async def svc(
    settings: Settings, tmp_path: Path, start_service: StartService
) -> AsyncIterator[Service]:
    folder = tmp_path / "templates"
    folder.mkdir()
    for name, text in TEMPLATES.items():
        (folder / f"{name}.yaml").write_text(text)
    with_dirs = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    async with start_service(with_dirs) as service:
        yield service


async def test_chat_messages_and_options_reach_the_model(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    done = await svc.wait((await svc.submit("chat", question="Sky colour?"))["id"])
    assert done["status"] == "succeeded"
    [request] = fake_ollama.requests
    assert [m["role"] for m in request["messages"]] == ["system", "user", "assistant", "user"]
    assert request["messages"][1]["content"] == "Q: Sky colour?"
    assert request["options"] == {"temperature": 0, "seed": 7, "num_ctx": 4096}
    assert "format" not in request


async def test_structured_output_is_sent_parsed_and_repaired(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    replies = iter(['{"name": "Ada"}', '```json\n{"name": "Ada", "age": 36}\n```'])
    fake_ollama.reply = lambda _req: next(replies)
    done = await svc.wait((await svc.submit("person", text="Ada, 36"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"] == {"name": "Ada", "age": 36}
    first, repair = fake_ollama.requests
    assert first["format"]["required"] == ["name", "age"]
    assert repair["messages"][-2] == {"role": "assistant", "content": '{"name": "Ada"}'}
    assert "'age' is a required property" in repair["messages"][-1]["content"]
    step = done["steps"][0]
    assert step["output"] == {"name": "Ada", "age": 36}
    single_call_tokens = len('{"name": "Ada"}'.split())
    assert step["usage"]["completion_tokens"] > single_call_tokens  # both calls counted


async def test_a_structured_reply_citing_a_source_in_brackets_first_is_read(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    """ "Note [1]: ..." before the object failed the schema with "[1] is not of type
    'object'", and spent a repair call on a reply that held the answer."""
    fake_ollama.reply = lambda _req: 'Note [1]: it is {"name": "Ada", "age": 36}, see [2].'
    done = await svc.wait((await svc.submit("person", text="Ada, 36"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"] == {"name": "Ada", "age": 36}
    assert len(fake_ollama.requests) == 1


async def test_structured_output_that_stays_invalid_fails_after_the_repairs(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply = lambda _req: "not json at all"
    done = await svc.wait((await svc.submit("person", text="?"))["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "invalid_output"
    assert "after 2 repair(s)" in done["error"]["message"]
    # The reply itself is quoted: the failed step keeps no output to look at.
    assert done["error"]["message"].endswith("; its last reply: 'not json at all'")
    assert len(fake_ollama.requests) == 3
    assert len(done["attempts"]) == 1  # not retryable: retrying would not change the model
    # The model answered three times: who answered, and what the answers cost, are kept.
    step = done["steps"][0]
    assert step["status"] == "failed" and step["model"] == "ollama/llama3.2"
    assert step["usage"]["completion_tokens"] == 3 * len("not json at all".split())
    assert done["usage"]["completion_tokens"] == step["usage"]["completion_tokens"]


async def test_replies_cut_at_their_length_limit_say_so_when_they_stay_invalid(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    """A small model's JSON cut off at its length limit each time: the error said only that
    the reply was not JSON, and the failed step's usage did not say it was cut."""
    fake_ollama.reply = lambda _req: '{"name": "Ada Ada Ada Ada'
    fake_ollama.done_reason = "length"
    done = await svc.wait((await svc.submit("person", text="?"))["id"])
    assert done["error"]["type"] == "invalid_output"
    assert "the last reply was cut off at its length limit" in done["error"]["message"], done
    assert done["steps"][0]["usage"]["truncated"] == "output"


async def test_parse_json_render_and_when(svc: Service, fake_ollama: FakeOllama) -> None:
    raw = 'Here: ```json\n{"items": ["a", "b"]}\n```'
    done = await svc.wait((await svc.submit("pipeline", raw=raw))["id"])
    assert done["status"] == "succeeded", done["error"]
    steps = {s["id"]: s for s in done["steps"]}
    assert steps["parsed"]["output"] == {"items": ["a", "b"]}
    assert steps["listing"]["output"] == "- a\n- b\n"
    assert steps["deep_dive"]["status"] == "skipped" and steps["deep_dive"]["output"] is None
    assert [r["messages"][-1]["content"] for r in fake_ollama.requests] == [
        "Summarize - a\n- b\n (deep: None)"
    ]


async def test_parse_json_schema_mismatch_fails_the_step(svc: Service) -> None:
    done = await svc.wait((await svc.submit("pipeline", raw='{"things": []}'))["id"])
    assert done["status"] == "failed"
    assert done["error"]["step"] == "parsed"
    assert "'items' is a required property" in done["error"]["message"]


async def test_map_runs_items_concurrently_and_keeps_their_order(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 0.3
    # A template file renders in render processes: start them first (a one-time cost of a
    # few hundred ms on a busy machine), so that only the map is timed. No model call.
    warm = await svc.wait((await svc.submit("fanout", items=["skip"] * 4))["id"])
    assert warm["status"] == "succeeded"
    items = ["a", "b", "skip", "d", "e", "f", "g"]
    started = time.perf_counter()
    done = await svc.wait((await svc.submit("fanout", items=items))["id"])
    elapsed = time.perf_counter() - started
    assert done["status"] == "succeeded"
    assert done["result"] == [
        "ECHO: #0 a",
        "ECHO: #1 b",
        None,
        "ECHO: #3 d",
        "ECHO: #4 e",
        "ECHO: #5 f",
        "ECHO: #6 g",
    ]
    assert fake_ollama.max_in_flight == 3
    assert len(fake_ollama.requests) == 6
    assert all(r["stream"] is False for r in fake_ollama.requests)  # items do not stream
    assert elapsed < 6 * 0.3 * load_slack()  # faster than one at a time


async def test_a_failing_map_item_is_named_with_its_path_in_the_template(svc: Service) -> None:
    done = await svc.wait((await svc.submit("divide"))["id"])
    assert done["status"] == "failed" and done["error"]["step"] == "m"
    message = done["error"]["message"]
    assert "item 2 of steps.m: cannot render steps.m.step.text" in message, message
    assert "division by zero" in message


async def test_chunk_then_map_then_combine(svc: Service, fake_ollama: FakeOllama) -> None:
    text = "First sentence here. " * 6
    done = await svc.wait((await svc.submit("chunks", text=text))["id"])
    assert done["status"] == "succeeded"
    parts = done["steps"][0]["output"]
    assert len(parts) >= 3 and all(p.startswith("ECHO: ") for p in parts)
    assert done["result"].count(" | ") == len(parts) - 1


async def test_embed_a_string_and_a_list(svc: Service, fake_ollama: FakeOllama) -> None:
    done = await svc.wait((await svc.submit("vectors", one="hello world", many=["a", "bee"]))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["single"] == [11.0, 3.0, 1.0, float(ord("h"))]
    assert done["result"]["batch"] == [[1.0, 1.0, 0.0, 97.0], [3.0, 2.0, 0.0, 98.0]]
    assert fake_ollama.requests[0] == {"model": "llama3.2", "input": ["hello world"]}
    assert done["steps"][0]["model"] == "ollama/llama3.2"


@pytest.mark.parametrize("name", ["dynamic", "dynamic_bare"])
async def test_format_can_be_built_from_the_parameters(
    svc: Service, fake_ollama: FakeOllama, name: str
) -> None:
    def reply(request: dict[str, Any]) -> str:
        allowed = request["format"]["properties"]["label"]["enum"]
        return json.dumps({"label": allowed[-1]})

    fake_ollama.reply = reply
    done = await svc.wait((await svc.submit(name, labels=["cat", "dog"]))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"] == "dog"


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("pipeline", {"raw": '{"items": ["a", "b"]}'}),
        ("pipeline", {"raw": '{"items": ["a", "b"]}', "deep": True}),
        ("fanout", {"items": ["a", "skip", "c"]}),
        ("vectors", {"one": "hello world", "many": ["a", "bee"]}),
    ],
)
async def test_input_over_and_when_run_the_same_wrapped_in_braces(
    svc: Service, name: str, params: dict[str, Any]
) -> None:
    runs = []
    for template in (name, f"{name}_braced"):
        done = await svc.wait((await svc.submit(template, **params))["id"])
        assert done["status"] == "succeeded", done["error"]
        steps = [(s["id"], s["status"], s["output"]) for s in done["steps"]]
        runs.append((done["result"], steps))
    bare, braced = runs
    assert braced == bare


LAZY = """\
name: lazy
parameters:
  out: {type: string, default: names}
steps:
  - id: p
    kind: parse_json
    input: '[{"name": "a"}, {"name": "b"}]'
  - id: r
    kind: parse_json
    input: range(3)
output:
  names: "{{ steps.p.output | map(attribute='name') }}"
  unique: "{{ [1, 2, 1] | unique }}"
  numbers: "{{ steps.r.output }}"
"""


async def test_lazy_values_become_lists_and_objects_fail_the_output_step(
    settings: Settings, tmp_path: Path, start_service: StartService
) -> None:
    folder = tmp_path / "lazy"
    folder.mkdir()
    (folder / "lazy.yaml").write_text(LAZY)
    (folder / "cyc.yaml").write_text(
        "name: cyc\nsteps:\n  - {id: a, kind: render, text: x}\noutput: '{{ cycler(1, 2) }}'\n"
    )
    with_dirs = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    async with start_service(with_dirs) as svc:
        done = await svc.wait((await svc.submit("lazy"))["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["result"] == {"names": ["a", "b"], "unique": [1, 2], "numbers": [0, 1, 2]}
        failed = await svc.wait((await svc.submit("cyc"))["id"])
        assert failed["status"] == "failed"
        assert (failed["error"]["step"], failed["error"]["type"]) == ("output", "render_failed")
        assert "not JSON data" in failed["error"]["message"]


@pytest.mark.parametrize(
    "reply",
    ["[" * 5000 + "]" * 5000, '{"name": "Ada", "age": NaN}', '{"name": "Ada", "age": 1e400}'],
)
async def test_a_reply_too_deep_or_not_finite_is_invalid_output(
    svc: Service, fake_ollama: FakeOllama, reply: str
) -> None:
    fake_ollama.reply = lambda _req: reply
    done = await svc.wait((await svc.submit("anyjson"))["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "invalid_output", done["error"]
    assert len(fake_ollama.requests) == 3  # the repair loop asked again


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
        {"$ref": "http://169.254.169.254/latest/meta-data"},
    ],
)
async def test_a_caller_schema_with_a_bad_ref_fails_the_step_not_the_service(
    svc: Service, fake_ollama: FakeOllama, schema: dict[str, Any]
) -> None:
    fake_ollama.reply = lambda _req: '{"a": 1}'
    task = await svc.submit("extract_schema", text="t", schema=schema)
    done = await svc.wait(task["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "render_failed", done["error"]
    assert "$ref" in done["error"]["message"]
    assert fake_ollama.requests == []  # refused before the model was asked
