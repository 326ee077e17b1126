"""More than one process: `orchestra serve --processes N`, `--no-api` and `--no-workers`, run as
real processes on one SQLite file, against the fake model on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, load_slack, wait_until, write_config

#: Seconds a stopping service may take: uvicorn's 5 s HTTP drain, the 2 s shutdown_grace the
#: configs below set, and room for two busy cores.
STOP_DEADLINE = 20.0
BODY = {"template": "summarize", "params": {"text": "many hands"}}


@dataclass
class Serving:
    """An `orchestra serve` process and what the test needs of it."""

    proc: asyncio.subprocess.Process
    url: str
    log: Path

    def children(self) -> list[int]:
        """The pids of the processes it started (service processes, multiprocessing's
        resource tracker)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def services(self) -> list[int]:
        """The pids of its service processes (not the resource tracker)."""
        return [pid for pid in self.children() if _is_service(pid)]

    def stderr(self) -> str:
        return self.log.read_text()


def _is_service(pid: int) -> bool:
    """Whether ``pid`` is a live service process. A child killed and reaped after it was
    listed has no /proc entry any more: it is not one."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and alive(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False


def config(folder: Path, name: str, db: Path | str, ollama_url: str) -> tuple[Path, int]:
    """A config on ``db`` (a SQLite file, or a database URL), polling for work five times a
    second; returns (file, port)."""
    port = free_port()
    path = folder / f"{name}.toml"
    write_config(
        path, port=port, db=db, ollama_url=ollama_url, poll_interval=0.2, shutdown_grace=2.0
    )
    return path, port


@asynccontextmanager
async def serving(
    config: Path, port: int, *args: str, ready: bool = True, new_session: bool = False
) -> AsyncIterator[Serving]:
    """``orchestra serve --config CONFIG ARGS`` in a child process, its stderr in a file;
    with ``ready``, yields once /health answers; with ``new_session``, in a process group of
    its own (to be signalled as a whole). Stopped at the end if still running (SIGTERM, then
    SIGKILL past the deadline)."""
    log = config.with_suffix(f".{port}.log")
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestra",
            "serve",
            "--config",
            str(config),
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            start_new_session=new_session,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            async with httpx.AsyncClient(base_url=url) as client:

                async def up() -> bool:
                    if proc.returncode is not None:
                        raise AssertionError(f"exited with {proc.returncode}: {log.read_text()}")
                    try:
                        return (await client.get("/health")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await wait_until(up, timeout=30, interval=0.05)
        yield Serving(proc, url, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=STOP_DEADLINE)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def attempts(db: Path) -> list[tuple[int, str, str]]:
    """Every attempt: (task id, worker, status)."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT task_id, worker, status FROM task_attempts").fetchall()


