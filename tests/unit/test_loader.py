from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
from referencing.exceptions import Unresolvable

from orchestra.config import LimitSettings
from orchestra.errors import InvalidParams, TemplateError
from orchestra.templating import TemplateProblem, parse_template
from orchestra.templating.options import KNOWN, one_edit_apart
from orchestra.templating.params import validate_params
from orchestra.templating.regex import validator
from orchestra.templating.registry import TemplateRegistry
from tests.conftest import BUILTINS

GOOD = """\
name: demo
version: 2
description: A demo.
model: llama3.2
parameters:
  text: {type: string, required: true, max_length: 100}
  n: {type: integer, default: 3, minimum: 1, maximum: 10}
steps:
  - id: first
    system: Be brief.
    prompt: |
      Say {{ params.text }} {{ params.n }} times.
    options: {temperature: 0}
  - id: second
    prompt: "Shorten: {{ steps.first.output }}"
output:
  long: "{{ steps.first.output }}"
  short: "{{ steps.second.output }}"
"""


def problems(text: str) -> list[TemplateProblem]:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    return info.value.problems


def test_a_valid_template_loads() -> None:
    t = parse_template(GOOD, "t.yaml")
    assert (t.name, t.version, t.model) == ("demo", 2, "llama3.2")
    assert [s.id for s in t.steps] == ["first", "second"]
    assert t.parameters["n"].default == 3
    assert t.params_schema()["required"] == ["text"]
    assert t.output == {"long": "{{ steps.first.output }}", "short": "{{ steps.second.output }}"}


def test_yaml_syntax_error_has_line_and_column() -> None:
    [p] = problems("name: x\nsteps: [\n  - id: a\n")
    assert p.file == "t.yaml"
    assert p.message.startswith("YAML:")
    assert p.line >= 2


def test_duplicate_yaml_key_is_reported_where_it_repeats() -> None:
    [p] = problems("name: x\nname: y\nsteps: []\n")
    assert "duplicate key" in p.message
    assert (p.line, p.column) == (2, 1)


def test_unknown_field_points_at_it_and_suggests_the_right_one() -> None:
    found = problems(GOOD.replace("description:", "descripton:"))
    [p] = found
    assert p.path == "descripton"
    assert (p.line, p.column) == (3, 1)  # the key itself, not its value
    assert "did you mean 'description'" in p.message


def test_every_problem_is_reported_at_once() -> None:
    text = """\
name: Bad Name
steps:
  - id: a
    prompt: hi
  - id: a
    prompt: "{{ oops"
  - id: c
    kind: shell
parameters:
  x: {type: str}
"""
    found = problems(text)
    by_path = {p.path: p for p in found}
    assert "may hold only" in by_path["name"].message
    assert (by_path["name"].line, by_path["name"].column) == (1, 7)
    assert "duplicate step id 'a' (also steps[0])" in by_path["steps[1].id"].message
    assert (by_path["steps[1].id"].line, by_path["steps[1].id"].column) == (5, 9)
    assert "Jinja syntax error" in by_path["steps[1].prompt"].message
    assert (by_path["steps[1].prompt"].line, by_path["steps[1].prompt"].column) == (6, 13)
    assert "unknown step kind 'shell'" in by_path["steps[2].kind"].message
    assert "type must be one of" in by_path["parameters.x.type"].message
    assert by_path["parameters.x.type"].line == 10


def test_jinja_error_inside_a_block_scalar_points_at_the_bad_line() -> None:
    text = """\
name: x
steps:
  - id: a
    prompt: |
      line one
      line two {% if %}
"""
    [p] = problems(text)
    assert p.path == "steps[0].prompt"
    assert (p.line, p.column) == (6, 7)


def test_missing_required_fields() -> None:
    found = {p.path: p.message for p in problems("description: nothing\n")}
    assert found[""] == "'name' is required"
    assert found["steps"] == "'steps' must be a non-empty list of steps"
    step = {p.path: p.message for p in problems("name: x\nsteps:\n  - id: a\n")}
    # A step is a prompt or a list of messages: naming only `prompt` read as "messages is not
    # allowed" (a docs walkthrough).
    assert step["steps[0]"] == "'prompt' or 'messages' is required"
    # `messages: ~` is none given: it loaded, and every task failed with an AssertionError.
    for empty in ("messages: ~", "messages: null", "prompt: ~\n    messages: ~"):
        found = {p.path: p.message for p in problems(f"name: x\nsteps:\n  - id: a\n    {empty}\n")}
        assert found.get("steps[0]") == "'prompt' or 'messages' is required", (empty, found)


