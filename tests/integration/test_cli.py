from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Service, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import (
    free_port,
    loopback_server,
    start_process,
    wait_until,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


async def run_cli(
    *args: str, env: dict[str, str] | None = None, key: str | None = None, stdin: bytes = b""
) -> tuple[int, str, str]:
    """``orchestra ARGS``: its exit code, stdout and stderr; ``key`` as ORCHESTRA_API_KEY
    (none by default, whatever the caller's environment says); ``stdin``, its input."""
    base = {k: v for k, v in os.environ.items() if k != "ORCHESTRA_API_KEY"}
    if key is not None:
        base["ORCHESTRA_API_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_wait_prints_the_result(
    service: Service, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    text = tmp_path / "article.txt"
    text.write_text("A long article about queues.")
    code, out, err = await run_cli(
        "submit",
        "summarize",
        "-p",
        f"text=@{text}",
        "-p",
        "sentences=2",
        "--wait",
        "--url",
        service.url,
    )
    assert code == 0, err
    assert "A long article about queues." in out
    assert "at most 2 sentences" in out
    assert err.startswith("task 1 queued")
    assert "A long article about queues." in err  # the text, shown while it streamed
    assert fake_ollama.requests[0]["messages"][-1]["content"].count("queues") == 1


async def test_submit_reports_invalid_params_by_field(service: Service) -> None:
    code, _out, err = await run_cli(
        "submit", "summarize", "-p", "sentences=99", "--url", service.url
    )
    assert code == 1
    assert "params.text: is required" in err
    assert "params.sentences" in err
    assert "Traceback" not in err


async def test_submit_without_a_server_says_so() -> None:
    code, _out, err = await run_cli("submit", "summarize", "--url", "http://127.0.0.1:9")
    assert code == 3  # docs/install.md, "The CLI's exit codes"
    assert "cannot reach the server at http://127.0.0.1:9" in err


async def test_a_server_that_never_answers_is_given_up_after_timeout_and_said() -> None:
    """A port that takes the connection and never answers (a hung proxy): the CLI waits
    --timeout (or ORCHESTRA_TIMEOUT; 30 s by default, as the client), then says so."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):  # no answer; done when the CLI hangs up
            pass
        writer.close()

    async with loopback_server(silent) as url:
        for args, env in (
            (("--timeout", "1", "tasks", "list", "--url", url), {}),
            (("tasks", "list", "--url", url), {"ORCHESTRA_TIMEOUT": "1"}),
        ):
            started = time.monotonic()
            code, out, err = await run_cli(*args, env=env)
            took = time.monotonic() - started
            assert code == 3, err  # no server: docs/install.md
            assert f"the server at {url} did not answer within 1 s" in err, err
            assert "--timeout" in err and out == ""
            assert took < 15, took  # not 30, and not 90 (the old fixed wait)
    code, _out, err = await run_cli("--timeout", "0", "tasks", "list")
    assert code == 2 and "--timeout" in err, err
    # A submit (or a cancel) that got no answer may have been carried out: exit 3 said it
    # could not reach the server, and a script that sent it again made a duplicate.
    async with loopback_server(silent) as url:
        code, out, err = await run_cli("--timeout", "1", "tasks", "cancel", "1", "--url", url)
    assert code == 6 and out == "", err
    assert "may have been carried out" in err and "before sending it again" in err, err


async def test_a_url_that_is_another_http_server_is_said_to_be_one() -> None:
    """--url pointing at some other web server (a typo in the port): its 404 page is not
    Orchestra's error body, and the CLI says to check the URL."""

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error": "not found"}'
        writer.write(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )

    async with loopback_server(other) as url:
        code, out, err = await run_cli("tasks", "show", "1", "--url", url)
    # 3, not 5 ("not found"): a cleanup script read that as the task gone (helper-124).
    assert code == 3 and out == "", err
    assert f"the server at {url} did not answer as Orchestra does" in err, err
    assert "--url" in err and "Traceback" not in err


async def test_templates_validate_prints_positions(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - id: a\n    prompt: '{{ nope'\n")
    code, out, err = await run_cli(
        "templates", "validate", str(bad), str(REPO / "templates" / "qa.yaml")
    )
    assert code == 1
    assert err.startswith(f"{bad}:4:13: steps[0].prompt: Jinja syntax error")
    assert "qa.yaml: ok (qa v1)" in out


async def test_templates_validate_holds_files_to_the_configured_limits(tmp_path: Path) -> None:
    config = tmp_path / "orchestra.toml"
    config.write_text("[limits]\nmax_template_bytes = 100\n")
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nsteps:\n  - id: a\n    prompt: '" + "x" * 200 + "'\n")
    assert (await run_cli("templates", "validate", str(big)))[0] == 0  # the default: 256 KB
    for args in (
        ("templates", "validate", "-c", str(config), str(big)),
        ("-c", str(config), "templates", "validate", str(big)),  # -c before the command too
    ):
        code, _, err = await run_cli(*args)
        assert code == 1 and "100" in err, (args, err)


async def test_templates_list_local_includes_user_folders(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "name: mine\ndescription: Mine.\nsteps:\n  - id: a\n    prompt: hi\n"
    )
    code, out, _ = await run_cli(
        "templates", "list", "--local", env={"ORCHESTRA_TEMPLATES__DIRS": f'["{tmp_path}"]'}
    )
    assert code == 0
    assert "mine" in out and "summarize" in out


async def test_sigterm_stops_claiming_and_lets_the_running_task_finish(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    import httpx

    fake_ollama.latency = 1.0
    port = free_port()
    config = tmp_path / "o.toml"
    write_config(
        config, port=port, db=db_url, ollama_url=fake_ollama.url, concurrency=1, shutdown_grace=10
    )
    proc = await start_process(config)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            body = {"template": "summarize", "params": {"text": "x"}}
            first = (await client.post("/api/v1/tasks", json=body)).json()
            second = (await client.post("/api/v1/tasks", json=body)).json()
            await wait_until(lambda: fake_ollama.in_flight == 1)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # uvicorn re-raises the signal after its graceful shutdown, as a default handler would.
    assert proc.returncode in (0, -signal.SIGTERM)
    rows = dict(sql_rows(db_url, "SELECT id, status FROM tasks"))
    assert rows == {first["id"]: "succeeded", second["id"]: "queued"}
    log = config.with_suffix(".log").read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "task.finished"]
    assert finished and finished[0]["task_id"] == first["id"]
    assert finished[0]["template"] == "summarize"


def test_the_wheel_carries_the_builtin_templates(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/builtin_templates/" in n}
    assert shipped == {p.name for p in (REPO / "templates").glob("*.yaml")}


async def test_tasks_show_cancel_and_retry(service: Service, fake_ollama: FakeOllama) -> None:
    code, _, err = await run_cli(
        "submit", "summarize", "-p", "text=later", "--delay", "60", "--url", service.url
    )
    assert code == 0 and err.startswith("task 1 queued")
    code, out, _ = await run_cli("tasks", "show", "1", "--url", service.url)
    assert code == 0 and json.loads(out)["next_run_at"] is not None
    code, out, _ = await run_cli("tasks", "cancel", "1", "--url", service.url)
    assert (code, out.strip()) == (0, "task 1 cancelled")
    code, _, err = await run_cli("tasks", "cancel", "1", "--url", service.url)
    assert code == 1 and "already finished: cancelled" in err
    code, out, _ = await run_cli("tasks", "retry", "1", "--url", service.url)
    # Queued again; a free worker may already have taken it by the time the answer is read.
    assert code == 0 and out.strip() in ("task 1 queued", "task 1 running", "task 1 succeeded")
    done = await service.wait(1)
    assert done["status"] == "succeeded"
    code, _, err = await run_cli("tasks", "show", "77", "--url", service.url)
    assert code == 5 and "no task with id 77" in err


async def test_tasks_list_filters_and_limits_and_tasks_events_follows_a_task(
    service: Service, fake_ollama: FakeOllama
) -> None:
    done = [
        await service.wait((await service.submit("summarize", text=f"t{n}"))["id"]) for n in (1, 2)
    ]
    fake_ollama.models.discard("llama3.2")  # the next task fails: no such model
    failed = await service.wait((await service.submit("summarize", text="t3"))["id"])
    assert [t["status"] for t in (*done, failed)] == ["succeeded", "succeeded", "failed"]

    code, out, err = await run_cli("tasks", "list", "--url", service.url)
    lines = out.splitlines()
    assert code == 0 and [line.split()[:3] for line in lines] == [
        ["3", "failed", "summarize"],
        ["2", "succeeded", "summarize"],
        ["1", "succeeded", "summarize"],
    ], out
    assert "not found" in lines[0] and err == ""
    code, out, err = await run_cli(
        "tasks", "list", "--status", "succeeded", "--limit", "1", "--url", service.url
    )
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["2"]
    assert "the 1 newest; --limit for more" in err
    code, out, _ = await run_cli(
        "tasks", "list", "--json", "--template", "nope", "--url", service.url
    )
    assert (code, out) == (0, "")
    code, _, err = await run_cli("tasks", "list", "--status", "done", "--url", service.url)
    assert code == 2 and "'done' is not one of" in err

    # A delayed task says when it is due, in the listing and in the CLI's line.
    later = await service.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "t4"}, "delay": 3600}
    )
    due = later.json()["next_run_at"]
    listed = (await service.client.get("/api/v1/tasks", params={"limit": 2})).json()["items"]
    assert [t["next_run_at"] for t in listed] == [due, None]
    code, out, _ = await run_cli("tasks", "list", "--limit", "1", "--url", service.url)
    assert code == 0 and out.split()[1:5] == [
        "queued",
        "summarize",
        "v1",
        later.json()["created_at"],
    ]
    # Columns line up whatever the template's name (the created time starts at one place).
    code, out, _ = await run_cli("tasks", "list", "--url", service.url)
    starts = {re.search(r"\d{4}-\d\d-\d\dT", line).start() for line in out.splitlines()}  # type: ignore[union-attr]
    assert len(starts) == 1, out
    assert f"due {due}" in out, out

    code, out, _ = await run_cli("tasks", "events", "1", "--json", "--url", service.url)
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "task.queued" and events[-1]["type"] == "task.finished"
    assert events[-1]["data"]["status"] == "succeeded"
    code, out, _ = await run_cli("tasks", "events", "3", "--after", "2", "--url", service.url)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[0] == "3" and "task.finished" in lines[-1]
    assert '"status": "failed"' in lines[-1]
    code, _, err = await run_cli("tasks", "events", "77", "--url", service.url)
    assert code == 5 and "no task with id 77" in err


async def test_templates_register_and_reload(service: Service, tmp_path: Path) -> None:
    file = tmp_path / "greet.yaml"
    file.write_text("name: greet\nmodel: m\nsteps:\n  - id: a\n    prompt: hi\n")
    code, out, _ = await run_cli("templates", "register", str(file), "--url", service.url)
    assert (code, out.strip()) == (0, "greet v1 registered")
    code, out, _ = await run_cli("templates", "register", str(file), "--url", service.url)
    assert (code, out.strip()) == (0, "greet v1 unchanged")
    file.write_text("name: greet\nsteps:\n  - id: a\n    prompt: '{{ params.nope }}'\n")
    code, _, err = await run_cli("templates", "register", str(file), "--url", service.url)
    assert code == 1 and f"{file}:4:13: steps[0].prompt: unknown parameter 'nope'" in err
    code, out, _ = await run_cli("templates", "reload", "--url", service.url)
    assert code == 0 and out.strip().endswith("templates")
    # The server's list has what was registered (the local one reads only files).
    code, out, _ = await run_cli("templates", "list", "--url", service.url)
    greet = [line for line in out.splitlines() if line.startswith("greet ")]
    assert code == 0 and greet and greet[0].split()[:3] == ["greet", "v1", "api"], out
    assert "summarize" in out
    code, out, _ = await run_cli("templates", "list", "--local")
    assert code == 0 and "greet" not in out and "summarize" in out


async def test_serve_refuses_a_name_clash_in_one_clean_line(
    service: Service, tmp_path: Path
) -> None:
    await service.client.post(
        "/api/v1/templates", content="name: greet\nsteps:\n  - id: a\n    prompt: hi\n"
    )
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "greet.yaml").write_text("name: greet\nsteps:\n  - id: a\n    prompt: yo\n")
    db = service.app.runtime.settings.database.url
    config = tmp_path / "clash.toml"
    config.write_text(f'[database]\nurl = "{db}"\n[templates]\ndirs = ["{folder}"]\n')
    code, _, err = await run_cli("serve", "--config", str(config))
    assert code == 1
    assert "Traceback" not in err
    assert "also registered through the API" in err and "greet.yaml" in err


