"""Catastrophic regexes (issue 16, item 2): patterns run on RE2, in linear time.

Python's backtracking ``re`` takes time that doubles with each extra character on a pattern
such as ``^(a+)+$`` and a string of ``a``s that ends in ``!``: 28 of them held the event loop
(and /health) for 7.6 s while a template was validated, 40 for hours when a task was submitted.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from tests.conftest import Service
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import hostile_service

NASTY = "a" * 40 + "!"


def _template(name: str, pattern: str, default: str | None = None) -> str:
    extra = f", default: {msgspec.json.encode(default).decode()}" if default is not None else ""
    return (
        f"name: {name}\n"
        "parameters:\n"
        f"  code: {{type: string, pattern: '{pattern}'{extra}}}\n"
        "steps:\n"
        "  - id: s\n"
        "    kind: render\n"
        '    text: "{{ params.code }}"\n'
    )


async def test_validating_a_backtracking_pattern_with_a_nasty_default_is_quick(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    body = _template("nasty", "^(a+)+$", default=NASTY)
    async with hostile_service(tmp_path, fake_ollama.url) as svc:
        async with svc.watch() as watch:
            response = await svc.client.post("/api/v1/templates/validate", content=body)
        watch.assert_held()
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["valid"] is False
    [problem] = answer["errors"]
    assert problem["path"] == "parameters.code.default"
    assert "does not match" in problem["message"]
    assert (problem["line"], problem["column"]) == (3, body.splitlines()[2].index('"a') + 1)


async def test_a_nasty_param_against_a_backtracking_pattern_gets_a_quick_422(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url) as svc:
        registered = await svc.client.post(
            "/api/v1/templates", content=_template("codes", "^(a+)+$")
        )
        assert registered.status_code == 201, registered.text
        async with svc.watch() as watch:
            response = await svc.client.post(
                "/api/v1/tasks", json={"template": "codes", "params": {"code": NASTY}}
            )
            good = await svc.submit("codes", code="a" * 40)
        watch.assert_held()
        assert response.status_code == 422, response.text
        [field] = response.json()["fields"]
        assert field["field"] == "params.code"
        assert "does not match" in field["message"]
        assert (await svc.wait(good["id"]))["status"] == "succeeded"


FORMAT = """\
name: shaped
model: llama3.2
steps:
  - id: s
    prompt: "Give a code."
    repair_attempts: 1
    format:
      type: object
      properties:
        code: {type: string, pattern: '^(a+)+$'}
      patternProperties:
        '^(b+)+$': {type: string}
      additionalProperties: false
"""


async def test_a_nasty_model_reply_against_a_format_pattern_fails_quickly(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply = lambda request: msgspec.json.encode(
        {"code": NASTY, "b" * 40 + "!": "x"}
    ).decode()
    async with hostile_service(tmp_path, fake_ollama.url) as svc:
        registered = await svc.client.post("/api/v1/templates", content=FORMAT)
        assert registered.status_code == 201, registered.text
        async with svc.watch() as watch:
            task = await svc.submit("shaped")
            done = await svc.wait(task["id"])
        watch.assert_held()
    assert done["status"] == "failed", done
    message = done["error"]["message"]
    assert "code" in message and "does not match" in message, message
    assert "b" * 40 + "!" in message, message


BACKREFERENCE = """\
name: twice
parameters:
  word:
    type: string
    pattern: '^(\\w+) \\1$'
steps:
  - id: s
    kind: render
    text: "{{ params.word }}"
"""

SCHEMA_LOOKAROUND = """\
name: peek
model: llama3.2
steps:
  - id: s
    prompt: "hi"
    format:
      type: object
      patternProperties:
        '^(?!x)': {type: string}
"""


async def test_a_pattern_re2_cannot_take_is_refused_with_its_position(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url) as svc:
        for path in ("/api/v1/templates/validate", "/api/v1/templates"):
            response = await svc.client.post(path, content=BACKREFERENCE)
            assert response.status_code in (200, 422), response.text
            [problem] = response.json()["errors"]
            assert problem["path"] == "parameters.word.pattern"
            assert (problem["line"], problem["column"]) == (5, 14)
            assert "RE2" in problem["message"] and "backreference" in problem["message"]
        response = await svc.client.post("/api/v1/templates/validate", content=SCHEMA_LOOKAROUND)
        [problem] = response.json()["errors"]
        assert problem["path"] == "steps[0].format.patternProperties.^(?!x)"
        assert (problem["line"], problem["column"]) == (9, 9)
        assert "lookaround" in problem["message"]


async def test_a_step_schema_with_a_thousand_nested_groups_is_checked_not_a_crash(
    service: Service,
) -> None:
    # jsonschema's own schema check compiled the pattern with Python's re: RecursionError.
    nested = "(" * 1000 + "a" + ")" * 1000
    body = (
        "name: deep_pattern\nmodel: llama3.2\nsteps:\n  - id: s\n    prompt: hi\n"
        f"    format:\n      type: object\n      properties:\n        x: {{type: string, "
        f"pattern: '{nested}'}}\n"
    )
    checked = await service.client.post("/api/v1/templates/validate", content=body)
    assert checked.status_code == 200 and checked.json()["valid"], checked.text  # RE2 takes it
    assert (await service.client.post("/api/v1/templates", content=body)).status_code == 201