@pytest.mark.parametrize(
    ("param", "path", "message"),
    [
        ("{type: integer, default: ten}", "parameters.p.default", "default does not fit"),
        ("{type: string, minimum: 3}", "parameters.p.minimum", "does not apply"),
        ("{type: string, pattern: '('}", "parameters.p.pattern", "not a valid regular"),
        ("{type: string, enum: [a, 3]}", "parameters.p.enum[1]", "enum value does not fit"),
        ("{type: string, required: true, default: a}", "parameters.p.default", "cannot have"),
        ("{type: array, items: {type: nope}}", "parameters.p.items", "not a valid JSON Schema"),
        (
            "{type: integer, maximum: many}",
            "parameters.p.maximum",
            "must be a number, got a string",
        ),
        ("{type: string, colour: red}", "parameters.p.colour", "unknown field"),
        ("{default: a}", "parameters.p.type", "; it is missing"),
        # YAML's .inf and .nan: no JSON request could send or match them.
        ("{type: number, default: .inf}", "parameters.p.default", "holds .inf or .nan"),
        ("{type: number, maximum: .nan}", "parameters.p.maximum", "holds .inf or .nan"),
        ("{type: number, enum: [1, -.inf]}", "parameters.p.enum", "holds .inf or .nan"),
        ("{type: array, default: [[.nan]]}", "parameters.p.default", "holds .inf or .nan"),
        # Bounds no value fits.
        ("{type: integer, minimum: 5, maximum: 1}", "parameters.p.maximum", "no value fits"),
        ("{type: string, min_length: 5, max_length: 2}", "parameters.p.max_length", "below"),
        # Bounds no value meets, that published a schema no JSON Schema reader takes.
        ("{type: string, max_length: -5}", "parameters.p.max_length", "0 or more, not -5"),
        ("{type: array, min_length: -2}", "parameters.p.min_length", "0 or more, not -2"),
        ("{type: string, enum: []}", "parameters.p.enum", "at least one value"),
        (
            "{type: integer, minimum: 1.5, maximum: 1.7}",
            "parameters.p.maximum",
            "no integer lies from minimum 1.5 to maximum 1.7",
        ),
    ],
)
def test_parameter_problems(param: str, path: str, message: str) -> None:
    text = f"name: x\nparameters:\n  p: {param}\nsteps:\n  - id: a\n    prompt: hi\n"
    found = {p.path: p.message for p in problems(text)}
    assert path in found, found
    assert message in found[path]


@pytest.mark.parametrize(
    ("written", "hint"),
    [
        ("minItems: 1", "JSON Schema's name; here it is 'min_length'"),
        ("maxItems: 3", "JSON Schema's name; here it is 'max_length'"),
        ("uniqueItems: true", "JSON Schema's name; here it is 'unique_items'"),
        ("exclusiveMinimum: 0", "exclusive bounds are not supported"),
        ("exclusiveMaximum: 9", "exclusive bounds are not supported"),
    ],
)
def test_a_json_schema_spelling_of_a_parameter_key_names_the_template_spelling(
    written: str, hint: str
) -> None:
    """``minItems`` was answered "did you mean 'items'?": the item schema, and following the
    hint broke the template."""
    text = (
        f"name: x\nparameters:\n  p: {{type: array, {written}}}\nsteps:\n"
        "  - id: a\n    prompt: hi\n"
    )
    key = written.split(":")[0]
    found = {p.path: p.message for p in problems(text)}
    message = found[f"parameters.p.{key}"]
    assert hint in message, message
    assert "did you mean 'items'" not in message


def test_a_json_schema_spelling_of_a_string_bound_names_the_template_spelling() -> None:
    text = "name: x\nparameters:\n  p: {type: string, minLength: 1, maxLength: 9}\nsteps:\n"
    found = {p.path: p.message for p in problems(text + "  - id: a\n    prompt: hi\n")}
    assert "here it is 'min_length'" in found["parameters.p.minLength"]
    assert "here it is 'max_length'" in found["parameters.p.maxLength"]


