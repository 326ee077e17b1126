"""The dashboard's run form and template editor over real HTTP: parameters that share a name
with an option, bad options, and registrations the service refuses."""

from __future__ import annotations

import re
from html import unescape

from tests.conftest import Service

SAME_SITE = {"sec-fetch-site": "same-origin"}

#: A template whose parameters are called like the run form's options.
OPTION_NAMES = """\
name: option-names
model: llama3.2
parameters:
  model: {type: string, required: true}
  priority: {type: integer, minimum: 1, maximum: 5}
steps:
  - id: show
    kind: render
    text: '{{ params.model }} {{ params.priority }}'
"""


async def _register(service: Service, text: str) -> None:
    answer = await service.client.post("/api/v1/templates", content=text)
    assert answer.status_code == 201, answer.text


def _names(html: str) -> list[str]:
    """The names of the run form's controls, in order."""
    form = html[html.index('id="run-form"') :]
    form = form[: form.index("</form>")]
    return re.findall(r'<(?:input|select|textarea)[^>]* name="([^"]+)"', form)


def _errors(html: str) -> dict[str, str]:
    """The messages shown beside the form's controls, by the control's id."""
    found = re.findall(r'<small id="([a-z_.-]+)-error" class="error field-error">([^<]+)<', html)
    return {control: unescape(message) for control, message in found}


def _editor_text(html: str) -> str:
    match = re.search(r'<textarea id="yaml"[^>]*>(.*?)</textarea>', html, re.DOTALL)
    assert match, html[:2000]
    return unescape(match.group(1))


def _editor_error(html: str) -> str:
    match = re.search(r'id="editor-error">([^<]*)<', html)
    assert match, html[:2000]
    return unescape(match.group(1))


async def _run(service: Service, name: str, form: dict[str, str]) -> tuple[int, str, str]:
    answer = await service.client.post(f"/ui/templates/{name}/run", data=form, headers=SAME_SITE)
    return answer.status_code, answer.headers.get("location", ""), answer.text


# -- parameters called model or priority -----------------------------------------------------


async def test_parameters_named_model_and_priority_have_their_own_controls(
    service: Service,
) -> None:
    await _register(service, OPTION_NAMES)
    page = await service.client.get("/ui/templates/option-names")
    names = _names(page.text)
    assert names.count("model") == 1 and names.count("priority") == 1  # the parameters
    assert len(names) == len(set(names)) == 4  # and two options, each named once


async def test_parameters_named_model_and_priority_reach_the_task_apart_from_the_options(
    service: Service,
) -> None:
    await _register(service, OPTION_NAMES)
    page = await service.client.get("/ui/templates/option-names")
    options = [n for n in _names(page.text) if n not in ("model", "priority")]
    model_option, priority_option = sorted(options)
    assert "model" in model_option and "priority" in priority_option

    status, location, text = await _run(
        service, "option-names", {"model": "the param", "priority": "3"}
    )
    assert status == 303, _errors(text)
    task = await service.wait(int(location.rsplit("/", 1)[1]))
    assert task["params"] == {"model": "the param", "priority": 3}
    assert (task["model"], task["priority"]) == ("llama3.2", 0)  # the template's, the default
    assert task["status"] == "succeeded" and task["result"] == "the param 3"

    status, location, text = await _run(
        service,
        "option-names",
        {"model": "p", model_option: "qwen2.5", priority_option: "9"},
    )
    assert status == 303, _errors(text)
    task = await service.wait(int(location.rsplit("/", 1)[1]))
    assert task["params"] == {"model": "p"}
    assert (task["model"], task["priority"]) == ("qwen2.5", 9)


async def test_run_again_fills_both_the_parameters_and_the_options(service: Service) -> None:
    await _register(service, OPTION_NAMES)
    answer = await service.client.post(
        "/api/v1/tasks",
        json={
            "template": "option-names",
            "params": {"model": "param-model", "priority": 4},
            "model": "qwen2.5",
            "priority": 17,
        },
    )
    assert answer.status_code == 201, answer.text
    page = await service.client.get(
        "/ui/templates/option-names", params={"from": answer.json()["id"]}
    )
    assert page.status_code == 200
    assert re.search(r'id="param-model" name="model"[^>]*>param-model</textarea>', page.text)
    assert re.search(r'id="param-priority" name="priority" value="4"', page.text)
    assert re.search(r'id="opt-model" name="[^"]+" value="qwen2.5"', page.text)
    assert re.search(r'id="opt-priority" name="[^"]+" type="number" step="1" value="17"', page.text)