async def test_a_value_may_start_with_an_at_sign_or_come_from_standard_input(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """ "@alice said hi" was read as a file, with no way to escape it; "@-" as a file named
    "-" (helper-124)."""
    code, out, err = await run_cli(
        "submit", "summarize", "-p", "text=@@alice said hi", "--url", service.url
    )
    assert code == 0, err
    first = await service.wait(int(out))
    code, out, err = await run_cli(
        "submit", "summarize", "-p", "text=@-", "--url", service.url, stdin=b"from a pipe\n"
    )
    assert code == 0, err
    second = await service.wait(int(out))
    assert (first["params"]["text"], second["params"]["text"]) == (
        "@alice said hi",
        "from a pipe\n",
    )


async def test_a_parameter_given_twice_and_a_url_that_is_not_one_are_usage_errors(
    service: Service,
) -> None:
    code, _, err = await run_cli(
        "submit", "summarize", "-p", "text=a", "-p", "text=b", "--url", service.url
    )
    assert code == 2 and "text is given twice" in err, err
    # A port that is no number, an open bracket, a control character: tracebacks (helper-124).
    for bad in (
        "notaurl",
        "ftp://x",
        "http://",
        "http://127.0.0.1:abc",
        "http://[::1",
        "http://a\x01b",
    ):
        code, _, err = await run_cli("tasks", "list", "--url", bad)
        assert code == 2 and "is not a URL such as http://127.0.0.1:8000" in err, (bad, err)
    # A query replaced the API's path (every request went to /); a password went as Basic auth.
    for bad, told in (
        (f"{service.url}/?x=1", "a query or a fragment"),
        (f"{service.url}#top", "a query or a fragment"),
        (service.url.replace("//", "//ops:secret@"), "a user and password"),
    ):
        code, _, err = await run_cli("tasks", "list", "--url", bad)
        assert code == 2 and told in err and "Traceback" not in err, (bad, err)
        assert "secret" not in err, err  # the refusal shows no password (review)
    # A NaN delay said the argument was not UTF-8 (helper-124).
    code, _, err = await run_cli(
        "submit", "summarize", "-p", "text=a", "--delay", "nan", "--url", service.url
    )
    assert code == 1 and "nan" in err and "UTF-8" not in err, err


async def test_a_refusal_says_each_problem_once(service: Service) -> None:
    code, _, err = await run_cli(
        "schedules",
        "create",
        "twice",
        "summarize",
        "--cron",
        "x",
        "-p",
        "text=a",
        "--url",
        service.url,
    )
    problems = [line for line in err.splitlines() if "cron" in line]
    assert code == 1 and len(problems) == 1, err


@pytest.mark.parametrize("raw", ["NaN", "1e999", "-Infinity", "[1, NaN]"])
async def test_a_number_json_cannot_carry_is_refused_naming_the_parameter(
    service: Service, raw: str
) -> None:
    """Python's json reads NaN, Infinity and 1e999 (as inf), which went as null: the server
    then said "null is not of type 'integer'", a value the user never typed."""
    code, _out, err = await run_cli(
        "submit", "summarize", "-p", "text=x", "-p", f"sentences={raw}", "--url", service.url
    )
    assert code == 1
    assert "invalid parameter sentences" in err
    assert "JSON has no NaN or infinity" in err
    assert "null" not in err and "Traceback" not in err


async def test_an_argument_that_is_not_utf8_is_refused_naming_the_parameter(
    service: Service,
) -> None:
    """Python reads a non-UTF-8 argument byte as a lone surrogate, which the client cannot
    encode: a traceback before."""
    code, _out, err = await run_cli(
        "submit", "summarize", "-p", "text=caf\udce9", "--url", service.url
    )
    assert code == 1
    assert "params.text holds a lone surrogate" in err
    assert "an argument (or a file read with @) is not UTF-8" in err
    assert "Traceback" not in err


async def test_a_server_that_is_not_orchestra_is_said_in_a_line_not_its_page() -> None:
    """A web server answering 501 with an HTML page: the CLI printed the page itself."""
    page = b"<!DOCTYPE html><html><head><title>501</title></head><body>" + b"x" * 400 + b"</body>"

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 501 Not Implemented\r\nContent-Type: text/html\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(page), page)
        )
        await writer.drain()
        writer.close()

    async with loopback_server(other) as url:
        code, _out, err = await run_cli("tasks", "list", "--url", url)
    assert code == 1
    assert "501 Not Implemented (an HTML page, not Orchestra's JSON error)" in err
    assert "<html" not in err and "xxx" not in err
    assert f"the server at {url} did not answer as Orchestra does" in err


