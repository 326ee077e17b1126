"""Arguments and settings the CLI's client commands must read as meant, or refuse in one line:
an IPv6 host in the settings, a port out of range, a limit too large, a name that is no
template's (docs/install.md, "Exit codes")."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.conftest import Service, make_keys
from tests.fixtures.servers import loopback_server
from tests.integration.test_cli import run_cli
from tests.integration.test_cli_keys import keys_cli


@asynccontextmanager
async def ipv6_door(target: str) -> AsyncIterator[int]:
    """A port on ::1 whose connections are passed on to ``target`` (``http://host:port``)."""
    to = httpx.URL(target)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(to.host, to.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "::1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_an_ipv6_host_in_the_settings_is_reached_in_brackets(
    service: Service, tmp_path: Path
) -> None:
    """`host = "::1"` and no --url: every client command was an httpx traceback (Invalid
    port: ':1:22311')."""
    await service.submit("summarize", text="over ipv6")
    async with ipv6_door(service.url) as port:
        config = tmp_path / "v6.toml"
        config.write_text(f'[server]\nhost = "::1"\nport = {port}\n')
        code, out, err = await run_cli("tasks", "list", "-c", str(config))
        assert code == 0 and "summarize" in out, err
    code, _, err = await run_cli("tasks", "list", "-c", str(config))
    assert code == 3 and f"cannot reach the server at http://[::1]:{port}" in err, err


async def test_a_port_out_of_range_is_a_usage_error() -> None:
    """`--url http://127.0.0.1:87837` reached port 22301 (the port wrapped at 65536)."""
    for bad in ("http://127.0.0.1:87837", "http://127.0.0.1:65536", "http://[::1]:0"):
        code, _, err = await run_cli("tasks", "list", "--url", bad)
        assert code == 2 and "is not a URL such as http://127.0.0.1:8000" in err, (bad, err)
        code, _, err = await run_cli("tasks", "list", env={"ORCHESTRA_URL": bad})
        assert code == 2 and "is not a URL such as http://127.0.0.1:8000" in err, (bad, err)


async def test_a_limit_beyond_the_largest_is_a_usage_error(service: Service) -> None:
    """`tasks list --limit 99999999999999999999` was a traceback (islice's ValueError)."""
    await service.submit("summarize", text="listed")
    code, _, err = await run_cli(
        "tasks", "list", "--limit", "99999999999999999999", "--url", service.url
    )
    assert code == 2 and "--limit" in err and "Traceback" not in err, err
    code, out, err = await run_cli("tasks", "list", "--limit", "1000000000", "--url", service.url)
    assert code == 0 and "summarize" in out, err


async def test_a_key_name_that_is_not_utf8_is_a_usage_error(db_url: str, tmp_path: Path) -> None:
    """`keys revoke $'\\xff'` was a UnicodeEncodeError traceback from the database's driver."""
    await make_keys(db_url)
    env = {"ORCHESTRA_DATABASE__URL": db_url}
    code, out, err = await keys_cli("revoke", "\udcff", cwd=tmp_path, env=env)
    assert code == 2 and "Traceback" not in err and out == "", err
    assert "NAME_OR_ID" in err and "is not UTF-8" in err, err


async def test_a_name_with_a_slash_or_dots_is_no_template_s_nor_schedule_s(
    service: Service,
) -> None:
    """`submit a/b` said "there is nothing at /api/v1/templates/a/b", exit 3 (a wrong --url);
    `submit ..`, "nothing at /api/v1"; `schedules run .`, "Method Not Allowed", exit 1: the
    dots were path steps, and the server read %2F as a slash."""
    for name in (".", "..", "a/b", "a/versions", "../tasks"):
        code, _, err = await run_cli("submit", name, "-p", "text=x", "--url", service.url)
        assert code == 5 and f"no template named {name!r}" in err, (name, err)
        code, _, err = await run_cli(
            "schedules", "create", "s", name, "--every", "5m", "-p", "text=x", "--url", service.url
        )
        assert code == 5 and f"no template named {name!r}" in err, (name, err)
        for command in ("run", "pause", "resume", "delete"):
            code, _, err = await run_cli("schedules", command, name, "--url", service.url)
            assert code == 5 and f"no schedule {name!r}" in err, (command, name, err)


async def test_a_schedule_needs_cron_or_every_and_not_both(service: Service) -> None:
    """Both, or neither, exited 1 from the server's 400: options that cannot go together are a
    usage error (docs/install.md, "Exit codes")."""
    for timing in (("--every", "5m", "--cron", "* * * * *"), ()):
        code, _, err = await run_cli(
            "schedules", "create", "x", "summarize", *timing, "-p", "text=a", "--url", service.url
        )
        assert code == 2 and "give --cron or --every (one of them)" in err, (timing, err)
    code, _, err = await run_cli("schedules", "list", "--url", service.url)
    assert code == 0 and err.strip() == "no schedules", err


async def _seconds_to_run(*args: str) -> float:
    """How long ``python ARGS`` takes here now."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, *args)
    await asyncio.wait_for(proc.wait(), timeout=60)
    return time.monotonic() - started


async def test_ctrl_c_while_the_command_starts_says_interrupted_without_a_traceback() -> None:
    """Ctrl-C in the first 0.3 s of a command (its modules loading, its options read) was a
    KeyboardInterrupt traceback from whichever module was loading (httpx's, idna's), exit 1
    or killed by the signal. Each moment from when the CLI's first module is loaded (as
    measured here) to the command's request gets one line, exit 130."""

    async def never_answer(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await reader.read(65536)  # until the client leaves

    # Until the CLI's first module has set its handler: Python's start, its own modules',
    # and the orchestra package's (an interrupt before that is the interpreter's own).
    handler_set = max([await _seconds_to_run("-m", "orchestra.cli_start") for _ in range(3)])
    command_started = await _seconds_to_run("-m", "orchestra", "tasks", "list", "--help")
    first = handler_set * 1.5
    moments = [first + (command_started - first) * i / 8 for i in range(10)]
    async with loopback_server(never_answer) as url:
        for moment in moments:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "orchestra",
                "tasks",
                "list",
                "--url",
                url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(moment)  # the moment tried, not a wait for a condition
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            said = err.decode()
            # 130, or killed by SIGINT once the command runs (as a shell sees it: 130 too; a
            # loaded fresh-clone run reached the request at the last moments).
            assert proc.returncode in (130, -signal.SIGINT), (moment, proc.returncode, said)
            assert "Traceback" not in said, (moment, said)
            assert said.strip().startswith("interrupted") and out == b"", (moment, said)


async def test_templates_register_prints_a_problem_without_a_path_as_validate_does(
    service: Service, tmp_path: Path
) -> None:
    """A YAML error has no path in the template: register printed `FILE:7:1: : YAML: …`."""
    file = tmp_path / "bad1.yaml"
    file.write_text("name: bad1\nsteps:\n  - id: a\n    prompt: [unclosed\n")
    code, _, said = await run_cli("templates", "validate", str(file))
    assert code == 1 and said.startswith(f"{file}:"), said
    code, _, err = await run_cli("templates", "register", str(file), "--url", service.url)
    assert code == 1 and err.splitlines()[1] == said.splitlines()[0], (err, said)
    assert ": :" not in err, err
