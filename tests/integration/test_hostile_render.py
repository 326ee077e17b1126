"""Hostile templates registered over the API: one long Jinja operation must not hold the
service's event loop, and fails its task naming the limit it hit (issue 16, item 1).

Each expression below ran to its end on the event loop before, because the sandbox's
deadline is checked only *between* Jinja operations: /health was blocked for 9-14 s, or the
service grew past a gigabyte. Each is put where a template author can put an expression: a
render step's text, ``when``, ``over``, the task's ``output`` and an llm step's ``format``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import hostile_service

#: Fast limits so the suite stays quick: the kill comes at render_timeout + GRACE (2 s).
LIMITS = "[limits]\nrender_timeout = 1.0\nrender_processes = 4"

SUM = "([range(100000)|list]*30000)|map('sum')|sum"
SLICE = "[1]|slice(20000000)|map('length')|sum"
TRANSLATE = "('a'*10000).translate({97:'b'*100000})|length"
TOJSON = "([range(100000)|list]*300)|tojson|length"

#: Any of these, named in the task's error, is a clean failure.
LIMIT_NAMES = ("render_timeout", "render_memory_mb", "max_render_chars")


def _template(name: str, step: str, output: str = "") -> str:
    body = f"name: {name}\nmodel: llama3.2\nparameters:\n  text: {{type: string}}\nsteps:\n{step}"
    return body + (f"output: {output}\n" if output else "")


def _render(expression: str) -> str:
    return f'  - id: s\n    kind: render\n    text: "{{{{ {expression} }}}}"\n'


CASES = {
    "sum": _template("h_sum", _render(SUM)),
    "slice": _template("h_slice", _render(SLICE)),
    "translate": _template("h_translate", _render(TRANSLATE)),
    "tojson": _template("h_tojson", _render(TOJSON)),
    "when": _template(
        "h_when", f'  - id: s\n    kind: render\n    when: "{SUM} > 0"\n    text: "x"\n'
    ),
    "over": _template(
        "h_over",
        f'  - id: s\n    kind: map\n    over: "[{SUM}]"\n'
        '    step:\n      prompt: "{{ item }}"\n',
    ),
    "output": _template("h_output", _render("1"), output=f'"{{{{ {SUM} }}}}"'),
    "format": _template(
        "h_format",
        f'  - id: s\n    prompt: "hi"\n    format: "{{{{ {{\'x\': {SUM}}} }}}}"\n',
    ),
}


async def test_long_single_operations_fail_their_tasks_and_never_hold_the_loop(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    async with hostile_service(tmp_path, fake_ollama.url, LIMITS) as svc:
        for name, body in CASES.items():
            response = await svc.client.post("/api/v1/templates", content=body)
            assert response.status_code == 201, (name, response.text)
        async with svc.watch() as watch:
            submitted = {case: (await svc.submit(f"h_{case}", text="x"))["id"] for case in CASES}
            finished = await asyncio.gather(*(svc.wait(i) for i in submitted.values()))
        for case, task in zip(submitted, finished, strict=True):
            assert task["status"] == "failed", (case, task)
            message = task["error"]["message"]
            assert any(limit in message for limit in LIMIT_NAMES), (case, message)
        watch.assert_held()
        # The render processes were replaced or recovered: a normal task still runs.
        ok = await svc.submit("summarize", text="Still here.")
        assert (await svc.wait(ok["id"]))["status"] == "succeeded"


PAD = " and some more words" * 3


async def test_a_large_template_is_parsed_off_the_loop(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    # About 120 KB of steps: 1.5 s or more of parsing, which used to hold the event loop (a
    # 240 KB template held it for 3.2-3.5 s per request).
    steps = "".join(
        f'  - id: s{i}\n    kind: render\n    text: "{{{{ params.text }}}} part {i}{PAD}"\n'
        for i in range(950)
    )
    body = "name: big\nparameters:\n  text: {type: string}\nsteps:\n" + steps
    assert 100_000 < len(body) < 140_000
    async with hostile_service(tmp_path, fake_ollama.url) as svc:
        async with svc.watch() as watch:
            checked = await svc.client.post("/api/v1/templates/validate", content=body)
        assert checked.status_code == 200 and checked.json()["valid"], checked.text
        watch.assert_held()
        # Registering goes the same way; a broken template's problems keep their positions.
        broken = body.replace("part 7 ", "part {{ 7 ")
        answer = await svc.client.post("/api/v1/templates", content=broken)
        assert answer.status_code == 422, answer.text
        [problem] = answer.json()["errors"]
        assert (problem["line"], problem["path"]) == (4 + 3 * 7 + 3, "steps[7].text")


#: Template files: the operator's, and rendered on the loop (a render process for each of their
#: renders would double a task's CPU), but their parameters are the caller's: what grows with
#: a parameter is bounded before it runs.
FILES = {
    # lipsum held the event loop 67 s and built a 447M-character string.
    "lip": "name: lip\nparameters: {n: {type: integer, default: 1000000}}\n"
    'steps: [{id: r, kind: render, text: "{{ lipsum(params.n) | length }}"}]\n',
    # tojson over a value the parameters make big: measured before it is encoded.
    "tojson": "name: f_tojson\nparameters: {n: {type: integer, default: 100000}, "
    "m: {type: integer, default: 300}}\n"
    "steps: [{id: r, kind: render,\n"
    '  text: "{{ ([range(params.n)|list]*params.m)|tojson|length }}"}]\n',
}


async def test_a_template_file_cannot_hold_the_loop_either(
    tmp_path: Path, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tpl"
    folder.mkdir()
    for name, body in FILES.items():
        (folder / f"{name}.yaml").write_text(body)
    monkeypatch.setenv("ORCHESTRA_TEMPLATES__DIRS", f'["{folder}"]')
    async with hostile_service(tmp_path, fake_ollama.url, LIMITS) as svc:
        async with svc.watch() as watch:
            submitted = [(await svc.submit(name))["id"] for name in ("lip", "f_tojson")]
            finished = await asyncio.gather(*(svc.wait(i) for i in submitted))
        for task in finished:
            assert task["status"] == "failed", task
            message = task["error"]["message"]
            assert any(limit in message for limit in LIMIT_NAMES), message
        assert "max_render_chars" in finished[0]["error"]["message"]
        watch.assert_held()