def test_a_misspelt_field_of_a_step_is_refused_naming_the_one_there_is() -> None:
    """``steps.first.outptu`` rendered as undefined at run time, with a hint about params."""
    text = (
        "name: x\nsteps:\n  - id: first\n    prompt: hi\n  - id: b\n"
        '    prompt: "{{ steps.first.outptu }} {{ steps.first.output.k }}'
        " {{ steps['first'].x }}\"\n"
    )
    found = [(p.path, p.line, p.message) for p in problems(text)]
    assert found == [
        (
            "steps[1].prompt",
            6,
            "steps.first.outptu: a step's only field is 'output' (steps.first.output)",
        ),
        (
            "steps[1].prompt",
            6,
            "steps.first.x: a step's only field is 'output' (steps.first.output)",
        ),
    ]


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("temprature", "temperature"),  # a letter left out
        ("temperatture", "temperature"),  # one added
        ("num_predixt", "num_predict"),  # one changed
        ("num_ctx_", "num_ctx"),
        ("tmperatre", None),  # two letters left out: not one typo
        ("penalize_newlines", "penalize_newline"),
        ("repaet_penalty", "repeat_penalty"),  # two letters swapped
    ],
)
def test_a_typo_is_one_edit_from_the_option_meant(typed: str, meant: str | None) -> None:
    found = [known for known in KNOWN if one_edit_apart(typed, known)]
    assert found == ([meant] if meant else [])


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        (
            "{temprature: 0}",
            "temprature",
            "unknown option 'temprature'; did you mean 'temperature'?",
        ),
        ("{temperature: hot}", "temperature", "option 'temperature' must be a number, got 'hot'"),
        ("{num_predict: 1.5}", "num_predict", "option 'num_predict' must be an integer, got 1.5"),
        ("{stop: 3}", "stop", "option 'stop' must be a string or a list of strings, got 3"),
    ],
)
def test_an_llm_steps_options_are_checked(options: str, key: str, message: str) -> None:
    """A typo in an option silently lost the setting (temperature 0: deterministic, cached)."""
    text = f"name: x\nsteps:\n  - id: a\n    prompt: hi\n    options: {options}\n"
    [p] = problems(text)
    assert (p.path, p.message) == (f"steps[0].options.{key}", message)
    assert p.line == 5


def test_a_servers_own_options_pass() -> None:
    """Servers take options of their own (vLLM's repetition_penalty, min_tokens): only a near
    miss of a known option is a typo."""
    options = (
        "{temperature: 0.2, repetition_penalty: 1.1, min_tokens: 3, my_server_knob: x,"
        " n_predict: 256, n_keep: 4, top_a: 0.1, mirostat_ent: 1}"
    )
    text = f"name: x\nsteps:\n  - id: a\n    prompt: hi\n    options: {options}\n"
    [step] = parse_template(text, "t.yaml").steps
    assert step.options["repetition_penalty"] == 1.1  # type: ignore[union-attr]


def test_a_steps_mapping_methods_are_not_taken_for_fields() -> None:
    text = (
        "name: x\nsteps:\n  - id: a\n    prompt: hi\n  - id: b\n"
        "    prompt: \"{% if steps.a.get('output') %}{{ steps.a.items() | list }}{% endif %}\"\n"
    )
    assert [s.id for s in parse_template(text, "t.yaml").steps] == ["a", "b"]


def test_a_date_in_yaml_is_its_iso_text() -> None:
    """YAML reads 2024-01-01 as a date, which no JSON value is: a string parameter's default
    written so was refused as "datetime.date(2024, 1, 1) is not of type 'string'"."""
    text = (
        "name: x\nparameters:\n  day: {type: string, default: 2024-01-01}\n"
        "steps:\n  - id: a\n    kind: render\n    text: 2024-01-01 10:30:00\n"
    )
    template = parse_template(text, "t.yaml")
    assert template.parameters["day"].default == "2024-01-01"
    assert template.steps[0].text == "2024-01-01 10:30:00"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "said"),
    [
        ("default: null", "default does not fit the parameter: null is not of type 'string'"),
        ("enum: [a, true]", "enum value does not fit the type: true is not of type 'string'"),
    ],
)
def test_a_default_or_choice_that_does_not_fit_is_told_in_json(field: str, said: str) -> None:
    """They said "None is not of type 'string'" and "True is not …": Python, to a YAML
    author."""
    text = (
        f"name: x\nparameters:\n  p: {{type: string, {field}}}\nsteps:\n  - id: a\n    prompt: hi\n"
    )
    [p] = problems(text)
    assert p.message == said


