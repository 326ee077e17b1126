"""``orchestra batch run TEMPLATE data.csv -o results.jsonl``: upload a dataset as a batch,
show its progress, and write its results in row order.

Interrupted, the same command resumes: the upload carries an idempotency key made from the
file's content and the options, so sending it again reaches the same batch (rows it has are
not queued twice), and a sidecar file next to the output (``results.jsonl.batch``) remembers
the batch, so a batch already loaded is only followed, not uploaded again.

Its HTTP calls are :mod:`orchestra.client`'s (one HTTP layer for the CLI and Python code).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import click

from orchestra.cli_common import client_for, config_option, url_option

#: Bytes per read of the file when hashing it.
_CHUNK = 1 << 20
#: Seconds between progress reads.
_POLL = 1.0


def _format_of(path: Path, given: str | None) -> str:
    if given:
        return given
    return "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"


def _key(data: Path, query: dict[str, Any]) -> str:
    """The idempotency key: the file's content and the options (the same run, the same key)."""
    digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode())
    with data.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"cli-{digest.hexdigest()[:40]}"


@click.group()
def batch() -> None:
    """Run a template over every row of a dataset."""


@batch.command("run")
@click.argument("template")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Results file: .csv for CSV, else JSON lines.",
)
@click.option("--model", help="Model for every row (default: the template's).")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--atomic", is_flag=True, help="Refuse the whole batch on one bad row.")
@click.option("--max-attempts", type=int, help="Attempts per row.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), help="DATA's format.")
@url_option
@config_option
def run(
    template: str,
    data: Path,
    output: Path,
    model: str | None,
    priority: int,
    atomic: bool,
    max_attempts: int | None,
    fmt: str | None,
    url: str | None,
    config_path: str | None,
) -> None:
    """Upload DATA (CSV with a header, or JSON lines) as a batch of TEMPLATE, show its
    progress, and write its results to --output in row order. Run again to resume."""
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    query: dict[str, Any] = {"template": template, "format": _format_of(data, fmt)}
    query |= {"priority": priority, "atomic": str(atomic).lower()}
    if model:
        query["model"] = model
    if max_attempts:
        query["max_attempts"] = max_attempts
    sidecar = output.with_name(output.name + ".batch")
    key = _key(data, query)
    remembered = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    options = {k: v for k, v in query.items() if k not in ("template", "format")}
    with client_for(url, config_path) as client, Progress(*columns) as bar:
        batch_id = remembered.get("batch_id") if remembered.get("key") == key else None
        loaded = batch_id is not None and client.get_batch(batch_id).batch.status == "loaded"
        if not loaded:
            sending = bar.add_task("upload", total=data.stat().st_size)
            answer = client.create_batch(
                template,
                data,
                data_format=query["format"],
                idempotency_key=key,
                on_sent=lambda n: bar.advance(sending, n),
                **options,
            )
            batch_id = answer.batch.id
            sidecar.write_text(json.dumps({"batch_id": batch_id, "key": key}))
            for p in answer.problems:
                bar.console.print(f"row {p.row} (line {p.line}) refused: {p.message}")
            if answer.refused > len(answer.problems):
                bar.console.print(f"{answer.refused} rows refused in all (see the results)")
        assert batch_id is not None
        running = bar.add_task(f"batch {batch_id}", total=None)
        while True:
            state = client.get_batch(batch_id)
            counts = state.counts
            wanted = state.batch.rows - state.batch.invalid
            bar.update(running, total=max(wanted, 1), completed=state.finished)
            if counts.get("queued", 0) + counts.get("running", 0) == 0:
                break
            time.sleep(_POLL)
        client.save_batch_results(batch_id, output)
    sidecar.unlink(missing_ok=True)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if n)
    click.echo(f"batch {batch_id}: {summary}; results in {output}")
