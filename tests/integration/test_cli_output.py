"""What the CLI prints for scripts and for people: the id of a submitted task alone on stdout,
JSON with tidy numbers, empty lists said on stderr, a problem of a template once, how to give
a refused key, and an exit code per kind of failure (docs/install.md, "Exit codes")."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

from orchestra.config import Settings, TemplateSettings
from tests.conftest import Service, StartService, make_keys, make_settings, revoke_key
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.integration.test_cli import run_cli

REPO = Path(__file__).resolve().parents[2]
#: Nothing listens here.
NOWHERE = "http://127.0.0.1:9"


async def test_submit_prints_the_id_alone_on_stdout_and_with_json_the_task(
    service: Service,
) -> None:
    code, out, err = await run_cli(
        "submit", "summarize", "-p", "text=later", "--delay", "60", "--url", service.url
    )
    assert code == 0 and re.fullmatch(r"\d+\n", out), (out, err)
    assert err.startswith(f"task {out.strip()} queued")  # the person's line stays on stderr

    code, out, _ = await run_cli(
        "submit", "summarize", "-p", "text=later", "--delay", "60", "--json", "--url", service.url
    )
    task = json.loads(out)
    assert code == 0 and task["status"] == "queued" and task["template"] == "summarize"
    assert task == await _api(service, f"/api/v1/tasks/{task['id']}")

    code, out, _ = await run_cli(
        "submit", "summarize", "-p", "text=now", "--wait", "--json", "--url", service.url
    )
    done = json.loads(out)
    assert code == 0 and done["status"] == "succeeded" and "now" in done["result"]


async def _api(service: Service, path: str) -> Any:
    response = await service.client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


async def test_json_output_rounds_milliseconds_to_a_tenth(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """A duration is a difference of two clock readings: 1019.2300000000001 before."""
    fake_ollama.latency = 0.0123
    for n in range(3):
        await service.wait((await service.submit("summarize", text=f"t{n}"))["id"])
    code, out, _ = await run_cli("tasks", "list", "--json", "--url", service.url)
    listed = [json.loads(line) for line in out.splitlines()]
    code_show, shown, _ = await run_cli("tasks", "show", "1", "--url", service.url)
    assert code == code_show == 0 and len(listed) == 3
    durations = [t["duration_ms"] for t in listed]
    durations += [s["duration_ms"] for s in json.loads(shown)["steps"]]
    assert all(isinstance(d, float) and d > 0 for d in durations), durations
    assert [round(d, 1) for d in durations] == durations


async def test_json_for_scripts_is_what_the_api_answers(service: Service, db_url: str) -> None:
    """Schedules, templates, keys and a cancel or retry print JSON with ``--json`` (they printed
    lines for people only: a script parsed ``task 1 cancelled``)."""
    url = ("--url", service.url)
    made = ("schedules", "create", "hourly", "summarize", "--every", "1h", "-p", "text=x")
    code, out, err = await run_cli(*made, "--json", *url)
    created, shown = json.loads(out), await _api(service, "/api/v1/schedules/hourly")
    assert code == 0 and created == {k: shown[k] for k in created}, err  # shown tells more
    for verb, enabled in (("pause", False), ("resume", True)):
        code, out, _ = await run_cli("schedules", verb, "hourly", "--json", *url)
        assert code == 0 and json.loads(out)["enabled"] is enabled
    code, out, _ = await run_cli("schedules", "list", "--json", *url)
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and listed == (await _api(service, "/api/v1/schedules"))["items"]
    code, out, _ = await run_cli("schedules", "run", "hourly", "--json", *url)
    ran = json.loads(out)
    assert code == 0 and ran["template"] == "summarize" and ran["params"]["text"] == "x"

    code, later, _ = await run_cli("submit", "summarize", "-p", "text=y", "--delay", "60", *url)
    code, out, err = await run_cli("tasks", "cancel", later.strip(), "--json", *url)
    cancelled = json.loads(out)
    assert code == 0 and (cancelled["id"], cancelled["status"]) == (int(later), "cancelled"), err
    code, out, _ = await run_cli("tasks", "retry", later.strip(), "--json", *url)
    assert code == 0 and json.loads(out)["id"] == int(later)

    code, out, _ = await run_cli("templates", "list", "--json", *url)
    offered = {t["name"]: t for t in (await _api(service, "/api/v1/templates"))["items"]}
    for line in out.splitlines():
        item = json.loads(line)
        assert item == {k: offered[item["name"]][k] for k in item}, item
    assert {json.loads(line)["name"] for line in out.splitlines()} == set(offered)
    code, out, _ = await run_cli("templates", "list", "--local", "--json")
    assert code == 0 and "summarize" in {json.loads(line)["name"] for line in out.splitlines()}

    env = {"ORCHESTRA_DATABASE__URL": db_url}  # the last step: a key turns authentication on
    code, token, _ = await run_cli("keys", "create", "--name", "ci", "--scope", "read", env=env)
    code, out, _ = await run_cli("keys", "list", "--json", env=env)
    [key] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and token.strip() not in out
    assert (key["name"], key["scope"], key["revoked_at"]) == ("ci", "read", None), key


async def test_a_time_zone_for_an_every_schedule_is_refused(service: Service) -> None:
    """It was taken and meant nothing: an ``--every`` schedule ticks at its interval."""
    code, _, err = await run_cli(
        "schedules", "create", "s", "summarize", "--every", "1h", "--timezone", "Asia/Tokyo",
        "-p", "text=x", "--url", service.url,
    )  # fmt: skip
    assert code == 2 and "--timezone" in err and "--cron" in err, err
    assert (await _api(service, "/api/v1/schedules"))["items"] == []


async def test_empty_lists_say_so_on_stderr(service: Service) -> None:
    for args, what in (
        (("tasks", "list", "--status", "queued"), "no tasks"),
        (("tasks", "list", "--json"), "no tasks"),
        (("schedules", "list"), "no schedules"),
    ):
        code, out, err = await run_cli(*args, "--url", service.url)
        assert (code, out, err.strip()) == (0, "", what), args


async def test_each_kind_of_failure_has_its_exit_code(
    service: Service, fake_ollama: FakeOllama
) -> None:
    url = ("--url", service.url)
    # 1: the task failed, or was cancelled.
    fake_ollama.models.discard("llama3.2")
    code, _, err = await run_cli("submit", "summarize", "-p", "text=x", "--wait", *url)
    assert code == 1 and "failed" in err
    waiting = asyncio.ensure_future(
        run_cli("submit", "summarize", "-p", "text=x", "--delay", "600", "--wait", *url)
    )

    async def queued() -> bool:
        items = (await _api(service, "/api/v1/tasks?status=queued"))["items"]
        return bool(items)

    await wait_until(queued, timeout=30)
    [task] = (await _api(service, "/api/v1/tasks?status=queued"))["items"]
    assert (await service.client.post(f"/api/v1/tasks/{task['id']}/cancel")).status_code == 200
    code, _, err = await waiting
    assert code == 1 and f"task {task['id']} cancelled" in err
    # 2: click's usage errors.
    assert (await run_cli("tasks", "list", "--status", "done", *url))[0] == 2
    # 3: nothing answers.
    code, _, err = await run_cli("tasks", "list", "--url", NOWHERE)
    assert code == 3 and f"cannot reach the server at {NOWHERE}" in err
    # 5: not found.
    for args in (("tasks", "show", "77"), ("tasks", "events", "77"), ("tasks", "cancel", "77")):
        code, _, err = await run_cli(*args, *url)
        assert code == 5 and "no task with id 77" in err, args
    code, _, err = await run_cli("submit", "nope", *url)
    assert code == 5 and "nope" in err


async def test_a_refused_key_says_how_the_cli_sends_one_and_exits_4(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    tokens = await make_keys(db_url, "read")
    async with start_service(make_settings(db_url, fake_ollama.url)) as svc:
        url = ("--url", svc.url)
        code, _, err = await run_cli("tasks", "list", *url)
        assert code == 4 and "export ORCHESTRA_API_KEY=" in err, err
        assert "Authorization: Bearer" not in err
        code, _, err = await run_cli("tasks", "list", *url, key="orc_wrong")
        assert code == 4 and "the key in ORCHESTRA_API_KEY was refused" in err, err
        code, _, err = await run_cli(
            "submit", "summarize", "-p", "text=x", *url, key=tokens["read"]
        )
        assert code == 4 and "needs the submit scope" in err, err
        code, out, err = await run_cli("tasks", "list", *url, key=tokens["read"])
        assert (code, out, err.strip()) == (0, "", "no tasks")


async def test_templates_register_prints_each_problem_once_with_the_files_name(
    service: Service, tmp_path: Path
) -> None:
    file = tmp_path / "t1.yaml"
    file.write_text(
        "name: t1\nsteps:\n  - id: a\n    prompt: '{{ params.nope }}'\n"
        "  - id: b\n    prompt: '{{ params.other }}'\n"
    )
    code, _, err = await run_cli("templates", "register", str(file), "--url", service.url)
    assert code == 1
    assert "<request>" not in err
    lines = err.splitlines()
    assert lines[0] == f"Error: 2 problem(s) in {file}:"
    assert len(lines) == 3, err
    assert lines[1].startswith(f"{file}:4:13: steps[0].prompt: unknown parameter 'nope'")
    assert lines[2].startswith(f"{file}:6:13: steps[1].prompt: unknown parameter 'other'")


async def test_the_install_guide_lists_the_commands_orchestra_help_shows() -> None:
    code, out, _ = await run_cli("--help")
    assert code == 0
    listed = out.split("Commands:", 1)[1]
    commands = sorted(line.split()[0] for line in listed.splitlines() if line.strip())
    guide = (REPO / "docs" / "install.md").read_text()
    [sentence] = [line for line in guide.split("\n\n") if "Every command works" in line]
    named = sorted(re.findall(r"`(\w+)[^`]*`", sentence.split("(", 1)[0]))
    assert named == commands


async def test_templates_reload_names_the_file_of_each_problem(
    settings: Settings, start_service: StartService, tmp_path: Path
) -> None:
    """Two broken files: every line after the first said only LINE:COLUMN, so the second
    problem looked like the first file's."""
    folder = tmp_path / "mine"
    folder.mkdir()
    with_dir = msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))
    async with start_service(with_dir) as svc:
        for name, param in (("bad_one", "x"), ("bad_two", "y")):
            text = f"'{{{{ params.{param} }}}}'"
            (folder / f"{name}.yaml").write_text(
                f"name: {name}\nsteps: [{{id: a, kind: render, text: {text}}}]\n"
            )
        code, _, err = await run_cli("templates", "reload", "--url", svc.url)
    assert code == 1
    assert err.splitlines() == [
        "Error: 2 problem(s) in the service's template files:",
        f"{folder / 'bad_one.yaml'}:2:37: steps[0].text: unknown parameter 'x' (the template "
        "takes: none)",
        f"{folder / 'bad_two.yaml'}:2:37: steps[0].text: unknown parameter 'y' (the template "
        "takes: none)",
    ], err