async def test_a_url_that_ends_in_the_api_s_path_is_pointed_out(service: Service) -> None:
    """--url http://host:port/api/v1 made every request go to /api/v1/api/v1/…: a bare "Not
    Found"."""
    code, _out, err = await run_cli("tasks", "list", "--url", f"{service.url}/api/v1")
    assert code == 3  # a wrong URL, not a task or schedule that is not there
    assert f"without /api/v1: --url {service.url}" in err
    assert "there is nothing at /api/v1/api/v1/tasks" in err


async def test_a_parameter_file_or_name_that_is_not_utf8_is_said_not_a_traceback(
    service: Service, tmp_path: Path
) -> None:
    """`-p text=@FILE` of a file that is not UTF-8 and a template name that is not UTF-8
    raised UnicodeDecodeError and UnicodeEncodeError."""
    data = tmp_path / "bin.txt"
    data.write_bytes(b"ok\xff\xfe")
    code, _out, err = await run_cli(
        "submit", "summarize", "-p", f"text=@{data}", "--url", service.url
    )
    assert code == 2 and "is not UTF-8 text (byte 2: 0xff)" in err, err
    code, _out, err = await run_cli("submit", "ec\udcffho", "-p", "t=a", "--url", service.url)
    assert code == 1 and "holds a lone surrogate" in err and "Traceback" not in err, err
    code, _out, err = await run_cli("tasks", "list", "--template", "\udcff", "--url", service.url)
    assert code == 1 and "holds a lone surrogate" in err and "Traceback" not in err, err
