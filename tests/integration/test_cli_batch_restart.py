"""``orchestra batch run`` across a restart of the service: the run that follows its batch
waits for the service to come back, as the client's event streams and waits do; a run cut
during its upload, run again, says it resumes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from tests.conftest import sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, start_process, wait_until, write_config

ROWS = 12


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data.jsonl"
    rows = (json.dumps({"text": f"row {i}"}) + "\n" for i in range(ROWS))
    data.write_text("".join(rows))
    return data


async def test_a_run_following_its_batch_waits_out_a_restart_of_the_service(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    port, config = free_port(), tmp_path / "orchestra.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, concurrency=4)
    out, said = tmp_path / "out.jsonl", tmp_path / "said.txt"
    sidecar = tmp_path / "out.jsonl.batch"
    fake_ollama.close_gate("llama3.2")  # the rows wait while the run follows them
    service = await start_process(config)
    url = f"http://127.0.0.1:{port}"
    with said.open("wb") as stderr:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestra", "batch", "run", "summarize",
            str(_data(tmp_path)), "-o", str(out), "--url", url,
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    try:
        await wait_until(lambda: "batch_id" in (sidecar.read_text() if sidecar.exists() else ""))
        await wait_until(lambda: fake_ollama.in_flight > 0)
        service.send_signal(signal.SIGKILL)  # the service dies under the run that follows
        await service.wait()
        await wait_until(lambda: "lost the service" in said.read_text(), timeout=20)
        assert cli.returncode is None, said.read_text()  # it exited 3 here
        fake_ollama.open_gate("llama3.2")
        service = await start_process(config)  # takes the dead process's rows back at once
        printed, _ = await asyncio.wait_for(cli.communicate(), timeout=60)
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
        if service.returncode is None:
            service.send_signal(signal.SIGTERM)
            await service.wait()
    text = said.read_text()
    assert cli.returncode == 0, text
    assert "the service answers again" in text, text
    [(batch_id,)] = sql_rows(db_url, "SELECT max(batch_id) FROM batch_rows")
    assert printed.decode() == f"{batch_id}\n"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["status"]) for r in lines] == [(i + 1, "succeeded") for i in range(ROWS)]
    assert not sidecar.exists()


async def test_a_run_cut_before_its_upload_was_answered_says_it_sends_it_again(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    port, config = free_port(), tmp_path / "orchestra.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url)
    out = tmp_path / "out.jsonl"
    sidecar = tmp_path / "out.jsonl.batch"
    data = _data(tmp_path)
    # What a run cut during its upload leaves: the sidecar has the run's key, not yet a batch.
    url = f"http://127.0.0.1:{port}"
    service = await start_process(config)
    try:
        first = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestra", "batch", "run", "summarize",
            str(data), "-o", str(out), "--url", f"http://127.0.0.1:{free_port()}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, refused = await asyncio.wait_for(first.communicate(), timeout=60)
        assert first.returncode == 3, refused.decode()  # nothing answered at that URL
        kept = json.loads(sidecar.read_text())
        assert "key" in kept and "batch_id" not in kept, kept
        again = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestra", "batch", "run", "summarize",
            str(data), "-o", str(out), "--url", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, said = await asyncio.wait_for(again.communicate(), timeout=60)
    finally:
        service.send_signal(signal.SIGTERM)
        await service.wait()
    assert again.returncode == 0, said.decode()
    said_again = f"sending the upload again with its key (from {sidecar})"
    assert said_again in said.decode(), said.decode()
    assert len(out.read_text().splitlines()) == ROWS