def test_output_syntax_error_is_located() -> None:
    text = "name: x\nsteps:\n  - id: a\n    prompt: hi\noutput: '{{ steps.a.output | }}'\n"
    [p] = problems(text)
    assert p.path == "output"
    assert (p.line, p.column) == (5, 9)


def test_registry_reports_a_name_clash_with_both_files(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("name: summarize\nsteps:\n  - id: a\n    prompt: hi\n")
    registry = TemplateRegistry([tmp_path])
    with pytest.raises(TemplateError) as info:
        registry.load()
    [p] = info.value.problems
    assert p.file.endswith("mine.yaml")
    assert "already defined in" in p.message and "summarize.yaml" in p.message


def test_registry_loads_builtins_and_user_folders(tmp_path: Path) -> None:
    (tmp_path / "mine.yml").write_text("name: mine\nsteps:\n  - id: a\n    prompt: hi\n")
    (tmp_path / "notes.txt").write_text("not a template")
    registry = TemplateRegistry([tmp_path])
    names = {t.name for t in registry.load()}
    assert BUILTINS | {"mine"} <= names


def test_unknown_filter_is_caught_at_load_time() -> None:
    text = "name: x\nsteps:\n  - id: a\n    prompt: '{{ params.t | shout }}'\n"
    [p] = problems(text)
    assert p.path == "steps[0].prompt"
    assert "No filter named 'shout'" in p.message
    out = "name: x\nsteps:\n  - id: a\n    prompt: hi\noutput: '{{ steps.a.output | shout }}'\n"
    [q] = problems(out)
    assert q.path == "output" and "No filter named 'shout'" in q.message


def test_retry_and_timeouts_are_read_with_durations() -> None:
    t = parse_template(
        "name: x\ntimeout: 2m\nretry: {max_attempts: 5, backoff: fixed, initial_delay: 250ms, "
        "max_delay: 1s}\nsteps:\n  - id: a\n    prompt: hi\n    timeout: 30s\n"
    )
    assert t.timeout == 120
    assert t.retry is not None
    assert (t.retry.max_attempts, t.retry.backoff, t.retry.initial_delay, t.retry.max_delay) == (
        5,
        "fixed",
        0.25,
        1.0,
    )
    assert t.steps[0].timeout == 30


@pytest.mark.parametrize(
    ("snippet", "path", "message"),
    [
        ("timeout: soon", "timeout", "expected a duration"),
        ("timeout: 0", "timeout", "must be more than 0"),
        ("retry: {max_attempts: 0}", "retry.max_attempts", "1 to 100"),
        ("retry: {backoff: random}", "retry.backoff", "exponential or fixed"),
        ("retry: {initial_delay: 10s, max_delay: 1s}", "retry.max_delay", "not be shorter"),
        ("retry: {tries: 3}", "retry.tries", "unknown field"),
    ],
)
def test_bad_retry_and_timeout(snippet: str, path: str, message: str) -> None:
    found = {
        p.path: p.message
        for p in problems(f"name: x\n{snippet}\nsteps:\n  - id: a\n    prompt: hi\n")
    }
    assert path in found, found
    assert message in found[path]


def test_a_template_file_over_the_size_limit_is_a_problem_of_that_file(tmp_path: Path) -> None:
    words = "  words words words\n" * 20_000  # about 400 KB
    big = "name: big\ndescription: |\n" + words + "steps:\n  - id: a\n    prompt: hi\n"
    (tmp_path / "big.yaml").write_text(big)
    with pytest.raises(TemplateError) as info:
        TemplateRegistry([tmp_path]).load()
    [p] = info.value.problems
    assert p.file.endswith("big.yaml") and "max_template_bytes" in p.message
    roomy = TemplateRegistry([tmp_path], limits=LimitSettings(max_template_bytes=500_000))
    assert "big" in {t.name for t in roomy.load()}


def test_yaml_merge_keys_load_and_problems_in_merged_keys_point_at_the_merge() -> None:
    text = """\
name: merged
steps:
  - &base {id: a, kind: render, text: hi}
  - <<: *base
    id: b
"""
    t = parse_template(text, "t.yaml")
    assert [(s.id, s.kind) for s in t.steps] == [("a", "render"), ("b", "render")]
    bad = """\
name: merged
steps:
  - &base {id: a, kind: render, text: "{{ nope }}"}
  - id: b
    <<: *base
"""
    found = {(p.path, p.line, p.column) for p in problems(bad)}
    assert ("steps[0].text", 3, 39) in found
    assert ("steps[1].text", 5, 5) in found  # the merge, where the merged key comes from


@pytest.mark.parametrize(
    ("snippet", "path"),
    [
        ('name: "nl3\\n"\nsteps:\n  - id: a\n    prompt: hi\n', "name"),
        ('name: x\nsteps:\n  - id: "a\\n"\n    prompt: hi\n', "steps[0].id"),
        (
            'name: x\nparameters:\n  "p\\n": {type: string}\nsteps:\n  - id: a\n    prompt: hi\n',
            "parameters.p\n",
        ),
    ],
)
def test_a_name_id_or_parameter_ending_in_a_newline_is_refused(snippet: str, path: str) -> None:
    found = {p.path: p.message for p in problems(snippet)}
    assert path in found, found


@pytest.mark.parametrize(
    ("source", "message", "line"),
    [
        ("{% if true %}{{ 'x' | nosuchfilter }}{% endif %}", "No filter named 'nosuchfilter'", 5),
        ("{% if 'x' is nosuchtest %}y{% endif %}", "No test named 'nosuchtest'", 5),
        ("a\n{% include '/etc/passwd' %}", "include", 6),
        ("a\n\n{% extends 'base.html' %}", "extends", 7),
        ("{% from 'x' import y %}", "import", 5),
        ("{% import 'x' as y %}", "import", 5),
    ],
)
def test_unknown_filters_tests_and_other_templates_are_refused_at_load(
    source: str, message: str, line: int
) -> None:
    body = "".join(f"      {row}\n" for row in source.split("\n"))
    text = f"name: x\nsteps:\n  - id: a\n    prompt: |\n{body}"
    [p] = problems(text)
    assert p.path == "steps[0].prompt"
    assert message in p.message, p.message
    assert p.line == line


def test_integer_bounds_stay_integers_in_the_published_schema() -> None:
    t = parse_template(GOOD, "t.yaml")
    schema = t.params_schema()["properties"]["n"]
    assert (schema["minimum"], schema["maximum"]) == (1, 10)
    assert type(schema["minimum"]) is int and type(schema["maximum"]) is int
    ratio = (
        "name: x\nparameters:\n  r: {type: number, minimum: 0.5}\n"
        "steps:\n  - id: a\n    prompt: hi\n"
    )
    assert parse_template(ratio).params_schema()["properties"]["r"]["minimum"] == 0.5


def test_an_error_in_a_folded_block_points_at_its_line() -> None:
    text = """\
name: x
steps:
  - id: a
    prompt: >-
      line one
      line two

      line four

      line six {% if %}
      line seven
"""
    # Folding joins "line one line two": Jinja's line 3 is "line six line seven", which
    # starts on the file's line 10 (a line folded from several rows points at its first).
    [p] = problems(text)
    assert (p.line, p.column) == (10, 7)


def test_a_reference_error_in_a_block_points_at_its_line() -> None:
    text = """\
name: x
steps:
  - id: a
    prompt: |
      line one
      line two {{ params.nope }}
      line three {{ steps.later.output }}
  - id: later
    prompt: hi
"""
    found = {p.message.split(" (")[0]: (p.line, p.column) for p in problems(text)}
    assert found["unknown parameter 'nope'"] == (6, 7)
    assert found["step 'later' runs later"] == (7, 7)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{$ref: "#/$defs/x", $defs: {x: {$ref: "#/$defs/x"}}}', "refers back to itself"),
        ('{$ref: "#/$defs/x", $defs: {x: {allOf: [{$ref: "#"}]}}}', "refers back to itself"),
        ('{$ref: "http://example.com/s.json"}', "only references inside the schema"),
        ('{$ref: "#/$defs/missing"}', "does not resolve"),
        ('{$dynamicRef: "#x"}', "$dynamicRef"),
        # Through a key that is no keyword: the walk of keywords alone never saw these.
        ('{$ref: "#/x-extra", x-extra: {$ref: "http://127.0.0.1:9/s.json"}}', "only references"),
        ('{$ref: "#/x-extra", x-extra: {$ref: "#"}}', "refers back to itself"),
    ],
)
def test_remote_unresolvable_and_looping_refs_are_refused_with_their_position(
    schema: str, message: str
) -> None:
    as_items = (
        f"name: x\nparameters:\n  p:\n    type: array\n    items: {schema}\n"
        "steps:\n  - id: a\n    prompt: hi\n"
    )
    as_format = f"name: x\nsteps:\n  - id: a\n    prompt: hi\n    format: {schema}\n"
    for text, path in ((as_items, "parameters.p.items"), (as_format, "steps[0].format")):
        found = problems(text)  # a loop is reported at each $ref on it
        for p in found:
            assert p.path.startswith(path), p
            assert message in p.message, p.message
            assert p.line == 5