# -- a bad priority ------------------------------------------------------------------------


async def test_a_bad_priority_is_shown_beside_its_input_with_the_parameters_problems(
    service: Service,
) -> None:
    page = await service.client.get("/ui/templates/summarize")
    priority_option = next(n for n in _names(page.text) if "priority" in n)
    for typed in ("soon", "2.5", "5000"):
        status, _, text = await _run(
            service, "summarize", {"text": "", "sentences": "5", priority_option: typed}
        )
        assert status == 422
        errors = _errors(text)
        assert "-1000" in errors["opt-priority"] and "1000" in errors["opt-priority"]
        assert 'id="opt-priority"' in text and 'aria-invalid="true"' in text
        assert f'value="{typed}"' in text  # kept as typed
        assert "required" in errors["param-text"]  # every problem at once
    tasks = (await service.client.get("/api/v1/tasks")).json()["items"]
    assert tasks == []


async def test_a_bad_priority_alone_still_stops_the_run(service: Service) -> None:
    page = await service.client.get("/ui/templates/summarize")
    priority_option = next(n for n in _names(page.text) if "priority" in n)
    status, _, text = await _run(service, "summarize", {"text": "fine", priority_option: "x"})
    assert status == 422
    assert set(_errors(text)) == {"opt-priority"}
    assert 'role="alert" id="form-error"' in text
    assert (await service.client.get("/api/v1/tasks")).json()["items"] == []


# -- the editor's refusals -----------------------------------------------------------------


async def test_registering_an_empty_template_keeps_the_editor(service: Service) -> None:
    answer = await service.client.post("/ui/templates", data={"yaml": "  \n"}, headers=SAME_SITE)
    assert answer.status_code == 400
    assert _editor_text(answer.text) == "  \n"
    assert "empty" in _editor_error(answer.text)


async def test_a_name_taken_by_a_built_in_keeps_the_text_and_names_no_server_path(
    service: Service,
) -> None:
    text = "name: summarize\nsteps:\n  - id: a\n    kind: render\n    text: mine\n"
    api = await service.client.post("/api/v1/templates", content=text)
    assert api.status_code == 409
    answer = await service.client.post("/ui/templates", data={"yaml": text}, headers=SAME_SITE)
    assert answer.status_code == 409
    assert _editor_text(answer.text) == text
    message = _editor_error(answer.text)
    assert "summarize" in message and "another name" in message
    assert "/" not in message and "\\" not in message


async def test_a_template_over_the_size_limit_keeps_the_editor(service: Service) -> None:
    limit = service.app.runtime.catalog.limits.max_template_bytes
    text = "name: big\ndescription: " + "x" * limit + "\n"
    answer = await service.client.post("/ui/templates", data={"yaml": text}, headers=SAME_SITE)
    assert answer.status_code == 413
    assert _editor_text(answer.text) == text
    assert "max_template_bytes" in _editor_error(answer.text)


async def test_checking_a_template_over_the_size_limit_says_so_in_the_problems(
    service: Service,
) -> None:
    limit = service.app.runtime.catalog.limits.max_template_bytes
    text = "name: big\ndescription: " + "x" * limit + "\n"
    answer = await service.client.post(
        "/ui/templates/validate", data={"yaml": text}, headers=SAME_SITE
    )
    assert answer.status_code == 200
    assert 'id="valid"' not in answer.text
    assert "max_template_bytes" in answer.text and "1 problem" in answer.text


async def test_a_refused_registration_shows_its_problems_and_keeps_the_text(
    service: Service,
) -> None:
    text = "name: mine\nsteps:\n  - id: a\n    txet: hi\n"
    answer = await service.client.post("/ui/templates", data={"yaml": text}, headers=SAME_SITE)
    assert answer.status_code == 422
    assert _editor_text(answer.text) == text
    assert re.search(r'data-line="4" data-column="5"', answer.text)
    assert 'id="editor-error"' not in answer.text


