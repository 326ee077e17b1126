"""``orchestra batch run TEMPLATE data.csv -o results.jsonl``: upload a dataset as a batch,
show its progress, and write its results in row order.

Interrupted, the same command resumes: a sidecar file next to the output
(``results.jsonl.batch``), written before the upload starts, keeps the run's idempotency key
(the file's digest, the options, and a random part) and, once known, its batch. Run again
with the same file and options, the command sends the same key, so it reaches the same batch
(rows it has are not queued twice), and a batch already loaded is only followed. The sidecar
goes once the results are written: the next run is a new batch (the template may have
changed since), never the old batch's results again.

Its HTTP calls are :mod:`orchestra.client`'s (one HTTP layer for the CLI and Python code).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestra.cli_common import (
    CliError,
    ServerUnreachable,
    client_for,
    config_option,
    url_option,
)
from orchestra.client.batch_calls import SUFFIXES as _SUFFIXES
from orchestra.client.errors import ApiError, ConnectionFailed

if TYPE_CHECKING:  # imported when the command runs: the others start faster
    from orchestra.client.sync import Client
    from orchestra.wire.batches import ProgressOut

#: Bytes per read of the file when hashing it.
_CHUNK = 1 << 20
#: Seconds between progress reads.
_POLL = 1.0


def _format_of(path: Path, given: str | None) -> str:
    """DATA's format: ``--format``, else from its suffix (.csv; .jsonl, .ndjson).

    Raises:
        click.UsageError: the suffix says nothing the server reads (a .tsv's tabs, a .txt).
    """
    if given:
        return given
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if suffix == ".tsv":
        raise click.UsageError(
            f"{path}: tab-separated files are not read: convert it to CSV (comma-separated) "
            "or JSON lines, then give --format if its name does not say which"
        )
    raise click.UsageError(
        f"{path}: cannot tell its format from the name {path.name!r}: give --format csv "
        "(a header, then a record per row) or --format jsonl (an object a line)"
    )


def _digest(data: Path, query: dict[str, Any]) -> str:
    """The file's content and the options: what a resumed run must share with the first."""
    digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode())
    with data.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:40]


def _remembered(sidecar: Path, digest: str) -> dict[str, Any]:
    """The run the sidecar remembers, when it was of this file with these options (else
    nothing: a new run)."""
    try:
        kept = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(kept, dict) or kept.get("digest") != digest or not kept.get("key"):
        return {}
    return kept


def _refused(exc: ApiError) -> bool:
    """Whether the service refused the upload before it made a batch: a key it does not take,
    a template it does not have, an atomic batch with a bad row. (A 400 or a 413 may come
    once rows are stored, in a batch the same key resumes.)"""
    return exc.status in (401, 403, 404, 422)


def _refusal(problem: Any) -> str:
    """A refused row as one line: where it is, and each field with why."""
    why = "; ".join(f"{f.field}: {f.message}" for f in problem.fields) or problem.message
    return f"row {problem.row} (line {problem.line}) refused: {why}"