def test_a_recursive_schema_that_descends_into_the_value_is_fine() -> None:
    tree = "{type: object, properties: {kids: {type: array, items: {$ref: '#'}}}}"
    parse_template(f"name: x\nsteps:\n  - id: a\n    prompt: hi\n    format: {tree}\n")


def test_a_parameters_refs_resolve_in_its_own_schema_when_a_task_is_checked() -> None:
    """Checked at load with ``#`` as the items' schema, the references were resolved against
    the whole parameters' object at submit: a PointerToNowhere (a 500) on every submit, and
    the tree below named its kids unknown parameters."""
    text = (
        "name: x\nparameters:\n"
        "  who:\n    type: array\n"
        "    items: {type: string, $ref: '#/$defs/s', $defs: {s: {maxLength: 3}}}\n"
        "  tree:\n    type: array\n"
        "    items: {type: object, properties: {kids: {type: array, items: {$ref: '#'}}}}\n"
        "steps:\n  - id: a\n    prompt: hi\n"
    )
    template = parse_template(text)
    ok = {"who": ["ab"], "tree": [{"kids": [{"kids": []}]}]}
    assert validate_params(template, ok) == ok
    with pytest.raises(InvalidParams) as refused:
        validate_params(template, {"who": ["abcd"], "tree": [{"kids": [{"kids": 5}]}]})
    assert sorted(f.field for f in refused.value.fields) == [
        "params.tree[0].kids[0].kids",
        "params.who[0]",
    ]


