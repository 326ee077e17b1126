"""Findings of an exploratory test of templates, through a running service: odd YAML, deep
Jinja, versions and durations past their bounds are problems with positions on every entry
point (validate, register, reload, SIGHUP's reload, the CLI); the wrapped filters work in a
render process; lone surrogates fail a task with a reason, never as an internal error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestra.config import Settings, TemplateSettings
from tests.conftest import Service, StartService
from tests.integration.test_cli import run_cli

GOOD = "name: good\nsteps:\n  - id: a\n    kind: render\n    text: ok\n"
MERGE_LOOP = "name: loop\nx: &x\n  <<: *x\nsteps:\n  - id: a\n    prompt: hi\n"
DEEP = "(" * 500 + "1" + ")" * 500
DEEP_EXPRESSION = f'name: deep\nsteps:\n  - id: a\n    kind: render\n    text: "{{{{ {DEEP} }}}}"\n'
BIG_VERSION = "name: big\nversion: 99999999999999999999999999\nsteps:\n  - id: a\n    prompt: hi\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "templates"
    path.mkdir()
    (path / "good.yaml").write_text(GOOD)
    return path


@pytest.fixture
async def svc(
    settings: Settings, folder: Path, start_service: StartService
) -> AsyncIterator[Service]:
    with_files = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    async with start_service(with_files) as service:
        yield service


def positions(body: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    return [
        (e["file"].rsplit("/", 1)[-1], e["line"], e["column"], e["message"]) for e in body["errors"]
    ]


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        (MERGE_LOOP, 3, 3, "merge key"),
        (DEEP_EXPRESSION, 5, 11, "nests too deeply"),
        (BIG_VERSION, 2, 10, "from 1 to 9007199254740991"),
        (
            "name: d\nretry: {initial_delay: 99999999999999h, max_delay: 99999999999999h}\n"
            "steps:\n  - id: a\n    prompt: hi\n",
            2,
            24,
            "at most 8760h",
        ),
        ("name: d\ntimeout: .nan\nsteps:\n  - id: a\n    prompt: hi\n", 2, 10, "finite"),
        ('name: s\nsteps:\n  - id: a\n    prompt: "hi \\ud800 there"\n', 4, 13, "\\ud800"),
        (
            "name: o\nsteps:\n  - id: a\n    prompt: hi\n    options: {temperature: .nan}\n",
            5,
            28,
            ".nan",
        ),
    ],
)
async def test_validate_and_register_report_malformed_templates_at_their_position(
    svc: Service, text: str, line: int, column: int, words: str
) -> None:
    for route, status in (("/api/v1/templates/validate", 200), ("/api/v1/templates", 422)):
        response = await svc.client.post(route, content=text.encode())
        assert response.status_code == status, (route, response.text)
        assert response.json().get("valid", False) is False
        (_, at_line, at_column, message), *_ = positions(response.json())
        assert (at_line, at_column) == (line, column), message
        assert words in message
        assert "render process failed" not in message


@pytest.mark.parametrize(
    ("name", "text", "line", "column"),
    [
        ("loop.yaml", MERGE_LOOP, 3, 3),
        ("deep.yaml", DEEP_EXPRESSION, 5, 11),
        ("big.yaml", BIG_VERSION, 2, 10),
    ],
)
async def test_a_reload_reports_a_malformed_file_at_its_position_and_keeps_the_old_set(
    svc: Service, folder: Path, name: str, text: str, line: int, column: int
) -> None:
    (folder / name).write_text(text)
    response = await svc.client.post("/api/v1/templates/reload")
    assert response.status_code == 422, response.text
    [(file, at_line, at_column, _)] = positions(response.json())
    assert (file, at_line, at_column) == (name, line, column)
    # SIGHUP's reload logs the problem and carries on, and the old set still serves.
    svc.app.runtime.reload_templates()
    task = await svc.submit("good")
    assert (await svc.wait(task["id"]))["status"] == "succeeded"


async def test_sighups_reload_survives_a_failure_that_is_not_a_template_problem(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise AttributeError("'NoneType' object has no attribute 'add_referent'")

    monkeypatch.setattr(svc.app.runtime.catalog, "reload", broken)
    svc.app.runtime.reload_templates()  # logged, not raised into the signal handler
    assert (await svc.client.get("/api/v1/templates/good")).status_code == 200


async def test_templates_validate_reports_a_merge_loop_and_a_deep_expression(
    tmp_path: Path,
) -> None:
    loop, deep = tmp_path / "loop.yaml", tmp_path / "deep.yaml"
    loop.write_text(MERGE_LOOP)
    deep.write_text(DEEP_EXPRESSION)
    code, _, err = await run_cli("templates", "validate", str(loop), str(deep))
    assert code == 1, err
    assert f"{loop}:3:3: YAML: this merge key" in err
    assert f"{deep}:5:11: steps[0].text: Jinja: this nests too deeply" in err
    assert "Traceback" not in err


WRAPPED = {
    "wordwrap": ("{{ 'abc def ghi'|wordwrap(3) }}", "abc\ndef\nghi"),
    "slice": ("{{ [1,2,3]|slice(2)|list }}", "[[1, 2], [3]]"),
}


async def test_wordwrap_and_slice_work_in_a_registered_template(svc: Service) -> None:
    for name, (text, expected) in WRAPPED.items():
        body = (
            f"name: w_{name}\nsteps:\n  - id: a\n    kind: render\n    text: {json.dumps(text)}\n"
        )
        response = await svc.client.post("/api/v1/templates", content=body.encode())
        assert response.status_code == 201, response.text
        task = await svc.wait((await svc.submit(f"w_{name}"))["id"])
        assert (task["status"], task["result"]) == ("succeeded", expected), task


JSON_STEPS = {
    "j_parse": ("    kind: parse_json\n    input: params.t\n", "invalid_output"),
    "j_filter": ('    kind: render\n    text: "{{ (params.t | from_json).a }}"\n', "render_failed"),
    "j_jinja": ("    kind: render\n    text: \"{{ '%c' % 55296 }}\"\n", "render_failed"),
}


async def test_a_lone_surrogate_fails_its_step_with_the_reason(svc: Service) -> None:
    for name, (step, code) in JSON_STEPS.items():
        body = f"name: {name}\nparameters:\n  t: {{type: string}}\nsteps:\n  - id: a\n{step}"
        response = await svc.client.post("/api/v1/templates", content=body.encode())
        assert response.status_code == 201, response.text
        task = await svc.wait((await svc.submit(name, t='{"a": "\\ud800"}'))["id"])
        assert task["status"] == "failed", task
        assert task["error"]["type"] == code, task["error"]
        assert "\\ud800" in task["error"]["message"], task["error"]
        assert "surrogate" in task["error"]["message"]


async def test_a_lone_surrogate_escape_in_the_body_is_named(svc: Service) -> None:
    body = b'{"template": "good", "params": {"t": "\\ud800"}}'
    response = await svc.client.post(
        "/api/v1/tasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert "\\ud800 at byte 38" in message and "surrogate" in message, message
    assert "truncated" not in message


async def test_an_integer_no_double_holds_is_refused_for_a_number_parameter(
    svc: Service,
) -> None:
    body = "name: num\nparameters:\n  n: {type: number}\n" + GOOD.split("\n", 1)[1]
    assert (await svc.client.post("/api/v1/templates", content=body.encode())).status_code == 201
    raw = '{"template": "num", "params": {"n": ' + "9" * 400 + "}}"
    response = await svc.client.post(
        "/api/v1/tasks", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    fields = response.json()["fields"]
    assert [f["field"] for f in fields] == ["params.n"], fields
    assert "64-bit float" in fields[0]["message"]