async def test_templates_validate_refuses_the_names_a_service_would(tmp_path: Path) -> None:
    """A file named like a built-in, or two files of one name, were "ok" here, and then
    stopped the reload (or the start) that read them."""
    mine = tmp_path / "mine"
    mine.mkdir()
    body = "description: d\nname: {}\nsteps:\n  - {{id: a, kind: render, text: hi}}\n"
    (mine / "a.yaml").write_text(body.format("summarize"))
    (mine / "b.yaml").write_text(body.format("twice"))
    (mine / "c.yml").write_text(body.format("twice"))
    (mine / "notes.txt").write_text("not a template")
    code, out, err = await run_cli("templates", "validate", str(mine), str(mine / "b.yaml"))
    assert code == 1  # b.yaml named twice: checked once
    assert err.splitlines() == [
        f"{mine / 'a.yaml'}:2:7: name: template 'summarize' is built in (shipped with "
        "Orchestra); name yours otherwise",
        f"{mine / 'c.yml'}:2:7: name: template name 'twice' is already defined in "
        f"{mine / 'b.yaml'}",
    ], err
    assert out == f"{mine / 'b.yaml'}: ok (twice v1)\n"
    # An empty folder checked nothing, and passed (helper-124).
    (tmp_path / "empty").mkdir()
    code, _, err = await run_cli("templates", "validate", str(tmp_path / "empty"))
    assert code == 1 and "no template files (*.yaml, *.yml) in this folder" in err, err
    # The built-in's own file is no clash with itself.
    code, out, _ = await run_cli(
        "templates", "validate", str(REPO / "templates" / "summarize.yaml")
    )
    assert code == 0 and "ok (summarize v1)" in out