def statuses(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT id, status FROM tasks").fetchall())


def pid_of(worker: str) -> int:
    """The process a worker owner name (host:pid:random) belongs to."""
    return int(worker.split(":")[-2])


async def test_two_processes_share_the_queue_and_run_each_task_once(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    fake_ollama.latency = 0.02
    db = tmp_path / "shared.db"
    path, port = config(tmp_path, "two", db, fake_ollama.url)
    # Beyond loopback with no key: the first start makes an admin key, and only one process
    # may make and print it.
    text = path.read_text().replace("[server]\n", '[server]\nhost = "0.0.0.0"\n', 1)
    path.write_text(text)
    async with serving(path, port, "--processes", "2") as service:
        tokens = re.findall(r"^    (\S+)$", service.stderr(), re.MULTILINE)
        assert len(tokens) == 1, service.stderr()
        headers = {"Authorization": f"Bearer {tokens[0]}"}
        async with httpx.AsyncClient(base_url=service.url, headers=headers) as client:
            answers = await asyncio.gather(
                *(client.post("/api/v1/tasks", json=BODY) for _ in range(200))
            )
            assert [a.status_code for a in answers] == [201] * 200
            await wait_until(lambda: set(statuses(db).values()) == {"succeeded"}, timeout=30)
        children = service.children()
    rows = attempts(db)
    assert len(statuses(db)) == 200
    assert sorted(task for task, _, _ in rows) == sorted(statuses(db)), "one attempt per task"
    assert {status for _, _, status in rows} == {"succeeded"}
    workers = {worker for _, worker, _ in rows}
    assert len(workers) == 2, workers
    assert {pid_of(w) for w in workers} <= set(children), "run by the supervisor's children"


async def test_sigterm_stops_every_process_gracefully_and_leaves_none(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    fake_ollama.latency = 1.0
    db = tmp_path / "stop.db"
    path, port = config(tmp_path, "stop", db, fake_ollama.url)
    # A grace that 1 s tasks meet on a loaded machine too (2 s: one was handed back).
    path.write_text(path.read_text().replace("shutdown_grace = 2.0", "shutdown_grace = 6.0"))
    assert "shutdown_grace = 6.0" in path.read_text()
    async with serving(path, port, "--processes", "2") as service:
        children = service.children()
        assert len([pid for pid in children if alive(pid)]) >= 2
        # Both workers' pools are up before the tasks come: /health answered from one of them,
        # and a second one starting late let the first claim every task before the signal.
        await wait_until(lambda: service.stderr().count("pool.started") >= 2, timeout=30)
        async with httpx.AsyncClient(base_url=service.url) as client:
            answers = await asyncio.gather(
                *(client.post("/api/v1/tasks", json=BODY) for _ in range(40))
            )
            assert [a.status_code for a in answers] == [201] * 40
        # Both processes run tasks (4 slots each, 1 s a task: 8 a second of 40).
        await wait_until(lambda: len({w for _, w, _ in attempts(db)}) == 2, timeout=10)
        service.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
        assert code == 0, service.stderr()
    await wait_until(lambda: not any(alive(pid) for pid in children), timeout=5)
    # The tasks that ran when the signal came finished within the grace; no new one started;
    # nothing is left running.
    rows = attempts(db)
    assert {status for _, _, status in rows} == {"succeeded"}
    assert set(statuses(db).values()) == {"succeeded", "queued"}
    assert len(rows) == sum(s == "succeeded" for s in statuses(db).values())
    assert "supervisor.process_killed" not in service.stderr()


async def test_a_process_that_dies_is_started_again(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    path, port = config(tmp_path, "restart", tmp_path / "restart.db", fake_ollama.url)
    async with serving(path, port, "--processes", "2") as service:
        await wait_until(lambda: "supervisor.started" in service.stderr(), timeout=30)
        before = service.services()
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)

        def replaced() -> bool:
            new = set(service.services()) - set(before)
            if len(new) != 1:
                return False
            owner = f":{new.pop()}:"  # host:pid:random
            lines = service.stderr().splitlines()
            return any("pool.started" in line and owner in line for line in lines)

        await wait_until(replaced, timeout=30, interval=0.1)
        assert '"exit": "SIGKILL"' in service.stderr()
        async with httpx.AsyncClient(base_url=service.url) as client:
            created = await client.post("/api/v1/tasks", json=BODY)
            done = await client.get(f"/api/v1/tasks/{created.json()['id']}?wait=20")
            assert done.json()["status"] == "succeeded"


async def test_an_api_process_and_a_worker_process_split_the_work(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    db = tmp_path / "split.db"
    api_config, api_port = config(tmp_path, "api", db, fake_ollama.url)
    worker_config, worker_port = config(tmp_path, "worker", db, fake_ollama.url)
    async with (
        serving(api_config, api_port, "--no-workers") as api,
        serving(worker_config, worker_port, "--no-api") as worker,
        httpx.AsyncClient() as client,
    ):
        created = await client.post(f"{api.url}/api/v1/tasks", json=BODY)
        assert created.status_code == 201
        task = await client.get(f"{api.url}/api/v1/tasks/{created.json()['id']}?wait=20")
        assert task.json()["status"] == "succeeded"
        [(_, owner, _)] = attempts(db)
        assert pid_of(owner) == worker.proc.pid, "run by the worker process, not the API's"

        health = await client.get(f"{worker.url}/health")
        assert health.status_code == 200 and health.json()["database"] == "ok"
        for method, path in (("GET", "/api/v1/tasks"), ("POST", "/api/v1/tasks"), ("GET", "/ui")):
            refused = await client.request(method, f"{worker.url}{path}", json=BODY)
            assert refused.status_code == 404
            assert refused.json()["code"] == "workers_only"
            assert "runs workers only" in refused.json()["message"]
        for serve in (api, worker):
            serve.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(serve.proc.wait(), timeout=STOP_DEADLINE)
    assert "pool.started" not in api.stderr()
    assert "pool.started" in worker.stderr()


async def test_a_process_that_cannot_start_stops_the_others_with_one_clean_message(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "bad.yaml").write_text("name: bad\nsteps:\n  - id: a\n    prompt: '{{ nope'\n")
    path, port = config(tmp_path, "bad", tmp_path / "bad.db", fake_ollama.url)
    path.write_text(path.read_text() + f'[templates]\ndirs = ["{folder}"]\n')
    async with serving(path, port, "--processes", "2", ready=False) as service:
        code = await asyncio.wait_for(service.proc.wait(), timeout=30)
    err = service.stderr()
    assert code == 1
    assert err.count("Error: invalid templates:") == 1, err
    assert "bad.yaml:4:13: steps[0].prompt: Jinja syntax error" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--no-api", "--no-workers"), "leave nothing to run"),
        (("--processes", "0"), "--processes"),
    ],
)
async def test_serve_refuses_options_that_cannot_work(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        "serve",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRA_")},
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    assert message in err.decode() and "Traceback" not in err.decode()


def test_a_child_gone_between_listing_and_look_is_no_service() -> None:
    """`Serving.services` lists the children, then reads each one's command line: a child
    killed and reaped in between has no /proc entry left (this raised, failing a test)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: /proc/<pid> is gone
    assert not Path(f"/proc/{gone.pid}").exists()
    assert _is_service(gone.pid) is False


async def test_a_service_whose_port_is_taken_stops_before_it_claims_anything(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    # An API-only process holds the port, with tasks queued; a second service on the same
    # database and port must fail on the port before its workers take (and run) any of them.
    db = tmp_path / "shared.db"
    path, port = config(tmp_path, "api", db, fake_ollama.url)
    async with serving(path, port, "--no-workers") as api:
        async with httpx.AsyncClient(base_url=api.url) as client:
            for _ in range(3):
                assert (await client.post("/api/v1/tasks", json=BODY)).status_code == 201
        async with serving(path, port, ready=False) as second:
            code = await asyncio.wait_for(second.proc.wait(), timeout=30)
        err = second.stderr()
        assert code == 1, err
        assert f"Error: server: cannot listen on 127.0.0.1:{port}" in err, err
        assert "Traceback" not in err
        assert "pool.started" not in err
        assert attempts(db) == []
        assert set(statuses(db).values()) == {"queued"}
        assert fake_ollama.requests == []


def _ignores_sighup(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGHUP (/proc's SigIgn mask; SIGHUP is signal 1)."""
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & 1)
    return False


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_a_sighup_while_the_service_starts_does_not_end_it(
    fake_ollama: FakeOllama, tmp_path: Path, processes: str
) -> None:
    """A SIGHUP (a reload) in the second or so before the service took it for one ended it
    with no word (exit 129)."""
    path, port = config(tmp_path, "hup", tmp_path / "hup.db", fake_ollama.url)
    async with serving(path, port, "--processes", processes, ready=False) as service:
        await wait_until(lambda: _ignores_sighup(service.proc.pid), timeout=30, interval=0.005)
        service.proc.send_signal(signal.SIGHUP)
        async with httpx.AsyncClient(base_url=service.url) as client:

            async def up() -> bool:
                assert service.proc.returncode is None, service.stderr()
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get("/health")).status_code == 200
                return False

            await wait_until(up, timeout=60, interval=0.1)


async def test_a_supervisor_whose_port_another_supervisor_holds_stops(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """Two supervisors shared the port (SO_REUSEPORT: same user) and split its connections,
    each on its own database: tasks landed in one or the other at random."""
    path, port = config(tmp_path, "first", tmp_path / "first.db", fake_ollama.url)
    other, _ = config(tmp_path, "second", tmp_path / "second.db", fake_ollama.url)
    other.write_text(other.read_text().replace(f"port = {_}", f"port = {port}"))
    async with serving(path, port, "--processes", "2"):
        async with serving(other, port, "--processes", "2", ready=False) as second:
            code = await asyncio.wait_for(second.proc.wait(), timeout=30)
        err = second.stderr()
        assert code == 1, err
        assert f"Error: server: cannot listen on 127.0.0.1:{port}" in err, err
        assert "Traceback" not in err and "process_started" not in err


def _unread_bytes(local_port: int, remote_port: int) -> int | None:
    """The bytes waiting unread on the TCP socket from ``local_port`` to ``remote_port``
    (/proc/net/tcp's rx_queue); None when there is no such socket."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == (
            remote_port
        ):
            return int(queues.split(":")[1], 16)
    return None


async def _answer_while_trickling(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: Iterator[bytes]
) -> tuple[bytes, bytes]:
    """Send the rest of a request a piece every 0.2 s (slower than the stop's drain), and
    read its answer meanwhile: the answer's head and body."""

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for piece in pieces:
                await asyncio.sleep(0.2)
                writer.write(piece)
                await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        trickling.cancel()
        writer.close()
    head, _, text = answer.partition(b"\r\n\r\n")
    return head, text


async def test_a_request_still_arriving_when_the_drain_ends_is_a_503_not_a_500(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """A slow upload cut by the end of the stop's HTTP drain got uvicorn's 500 (a "server
    bug, do not retry" to its client) and an error with a traceback in the log, on every
    deploy. It is a 503 that closes the connection: try again, elsewhere."""
    path, port = config(tmp_path, "cut", tmp_path / "cut.db", fake_ollama.url)
    body = msgspec.json.encode({"template": "summarize", "params": {"text": "x" * 50_000}})
    async with serving(path, port) as service:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000]
        )
        await writer.drain()
        mine = writer.get_extra_info("sockname")[1]
        # The service has read what came so far (it is in the request): then the stop.
        await wait_until(lambda: _unread_bytes(port, mine) == 0, timeout=10)
        service.proc.send_signal(signal.SIGTERM)
        pieces = (body[at : at + 100] for at in range(1000, len(body) - 100, 100))
        head, text = await _answer_while_trickling(reader, writer, pieces)
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"connection: close" in head.lower(), head
        assert msgspec.json.decode(text)["code"] == "shutting_down", text
        await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
    err = service.stderr()
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err
    assert '"level": "error"' not in err, err  # a deploy pages nobody


async def test_a_keyless_upload_cut_by_the_stop_says_its_batch_keeps_the_rows(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """Its 503 said "send it again", though the rows read were kept in a batch that ran
    them: a client that did so made a second batch of them all (helper-126). It names the
    batch and the rows kept, and the batch is closed at once (it was closed only by the next
    start)."""
    db = tmp_path / "upload.db"
    path, port = config(tmp_path, "upload", db, fake_ollama.url)
    rows = b"text\n" + b"".join(b"row %d\n" % i for i in range(1, 501))
    async with serving(path, port) as service:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/v1/batches?template=summarize&format=csv HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n"
            % (len(rows), rows)
        )
        await writer.drain()

        def loading() -> bool:  # every row sent so far stored (50 a transaction)
            with contextlib.closing(sqlite3.connect(db)) as conn:
                found = conn.execute(
                    "SELECT b.status, count(r.batch_id) FROM batches b "
                    "LEFT JOIN batch_rows r ON r.batch_id = b.id GROUP BY b.id"
                ).fetchall()
            return found == [("loading", 500)]

        await wait_until(loading, timeout=20)
        service.proc.send_signal(signal.SIGTERM)

        chunks = (b"%x\r\n%s\r\n" % (len(r), r) for r in (b"row %d\n" % i for i in range(501, 999)))
        head, text = await _answer_while_trickling(reader, writer, chunks)
        assert head.startswith(b"HTTP/1.1 503"), head
        said = msgspec.json.decode(text)
        assert said["code"] == "shutting_down", said
        with contextlib.closing(sqlite3.connect(db)) as conn:
            [(batch_id, status, kept)] = conn.execute(
                "SELECT id, status, row_count FROM batches"
            ).fetchall()
        assert status == "loaded" and kept >= 500, (status, kept)
        assert f"batch {batch_id} keeps the {kept} rows read before" in said["message"], said
        assert "do not send it again whole" in said["message"], said
        await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)


async def test_a_download_cut_by_the_stop_is_seen_cut_not_whole(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """A batch's results still streaming when the stop's drain ended were ended cleanly
    (the chunked body's last chunk sent): the client took the rows it had for all of them."""
    path, port = config(tmp_path, "download", tmp_path / "download.db", fake_ollama.url)
    rows = b"".join(b'{"sentences": "%s"}\n' % (b"x" * 300) for _ in range(20_000))
    async with serving(path, port) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
            made = await client.post(
                "/api/v1/batches", params={"template": "summarize", "format": "jsonl"}, content=rows
            )
        assert made.status_code == 201, made.text  # 20,000 rows refused: 7 MB of results
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader slower than it
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        batch_id = made.json()["batch"]["id"]
        writer.write(
            b"GET /api/v1/batches/%d/results HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % batch_id
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
        service.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
        body = await asyncio.wait_for(reader.read(), timeout=30)
        writer.close()
    assert not body.endswith(b"0\r\n\r\n"), "a cut answer ended as if whole"
    err = service.stderr()
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err
    assert '"level": "error"' not in err, err  # a deploy pages nobody


async def test_a_wait_open_when_the_service_stops_is_answered_with_the_task_as_it_is(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    # Not cut off with a 500 at the end of the HTTP drain: the wait ends at once and answers
    # 200 with the running task, so its client waits again (on another process).
    fake_ollama.latency = 30.0
    path, port = config(tmp_path, "stop-wait", tmp_path / "stop-wait.db", fake_ollama.url)
    async with serving(path, port) as service:
        async with httpx.AsyncClient(base_url=service.url) as client:
            task = (await client.post("/api/v1/tasks", json=BODY)).json()
        await wait_until(lambda: fake_ollama.in_flight == 1, timeout=10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /api/v1/tasks/{task['id']}?wait=60 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        mine = writer.get_extra_info("sockname")[1]
        # The service has read the request (nothing left unread on its end): it waits.
        await wait_until(lambda: _unread_bytes(port, mine) == 0, timeout=10)
        stopped_at = asyncio.get_running_loop().time()
        service.proc.send_signal(signal.SIGTERM)
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        took = asyncio.get_running_loop().time() - stopped_at
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert msgspec.json.decode(body)["status"] == "running"
        assert took < 3.0 * load_slack(), took  # not the drain's 5 s
        await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
    assert "Traceback" not in service.stderr()


async def test_an_event_stream_open_when_the_service_stops_ends_at_once(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """A task's event stream ends with the stop, after the events it was sent (its client
    reconnects to a process that runs on), instead of holding the HTTP drain for 5 s."""
    fake_ollama.latency = 30.0
    path, port = config(tmp_path, "stop-sse", tmp_path / "stop-sse.db", fake_ollama.url)
    async with serving(path, port) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            task = (await client.post("/api/v1/tasks", json=BODY)).json()
            await wait_until(lambda: fake_ollama.in_flight == 1, timeout=10)
            seen = []
            stopped_at = 0.0
            url = f"/api/v1/tasks/{task['id']}/events"
            async with client.stream("GET", url) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        seen.append(line.removeprefix("event:").strip())
                    if line.startswith("retry:"):  # "come back": not the task's end
                        seen.append(line)
                    if "step.started" in seen and not stopped_at:
                        stopped_at = asyncio.get_running_loop().time()
                        service.proc.send_signal(signal.SIGTERM)
            took = asyncio.get_running_loop().time() - stopped_at
        assert stopped_at and took < 3.0 * load_slack(), (took, seen)  # not the drain's 5 s
        assert "task.finished" not in seen and seen[-1] == "retry: 1000", seen
        await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
    assert "Traceback" not in service.stderr()


async def test_a_dashboard_live_signal_open_when_the_service_stops_ends_at_once(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """An open overview or tasks page (its ``/ui/live``) held the stop's HTTP drain for its
    full 5 s, then was cancelled with an error and a traceback in the log."""
    path, port = config(tmp_path, "stop-live", tmp_path / "stop-live.db", fake_ollama.url)
    async with serving(path, port) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            stopped_at = 0.0
            async with client.stream("GET", "/ui/live") as stream:
                assert stream.status_code == 200  # its headers came: the stream is open
                stopped_at = asyncio.get_running_loop().time()
                service.proc.send_signal(signal.SIGTERM)
                async for _ in stream.aiter_bytes():
                    pass
            took = asyncio.get_running_loop().time() - stopped_at
        assert stopped_at and took < 3.0 * load_slack(), took  # not the drain's 5 s
        await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
    assert "Traceback" not in service.stderr()


async def test_the_overview_of_an_api_only_process_says_it_runs_no_workers(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    path, port = config(tmp_path, "api-only", tmp_path / "api-only.db", fake_ollama.url)
    async with serving(path, port, "--no-workers") as api:
        async with httpx.AsyncClient(base_url=api.url) as client:
            page = await client.get("/ui/overview/body")
    assert page.status_code == 200
    slots = re.search(r'<dd id="slots">([^<]*)</dd>', page.text)
    assert slots is not None, page.text
    assert slots.group(1).startswith("none here: this serves the API only (--no-workers)")


async def test_the_overview_counts_the_slots_of_every_process_of_its_host(
    fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    """It showed one process's slots ("4 of 4 (this process)" with 12 busy on the host), and
    which process answers is the kernel's pick."""
    fake_ollama.latency = 60.0
    path, port = config(tmp_path, "two", tmp_path / "two.db", fake_ollama.url)
    async with serving(path, port, "--processes", "2") as service:
        async with httpx.AsyncClient(base_url=service.url) as client:
            for _ in range(3):
                assert (await client.post("/api/v1/tasks", json=BODY)).status_code == 201
            await wait_until(lambda: fake_ollama.in_flight == 3, timeout=15)
            want = '3 of 8 <small class="muted">(this host&#39;s 2 worker processes)</small>'
            seen: list[str] = []

            async def both_counted() -> bool:  # the second process may still be starting
                body = (await client.get("/ui/overview/body")).text
                slots = re.search(r'<dd id="slots">(.*?)</dd>', body)
                seen.append(slots.group(1) if slots else body)
                return seen[-1] == want

            await wait_until(both_counted, timeout=15, interval=0.1)
            bodies = [(await client.get("/ui/overview/body")).text for _ in range(4)]
    for body in bodies:  # whichever process answered
        assert re.search(r'id="running-now">3<', body), body
        assert f'<dd id="slots">{want}</dd>' in body, (seen, body)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
async def test_a_second_stop_signal_hands_the_running_tasks_back_without_waiting_for_the_grace(
    fake_ollama: FakeOllama, tmp_path: Path, processes: int, sig: signal.Signals
) -> None:
    """A second Ctrl-C, or a second SIGTERM: the waits are skipped, and the signal is logged
    (by the supervisor, which passes it on, and by each process that hurries)."""
    fake_ollama.latency = 60.0
    db = tmp_path / "hurry.db"
    port = free_port()
    path = tmp_path / "hurry.toml"
    write_config(path, port=port, db=db, ollama_url=fake_ollama.url, shutdown_grace=30.0)
    async with serving(path, port, "--processes", str(processes)) as service:
        async with httpx.AsyncClient(base_url=service.url) as client:
            assert (await client.post("/api/v1/tasks", json=BODY)).status_code == 201
        await wait_until(lambda: fake_ollama.in_flight == 1, timeout=10)
        service.proc.send_signal(sig)
        # The first signal reached the workers: they wait for the running task (30 s grace).
        await wait_until(lambda: "pool.draining" in service.stderr(), timeout=15)
        hurried_at = asyncio.get_running_loop().time()
        service.proc.send_signal(sig)
        code = await asyncio.wait_for(service.proc.wait(), timeout=STOP_DEADLINE)
        took = asyncio.get_running_loop().time() - hurried_at
    err = service.stderr()
    assert took < 10.0, (took, err)
    assert code == 0, err
    assert statuses(db) == {1: "queued"}  # handed back, to run again
    assert "Traceback" not in err
    hurried = [json.loads(line) for line in err.splitlines() if "stop_hurried" in line]
    said = {(h["event"], h["level"], h.get("signal")) for h in hurried}
    assert ("server.stop_hurried", "warning", sig.name) in said, err
    if processes > 1:  # the supervisor logs it and passes it on
        assert ("supervisor.stop_hurried", "warning", sig.name) in said, err


async def test_a_cancel_sent_to_another_process_stops_the_task_at_once(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    # The API process flags the task; the worker process hears of it (SQLite: the commit;
    # PostgreSQL: its notification) and stops it within moments, not at its next lease
    # renewal (lease_seconds / 3). On both engines.
    fake_ollama.latency = 60.0
    api_path, api_port = config(tmp_path, "cancel-api", db_url, fake_ollama.url)
    worker_path, worker_port = config(tmp_path, "cancel-worker", db_url, fake_ollama.url)
    async with (
        serving(api_path, api_port, "--no-workers") as api,
        serving(worker_path, worker_port, "--no-api"),
        httpx.AsyncClient(base_url=api.url, timeout=30) as client,
    ):
        task = (await client.post("/api/v1/tasks", json=BODY)).json()
        # Taken at once as a rule; a full suite on 2 cores once took over 10 s.
        try:
            await wait_until(lambda: fake_ollama.in_flight == 1, timeout=30)
        except AssertionError:
            seen = (await client.get(f"/api/v1/tasks/{task['id']}")).json()
            raise AssertionError(f"the model was never asked; the task: {seen}") from None
        started = asyncio.get_running_loop().time()
        answer = await client.post(f"/api/v1/tasks/{task['id']}/cancel")
        took = asyncio.get_running_loop().time() - started
    assert answer.status_code == 200
    assert answer.json()["status"] == "cancelled", answer.json()
    assert took < 3.0 * load_slack(), took