def test_a_validator_never_fetches_what_a_ref_names() -> None:
    """Whatever gets past the checks at load: jsonschema fetched a remote $ref by itself."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.json"
        with pytest.raises(Unresolvable):
            list(validator({"$ref": url}).iter_errors("x"))
    finally:
        server.shutdown()
    assert asked == []


def test_a_yaml_boolean_when_is_the_condition_it_stands_for() -> None:
    """``when: false``, the natural way to turn a step off, was refused: "'when' must be a
    string"."""
    t = parse_template(
        "name: x\nsteps:\n  - id: a\n    prompt: hi\n    when: false\n"
        "  - id: b\n    prompt: hi\n    when: true\n"
    )
    assert [s.when for s in t.steps] == ["false", "true"]


def test_format_json_loads() -> None:
    t = parse_template("name: x\nsteps:\n  - id: a\n    prompt: hi\n    format: json\n")
    assert t.steps[0].format == "json"


def test_a_name_with_a_letter_beyond_ascii_is_told_why() -> None:
    """``ü`` is a letter: "must be a letter" said nothing of why it was refused."""
    text = "name: x\nparameters:\n  ü: {type: string}\nsteps:\n  - id: é\n    prompt: hi\n"
    said = [p.message for p in problems(text)]
    rule = "must be an ASCII letter or _ followed by ASCII letters, digits or _"
    assert f"parameter name 'ü' {rule}" in said and f"step id 'é' {rule}" in said, said