async def test_the_api_s_validate_refuses_a_built_in_s_name(service: Service) -> None:
    body = "description: d\nname: summarize\nsteps:\n  - {id: a, kind: render, text: hi}\n"
    answer = await service.client.post("/api/v1/templates/validate", content=body)
    assert answer.status_code == 200
    assert answer.json()["valid"] is False
    [problem] = answer.json()["errors"]
    assert (problem["line"], problem["column"], problem["path"]) == (2, 7, "name")
    assert "is built in (shipped with Orchestra)" in problem["message"]
    # Registering it is still the 409 it was.
    registered = await service.client.post("/api/v1/templates", content=body)
    assert registered.status_code == 409


async def test_submit_wait_shows_each_step_s_streamed_text_on_lines_of_its_own(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """Two steps' streamed text ran together on one line ("Draft one.Final two.")."""
    body = (
        "name: twostep\nsteps:\n  - {id: draft, prompt: first}\n"
        "  - {id: final, prompt: 'second {{ steps.draft.output }}'}\n"
    )
    assert (await service.client.post("/api/v1/templates", content=body)).status_code == 201
    fake_ollama.reply = lambda req: (
        "Draft one." if req["messages"][-1]["content"] == "first" else "Final two."
    )
    code, _, err = await run_cli("submit", "twostep", "--wait", "--url", service.url)
    assert code == 0, err
    assert "Draft one.\nFinal two.\n" in err, err


#: A submit that waits on a task that will not start for ten minutes.
WAITING_ON_A_DELAYED_TASK = ("submit", "summarize", "-p", "text=x", "--delay", "600", "--wait")


async def test_a_wait_that_fails_names_the_task_it_queued(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    """`submit --wait` that lost its server (or its key) partway exited with the task's id
    only on stderr's first line, far above, and its error glued to the streamed text."""
    tokens = await make_keys(db_url, "submit")
    async with start_service(make_settings(db_url, fake_ollama.url)) as svc:
        waiting = asyncio.ensure_future(
            run_cli(*WAITING_ON_A_DELAYED_TASK, "--url", svc.url, key=tokens["submit"])
        )
        headers = {"Authorization": f"Bearer {tokens['submit']}"}

        async def queued() -> bool:
            answer = await svc.client.get("/api/v1/tasks", headers=headers)
            return bool(answer.json()["items"])

        await wait_until(queued, timeout=30)
        [task] = (await svc.client.get("/api/v1/tasks", headers=headers)).json()["items"]
        await revoke_key(db_url, "k-submit")  # the stream ends; the client's next ask: 401
        code, out, err = await waiting
    assert code == 4 and out == "", err
    assert err.rstrip().endswith(
        f"task {task['id']} was queued and may still run: orchestra tasks show {task['id']}"
    ), err


async def test_ctrl_c_and_a_reader_that_stops_reading_have_their_exit_codes(
    service: Service,
) -> None:
    """Both exited 1, the code of a failed task (click's "Aborted!", and nothing said):
    a script under `set -o pipefail` read `orchestra tasks list | head -1` as a failure."""
    for i in range(3):
        await service.submit("summarize", text=f"t{i}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        *WAITING_ON_A_DELAYED_TASK,
        "--url",
        service.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    queued = await asyncio.wait_for(proc.stderr.readline(), timeout=60)
    assert b"queued" in queued
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted (what the server was asked to do goes on there)" in err, err
    reader, writer = os.pipe()
    listing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        "tasks",
        "list",
        "--json",
        "--url",
        service.url,
        stdout=writer,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(writer)
    os.close(reader)  # the reader is gone before anything is written
    _, err = await asyncio.wait_for(listing.communicate(), timeout=60)
    assert (listing.returncode, err) == (141, b""), err


async def test_an_empty_schedule_name_and_a_status_given_twice_are_usage_errors(
    service: Service,
) -> None:
    """`schedules run ''` said "Method Not Allowed" (another route), exit 1; `tasks list
    --status failed --status cancelled` kept the last in silence (helper-124)."""
    for command in ("run", "pause", "resume", "delete"):
        code, _, err = await run_cli("schedules", command, "", "--url", service.url)
        assert code == 2 and "give a schedule's name or id" in err, (command, err)
    code, _, err = await run_cli(
        "tasks", "list", "--status", "failed", "--status", "cancelled", "--url", service.url
    )
    assert code == 2 and "is given 2 times; give it once" in err, err
    code, _, err = await run_cli("tasks", "list", "--status", "failed", "--url", service.url)
    assert code == 0 and err.strip() == "no tasks", err


#: What a terminal would act on: colour, a new window title (OSC ... BEL), a C1 control
#: sequence introducer, a right-to-left override and isolate (text shown reversed).
HOSTILE = "\x1b[31mRED\x1b]0;title\x07 \x9b2J \u202egnp.exe\u2066x\u2069\ttab"
#: What no line for people may hold raw.
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


async def test_lines_for_people_show_control_characters_escaped(service: Service) -> None:
    """A template's description (anyone who may register one writes it) was printed raw by
    ``templates list``: its escape sequences coloured the terminal and set its title. Every
    line for people shows a control character (C0, C1, bidi) escaped; --json stays data."""
    template = (
        "name: hostile\ndescription: " + json.dumps(HOSTILE) + "\nparameters:\n"
        "  text: {type: string}\nsteps:\n  - id: a\n    prompt: '{{ params.text }}'\n"
    )
    registered = await service.client.post(
        "/api/v1/templates", content=template, headers={"content-type": "application/yaml"}
    )
    assert registered.status_code == 201, registered.text
    url = ("--url", service.url)
    code, out, _ = await run_cli("templates", "list", *url)
    [line] = [line for line in out.splitlines() if line.startswith("hostile")]
    assert code == 0 and not RAW.search(line), line
    assert r"\x1b[31mRED\x1b]0;title\x07 \x9b2J \u202egnp.exe\u2066x\u2069\ttab" in line
    code, out, _ = await run_cli("templates", "list", "--json", *url)
    assert HOSTILE in [json.loads(line)["description"] for line in out.splitlines()]

    code, task_id, err = await run_cli("submit", "hostile", "-p", f"text={HOSTILE}", *url)
    assert code == 0, err
    code, out, _ = await run_cli("tasks", "events", task_id.strip(), *url)  # until it ends
    assert code == 0 and "task.finished" in out and not RAW.search(out.replace("\n", "")), out
    code, out, _ = await run_cli("tasks", "list", *url)
    assert code == 0 and not RAW.search(out.replace("\n", "")), out


def test_text_shown_as_lines_keeps_its_line_ends_and_an_error_escapes_the_rest() -> None:
    """A model's streamed text (``submit --wait``) and an error's message (which may quote
    a server's words) are shown as lines: their other control characters are escaped."""
    from orchestra.cli_common import CliError, shown

    assert shown("a\tb\nc\x1b]0;t\x07\u202e", lines=True) == "a\tb\nc\\x1b]0;t\\x07\\u202e"
    assert shown("a\tb\nc\r") == "a\\tb\\nc\\r"
    said = CliError("template 'x\x1b[2J' not found\nsecond line").format_message()
    assert said == "template 'x\\x1b[2J' not found\nsecond line"