class _Follow:
    """A batch's progress read through a restart of the service: a read that gets no answer,
    or a 502, 503 or 504, is tried again as the client's waits are (for up to its reconnect
    policy's window, then its ConnectionFailed stands: exit 3; the same command resumes),
    saying so once per outage. It exited 3 at once: a restart stopped every run it followed."""

    def __init__(self, client: Client, batch_id: int, say: Callable[[str], None]) -> None:
        from orchestra.client.follow import Poll

        self._client, self._batch_id, self._say = client, batch_id, say
        what = f"following batch {batch_id}, the service was lost"
        self._poll = Poll(client.url, client.reconnect_policy, reached=True, what=what)
        self._down = False

    def progress(self) -> ProgressOut:
        """The batch's progress, once the service answers."""
        from orchestra.client.errors import ClientError

        while True:
            try:
                state = self._client.get_batch(self._batch_id)
            except ClientError as exc:
                pause = self._poll.retry_in(exc)  # raises it when it stands
                if not self._down:
                    window = self._client.reconnect_policy.window
                    self._say(f"lost the service ({exc}); trying again for {window:g} s")
                    self._down = True
                time.sleep(pause)
                continue
            self._poll.answered()
            if self._down:
                self._say("the service answers again")
                self._down = False
            return state


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
@click.option("--max-attempts", type=click.IntRange(min=1), help="Attempts per row.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    help="DATA's format (default: from its suffix, .csv, .jsonl or .ndjson).",
)
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
    progress, and write its results to --output in row order. Interrupted, run it again to
    resume; once done, running it again makes a new batch. Exits 1 when a row did not
    succeed (failed, cancelled or refused), with every row's outcome in --output."""
    from rich.console import Console
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
    if max_attempts is not None:
        query["max_attempts"] = max_attempts
    if not output.parent.is_dir():  # (the sidecar goes there first)
        raise click.BadParameter(
            f"the folder {str(output.parent)!r} does not exist", param_hint="'-o' / '--output'"
        )
    sidecar = output.with_name(output.name + ".batch")
    digest = _digest(data, query)
    remembered = _remembered(sidecar, digest)
    key = remembered.get("key") or f"cli-{digest[:24]}-{secrets.token_hex(8)}"
    if not remembered:  # before the upload: an interrupted one resumes with this key
        sidecar.write_text(json.dumps({"digest": digest, "key": key}))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    options = {k: v for k, v in query.items() if k not in ("template", "format")}
    # People's lines (progress, refusals, the summary) on stderr; stdout has the batch's id.
    people = Console(stderr=True)
    with client_for(url, config_path) as client, Progress(*columns, console=people) as bar:
        batch_id = remembered.get("batch_id")
        if batch_id is not None:
            bar.console.print(f"resuming batch {batch_id} (from {sidecar})", soft_wrap=True)
        elif remembered:  # cut before its upload was answered: the same key resumes it
            said = f"sending the upload again with its key (from {sidecar})"
            bar.console.print(said, soft_wrap=True)
        loaded = batch_id is not None and client.get_batch(batch_id).batch.status == "loaded"
        told_refused = False  # the upload's answer names its refused rows; a resume has none
        if not loaded:
            sending = bar.add_task("upload", total=data.stat().st_size)
            try:
                answer = client.create_batch(
                    template,
                    data,
                    data_format=query["format"],
                    idempotency_key=key,
                    on_sent=lambda n: bar.advance(sending, n),
                    **options,
                )
            except ApiError as exc:
                if not remembered and _refused(exc):  # no batch to resume: no key to keep
                    sidecar.unlink(missing_ok=True)
                raise
            except ConnectionFailed as exc:
                if not exc.broke:
                    raise
                # It may have been carried out (exit 6 elsewhere), but with its key: the
                # same command sends it again and makes no second batch.
                raise ServerUnreachable(
                    f"{exc}; the same command sends it again with its key (from {sidecar}), "
                    "which makes no second batch"
                ) from None
            batch_id = answer.batch.id
            sidecar.write_text(json.dumps({"digest": digest, "key": key, "batch_id": batch_id}))
            told_refused = True
            for p in answer.problems:
                bar.console.print(_refusal(p), soft_wrap=True)
            if answer.refused > len(answer.problems):
                bar.console.print(
                    f"{answer.refused} rows refused in all (see the results)", soft_wrap=True
                )
        assert batch_id is not None
        running = bar.add_task(f"batch {batch_id}", total=None)
        follow = _Follow(client, batch_id, bar.console.print)
        while True:
            state = follow.progress()
            counts = state.counts
            wanted = state.batch.rows - state.batch.invalid
            bar.update(running, total=max(wanted, 1), completed=state.finished)
            if counts.get("queued", 0) + counts.get("running", 0) == 0:
                break
            time.sleep(_POLL)
        client.save_batch_results(batch_id, output)
        if not told_refused and state.batch.invalid:
            refused = state.batch.invalid
            bar.console.print(
                f"{refused} row{'' if refused == 1 else 's'} refused when the upload was read "
                f"(in {output}, each with its reason)",
                soft_wrap=True,
            )
    sidecar.unlink(missing_ok=True)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if n)
    click.echo(f"batch {batch_id}: {summary}; results in {output}", err=True)
    click.echo(batch_id)
    missed = sum(counts.get(s, 0) for s in ("failed", "cancelled", "invalid", "deleted"))
    if missed:
        raise CliError(f"{missed} of {state.batch.rows} rows did not succeed: see {output}")