def test_an_explicit_str_tag_is_a_string_and_other_tags_are_named() -> None:
    """``!!str`` is standard YAML for a string: it was refused as "got TaggedScalar"; a set,
    binary data or a tag of one's own were refused naming Python's classes."""
    t = parse_template("name: !!str t\nsteps:\n  - id: a\n    prompt: !!str 3\n", "t.yaml")
    assert (t.name, t.steps[0].prompt) == ("t", "3")
    block = "name: t\nsteps:\n  - id: a\n    prompt: !!str |\n      one\n      two {% if %}\n"
    [p] = problems(block)  # a tagged block scalar is placed at its bad line as any other
    assert (p.path, p.line, p.column) == ("steps[0].prompt", 6, 7)
    for value, said in (
        ("!!set {a, b}", "a set (!!set)"),
        ("!!binary aGVsbG8=", "binary data (!!binary)"),
        ("!shout hi", "the tag !shout"),
    ):
        found = problems(f"name: t\nsteps:\n  - id: a\n    prompt: {value}\n")
        [p] = [p for p in found if said in p.message]
        assert (p.path, p.line, p.column) == ("steps[0].prompt", 4, 13), p
        assert not [p for p in found if "Tagged" in p.message or "Commented" in p.message]
        assert not [p for p in found if "required" in p.message], found
    # A key with !!str is its text; a mapping or a list with a tag of its own is refused.
    t = parse_template("name: t\nsteps:\n  - !!str id: a\n    !!str prompt: hi\n", "t.yaml")
    assert (t.steps[0].id, t.steps[0].prompt) == ("a", "hi")
    [p] = problems("name: t\nsteps:\n  - !shout {id: a, prompt: hi}\n")
    assert (p.path, p.message) == ("steps[0]", "the tag !shout is not one a template takes"), p
    [p] = problems("name: t\nsteps: !!str\n  - {id: a, prompt: hi}\n")
    assert p.path == "steps" and "!!str" in p.message, p
    parse_template("name: t\nsteps: !!seq\n  - !!map {id: a, prompt: hi}\n", "t.yaml")


@pytest.mark.parametrize(
    "definition",
    ["{type: strng}", "{type: string, description: 5}", "{}", "[]", "{type: [string, integer]}"],
)
def test_a_bad_parameter_definition_is_one_problem_not_also_unknown_where_used(
    definition: str,
) -> None:
    """``x: {type: strng}`` was also "unknown parameter 'x' (the template takes: none)" at
    each ``{{ params.x }}``: it is declared."""
    found = problems(
        f"name: t\nparameters:\n  x: {definition}\n"
        "steps:\n  - id: a\n    prompt: '{{ params.x }}'\noutput: '{{ params.x }}'\n"
    )
    assert found and all(p.path.startswith("parameters.x") for p in found), found


@pytest.mark.parametrize(
    "deep",
    [
        "".join(f"{{% for a{i} in [1] %}}" for i in range(40)) + "x" + "{% endfor %}" * 40,
        "".join(f"{{% macro m{i}() %}}" for i in range(120)) + "x" + "{% endmacro %}" * 120,
    ],
)
def test_blocks_nested_past_what_python_compiles_are_placed_in_their_field(deep: str) -> None:
    """40 nested loops were "1:1: the template could not be checked: SyntaxError: too many
    statically nested blocks", with no field and no line."""
    [p] = problems(f"name: t\nsteps:\n  - id: a\n    prompt: '{deep}'\n")
    assert p.path == "steps[0].prompt" and "nests too deeply" in p.message, p
    assert p.line == 4, p


def test_a_template_folder_that_does_not_exist_is_named_as_the_setting_that_names_it(
    tmp_path: Path,
) -> None:
    """It was "/nowhere:1:1: template folder does not exist": a made-up position, and not the
    setting to change."""
    with pytest.raises(TemplateError) as info:
        TemplateRegistry([tmp_path / "nowhere"], builtins=False).load()
    said = str(info.value)
    assert "templates.dirs" in said and str(tmp_path / "nowhere") in said, said
    assert ":1:1" not in said, said


@pytest.mark.parametrize(
    ("expression", "said"),
    [
        ("steps.a.output | map('nofilter') | list", "No filter named 'nofilter' (in map)"),
        ("steps.a.output | select('notest') | list", "No test named 'notest' (in select)"),
        ("steps.a.output | rejectattr('x', 'notest') | list", "No test named 'notest'"),
    ],
)
def test_a_filter_or_test_named_in_map_or_select_is_checked_at_load(
    expression: str, said: str
) -> None:
    """They passed validation and failed only when a task ran."""
    text = (
        "name: t\nsteps:\n  - id: a\n    prompt: hi\n  - id: b\n    prompt: "
        f'"{{{{ {expression} }}}}"\n'
    )
    [p] = problems(text)
    assert p.path == "steps[1].prompt" and said in p.message, p


def test_map_select_and_their_kin_with_known_names_load() -> None:
    text = (
        "name: t\nsteps:\n  - id: a\n    prompt: hi\n  - id: b\n    prompt: "
        "\"{{ steps.a.output | map('upper') | select('odd') | map(attribute='x') "
        "| selectattr('y', 'defined') | list }}\"\n"
    )
    parse_template(text, "t.yaml")