async def test_a_refused_edit_stays_the_edit_of_its_template(service: Service) -> None:
    """The editor opened on a template ("Edit mine") and refused (422, 409) was shown as the
    editor of a new template; it stays the edit of the one it was opened on."""
    await _register(service, "name: mine\nsteps:\n  - id: a\n    kind: render\n    text: hi\n")
    editor = (await service.client.get("/ui/templates/mine/edit")).text
    assert "<h1>Edit mine</h1>" in editor
    form = editor.split('id="editor-form"', 1)[1].split("</form>", 1)[0]
    hidden = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))
    for text, status in (
        ("name: mine\nsteps:\n  - id: a\n    txet: hi\n", 422),
        ("name: summarize\nsteps:\n  - id: a\n    kind: render\n    text: mine\n", 409),
    ):
        answer = await service.client.post(
            "/ui/templates", data={**hidden, "yaml": text}, headers=SAME_SITE
        )
        assert answer.status_code == status, answer.text[:300]
        assert "<h1>Edit mine</h1>" in answer.text and _editor_text(answer.text) == text


# -- the templates pages ----------------------------------------------------------------------

VERSIONED = """\
name: versioned
description: Says hello {n}.
parameters:
  who: {type: string, default: world, max_length: 40}
  mood: {type: string, enum: [calm, loud], default: loud}
  times: {type: integer, minimum: 1, maximum: 9, default: 2}
steps:
  - id: hello
    kind: render
    text: 'hello {{ params.who }}'
"""


async def test_a_templates_page_shows_its_source_versions_and_a_form_from_its_schema(
    service: Service,
) -> None:
    for n in (1, 2):
        await _register(service, VERSIONED.replace("{n}", f"in version {n}"))
    listing = (await service.client.get("/ui/templates")).text
    assert re.search(r'href="/ui/templates/versioned">versioned</a></td><td>2</td>', listing)
    assert "Says hello in version 2." in listing
    page = (await service.client.get("/ui/templates/versioned")).text
    assert "Says hello in version 2." in unescape(page.split('id="source-h"', 1)[1])
    versions = page.split('id="versions-h"', 1)[1]
    assert re.findall(r'href="/ui/templates/versioned\?version=(\d)"', versions) == ["1", "2"]
    assert 'version=2" aria-current="true"' in versions
    older = (await service.client.get("/ui/templates/versioned", params={"version": 1})).text
    assert "Says hello in version 1." in unescape(older.split('id="source-h"', 1)[1])
    # The form: an enum is a select with its default chosen, bounds and lengths are kept.
    mood = re.search(r'<select id="param-mood" name="mood"[^>]*>(.*?)</select>', page, re.S)
    assert mood, page
    options = [
        tuple(unescape(part) for part in option)
        for option in re.findall(r'<option value="([^"]*)"( selected)?>([^<]*)<', mood.group(1))
    ]
    assert options == [("", "", "—"), ('"calm"', "", "calm"), ('"loud"', " selected", "loud")]
    times = re.search(r'<input type="number" id="param-times"[^>]*>', page)
    assert times and 'value="2"' in times.group(0)
    assert 'min="1"' in times.group(0) and 'max="9"' in times.group(0)
    who = re.search(r'<input type="text" id="param-who"[^>]*>', page)
    assert who and 'value="world"' in who.group(0) and 'maxlength="40"' in who.group(0)


# -- a problem inside a parameter --------------------------------------------------------------

PEOPLE = """\
name: people
model: llama3.2
parameters:
  people:
    type: array
    required: true
    items: {type: object, required: [name], properties: {name: {type: string}}}
steps:
  - id: show
    kind: render
    text: '{{ params.people | length }}'
"""


async def test_a_problem_inside_a_parameter_shows_where_it_is(service: Service) -> None:
    """The API says ``params.people[1].name: is required``; the form showed "is required"
    under people, not which item lacked what."""
    await _register(service, PEOPLE)
    api = await service.client.post(
        "/api/v1/tasks", json={"template": "people", "params": {"people": [{"name": "a"}, {}]}}
    )
    assert api.status_code == 422, api.text
    [problem] = api.json()["fields"]
    assert problem["field"] == "params.people[1].name"

    status, _, text = await _run(service, "people", {"people": '{"name": "a"}\n{}'})
    assert status == 422, text[:2000]
    assert _errors(text)["param-people"] == f"[1].name: {problem['message']}"
