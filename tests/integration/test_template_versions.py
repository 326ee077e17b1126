"""Registering templates through the API: versions, deletion, clashes, reload."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import msgspec
import pytest

from orchestra.config import Settings, TemplateSettings
from orchestra.errors import TemplateError
from tests.conftest import Service, StartService
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.fixtures.startup import preflight

V1 = """\
name: greet
model: llama3.2
parameters:
  who: {type: string, required: true}
steps:
  - id: hello
    prompt: "Say hello to {{ params.who }}"
"""
V2 = V1.replace("Say hello to", "Say goodbye to")


async def test_an_idempotent_replay_answers_with_its_task_after_the_template_changed(
    service: Service,
) -> None:
    """A submit retried after a network error must find the task its key made, even when a
    new version of the template asks for another parameter, or the template was deleted."""
    assert (await register(service, V1))[0] == 201
    body = {"template": "greet", "params": {"who": "Ada"}, "idempotency_key": "order-7"}
    first = await service.client.post("/api/v1/tasks", json=body)
    assert first.status_code == 201, first.text
    stricter = V1.replace(
        "  who: {type: string, required: true}\n",
        "  who: {type: string, required: true}\n  lang: {type: string, required: true}\n",
    )
    assert (await register(service, stricter))[0] == 201
    fresh = await service.client.post("/api/v1/tasks", json={**body, "idempotency_key": "new"})
    assert fresh.status_code == 422  # a new submit is held to version 2
    again = await service.client.post("/api/v1/tasks", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert (await service.client.delete("/api/v1/templates/greet")).status_code == 204
    after = await service.client.post("/api/v1/tasks", json=body)
    assert after.status_code == 200, after.text
    assert after.json()["id"] == first.json()["id"]


async def test_a_template_that_names_no_model_runs_on_the_default_chain(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """No model on the step, the task or the template: the logical name ``default`` (its
    chain's first entry, Ollama's llama3.2, here) answers, as its name promises."""
    modelless = V1.replace("model: llama3.2\n", "")
    assert "model" not in modelless
    assert (await register(service, modelless))[0] == 201
    done = await service.wait((await service.submit("greet", who="Ada"))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["steps"][0]["model"] == "ollama/llama3.2"
    assert [r["model"] for r in fake_ollama.requests] == ["llama3.2"]


async def register(svc: Service, text: str) -> tuple[int, dict[str, object]]:
    response = await svc.client.post("/api/v1/templates", content=text)
    return response.status_code, response.json()


async def test_registering_creates_immutable_versions(
    service: Service, fake_ollama: FakeOllama
) -> None:
    assert (await register(service, V1))[0] == 201
    status, same = await register(service, V1)
    assert (status, same["version"]) == (200, 1)  # same body: nothing new
    status, second = await register(service, V2)
    assert (status, second["version"], second["origin"]) == (201, 2, "api")
    versions = (await service.client.get("/api/v1/templates/greet/versions")).json()
    assert [v["version"] for v in versions["items"]] == [1, 2]
    old = (await service.client.get("/api/v1/templates/greet", params={"version": 1})).json()
    assert old["version"] == 1

    latest = await service.submit("greet", who="Ada")
    pinned = await service.client.post(
        "/api/v1/tasks", json={"template": "greet", "template_version": 1, "params": {"who": "Bo"}}
    )
    assert pinned.status_code == 201
    done = [await service.wait(latest["id"]), await service.wait(pinned.json()["id"])]
    assert [d["template_version"] for d in done] == [2, 1]
    prompts = sorted(r["messages"][-1]["content"] for r in fake_ollama.requests)
    assert prompts == ["Say goodbye to Ada", "Say hello to Bo"]
    missing = await service.client.post(
        "/api/v1/tasks", json={"template": "greet", "template_version": 9, "params": {"who": "x"}}
    )
    assert missing.status_code == 404 and "versions: 1, 2" in missing.json()["message"]


async def test_an_invalid_template_is_422_with_positions(service: Service) -> None:
    status, body = await register(service, V1.replace("{{ params.who }}", "{{ params.whom }}"))
    assert status == 422
    assert body["code"] == "invalid_template"
    [problem] = body["errors"]
    assert (problem["line"], problem["path"]) == (7, "steps[0].prompt")
    assert "unknown parameter 'whom'" in problem["message"]


async def test_deleted_templates_take_no_new_tasks_but_old_ones_finish(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 0.5
    await register(service, V1)
    task = await service.submit("greet", who="Ada")
    assert (await service.client.delete("/api/v1/templates/greet")).status_code == 204
    refused = await service.client.post(
        "/api/v1/tasks", json={"template": "greet", "params": {"who": "x"}}
    )
    assert refused.status_code == 404
    assert (await service.wait(task["id"]))["status"] == "succeeded"
    names = [t["name"] for t in (await service.client.get("/api/v1/templates")).json()["items"]]
    assert "greet" not in names
    assert (await service.client.delete("/api/v1/templates/greet")).status_code == 404
    assert (await register(service, V1))[1]["version"] == 2  # back, as a new version


async def test_file_templates_cannot_be_registered_over_or_deleted(service: Service) -> None:
    status, body = await register(service, "name: summarize\nsteps:\n  - id: a\n    prompt: hi\n")
    assert status == 409 and "is built in" in body["message"], body
    assert "register it under another name" in body["message"]
    response = await service.client.delete("/api/v1/templates/summarize")
    assert response.status_code == 409
    # Shipped in the package: no file of the user's to remove, so no such advice.
    said = response.json()["message"]
    assert "is built in" in said and "cannot be deleted" in said and "remove" not in said, said


async def test_registered_templates_survive_a_restart_and_clash_with_new_files(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    async with start_service(settings) as svc:
        await register(svc, V1)
    async with start_service(settings) as svc:
        assert (await svc.client.get("/api/v1/templates/greet")).json()["version"] == 1
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "greet.yaml").write_text(V2)
    clashing = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    with pytest.raises(TemplateError, match="also registered through the API"):
        await preflight(clashing)


async def test_reload_by_endpoint_and_by_sighup(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    with_dir = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    async with start_service(with_dir) as svc:
        (folder / "one.yaml").write_text(V1.replace("greet", "one"))
        reloaded = await svc.client.post("/api/v1/templates/reload")
        assert reloaded.status_code == 200
        assert "one" in [t["name"] for t in reloaded.json()["items"]]

        (folder / "broken.yaml").write_text("name: broken\nsteps: nope\n")
        (folder / "tabbed.yaml").write_text("name: tabbed\nsteps:\n\t- id: a\n")
        refused = await svc.client.post("/api/v1/templates/reload")
        assert refused.status_code == 422
        # Each problem names its file: two broken files, told apart.
        errors = {Path(e["file"]).name: e for e in refused.json()["errors"]}
        assert set(errors) == {"broken.yaml", "tabbed.yaml"}, errors
        assert errors["broken.yaml"]["path"] == "steps" and errors["tabbed.yaml"]["line"] == 3
        (folder / "broken.yaml").unlink()
        (folder / "tabbed.yaml").unlink()

        (folder / "two.yaml").write_text(V1.replace("greet", "two"))
        os.kill(os.getpid(), signal.SIGHUP)

        async def has_two() -> bool:
            return (await svc.client.get("/api/v1/templates/two")).status_code == 200

        await wait_until(has_two, timeout=5)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ('{$ref: "#/$defs/x", $defs: {x: {$ref: "#/$defs/x"}}}', "refers back to itself"),
        ('{$ref: "http://example.com/s.json"}', "only references inside the schema"),
    ],
)
async def test_a_parameter_schema_with_a_bad_ref_is_refused_when_registered(
    service: Service, items: str, message: str
) -> None:
    body = V1.replace(
        "who: {type: string, required: true}", f"who: {{type: array, items: {items}}}"
    )
    status, answer = await register(service, body.replace("{{ params.who }}", "them"))
    assert status == 422, answer
    problem = answer["errors"][0]
    assert problem["path"].startswith("parameters.who.items") and problem["line"] == 4
    assert message in problem["message"]


async def test_a_name_ending_in_a_newline_is_refused(service: Service) -> None:
    status, answer = await register(service, V1.replace("name: greet", 'name: "nl3\\n"'))
    assert status == 422, answer
    assert answer["errors"][0]["path"] == "name"
    listed = (await service.client.get("/api/v1/templates")).json()["items"]
    assert not [t for t in listed if t["name"].startswith("nl3")]


async def test_merge_keys_in_a_template_file_load_on_reload(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    merged = (
        "name: merged\nsteps:\n  - &base {id: a, kind: render, text: hi}\n"
        "  - <<: *base\n    id: b\n"
    )
    with_dir = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    async with start_service(with_dir) as svc:
        (folder / "merged.yaml").write_text(merged)
        reloaded = await svc.client.post("/api/v1/templates/reload")
        assert reloaded.status_code == 200, reloaded.text
        done = await svc.wait((await svc.submit("merged"))["id"])
        assert done["status"] == "succeeded" and [s["id"] for s in done["steps"]] == ["a", "b"]
        (folder / "merged.yaml").write_text(merged.replace("text: hi", "text: '{{ nope }}'"))
        refused = await svc.client.post("/api/v1/templates/reload")
        assert refused.status_code == 422, refused.text
        lines = {(p["path"], p["line"]) for p in refused.json()["errors"]}
        assert ("steps[1].text", 4) in lines  # at the merge


async def test_every_version_listed_of_a_file_template_can_be_shown(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    """A file changed to version 2 and back to 1: /versions listed 2, and asking for it was a
    404. It is shown; a new task still gets the file's current version only."""
    folder = tmp_path / "mine"
    folder.mkdir()
    with_dir = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    file = folder / "greet.yaml"
    file.write_text(V1)
    async with start_service(with_dir) as svc:
        file.write_text(V2 + "version: 2\n")
        assert (await svc.client.post("/api/v1/templates/reload")).status_code == 200
        file.write_text(V1)
        assert (await svc.client.post("/api/v1/templates/reload")).status_code == 200
        listed = (await svc.client.get("/api/v1/templates/greet/versions")).json()["items"]
        assert [t["version"] for t in listed] == [1, 2]
        shown = await svc.client.get("/api/v1/templates/greet", params={"version": 2})
        assert shown.status_code == 200, shown.text
        assert shown.json()["version"] == 2
        page = await svc.client.get("/ui/templates/greet", params={"version": 2})
        assert page.status_code == 200
        assert re.search(r"<small[^>]*>version 2 ·", page.text), page.text  # the one shown
        # A file's name cannot be registered (409): validating it says so (review).
        checked = await svc.client.post("/api/v1/templates/validate", content=V1)
        [problem] = checked.json()["errors"]
        assert "is defined by the file" in problem["message"] and problem["path"] == "name"
        missing = await svc.client.get("/api/v1/templates/greet", params={"version": 3})
        assert missing.status_code == 404
        body = {"template": "greet", "params": {"who": "Ada"}, "template_version": 2}
        refused = await svc.client.post("/api/v1/tasks", json=body)
        assert refused.status_code == 404
        assert "version 2 is not available" in refused.json()["message"]
