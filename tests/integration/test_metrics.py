"""GET /metrics: the series change as tasks run, read with prometheus-client's own parser over
real HTTP; the Grafana dashboard in deploy/ asks only for series that exist; the read scope
guards it unless [metrics] public; a workers-only process serves it; and with
``--processes N`` one scrape, whichever process answers, reports the whole host."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import structlog
import structlog.testing
from prometheus_client.parser import text_string_to_metric_families

from orchestra.api.auth import REFRESH_SECONDS
from orchestra.config import MetricsSettings, ServerSettings, Settings
from tests.conftest import (
    Service,
    StartService,
    make_keys,
    sql_rows,
    with_provider,
    with_workers,
)
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer
from tests.fixtures.servers import free_port, wait_until, write_config
from tests.integration.test_processes import pid_of, serving

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "orchestra.json"
TEXT = {"text": "a sentence for the model"}

#: One sample: its name and labels.
Key = tuple[str, frozenset[tuple[str, str]]]


class Scrape:
    """One /metrics answer, parsed by prometheus-client: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[Key, float] = {}
        self.labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value
                self.labels.setdefault(s.name, set()).update(s.labels)

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0: none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    @property
    def names(self) -> set[str]:
        return set(self.labels)

    def values(self, label: str) -> set[str]:
        """Every value ``label`` takes in any sample."""
        return {v for _, ls in self.samples for k, v in ls if k == label}


async def scrape(client: httpx.AsyncClient, **kwargs: Any) -> Scrape:
    response = await client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(response.text)


def with_metrics(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(settings, metrics=MetricsSettings(**changes))


# -- the dashboard's queries ---------------------------------------------------------------------

#: PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows' panels included."""
    panels = list(dashboard.get("panels") or [])
    while panels:
        panel = panels.pop()
        panels += panel.get("panels") or []
        for target in panel.get("targets") or []:
            yield panel["title"], target["expr"]
    for variable in dashboard.get("templating", {}).get("list") or []:
        if variable.get("type") == "query":
            query = variable["query"]
            yield variable["name"], query if isinstance(query, str) else query["query"]


def metric_names(expr: str) -> dict[str, set[str]]:
    """The metric names a PromQL expression reads, each with the labels it groups by or
    matches on (a rough parse, enough for the dashboard: no strings with braces in them)."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", expr)  # offset 1h
    names: dict[str, set[str]] = {}
    grouping = {
        label.strip()
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        word, matchers, call = match.groups()
        if call or word.lower() in _KEYWORDS or word.startswith("$"):
            continue
        if expr[max(match.start() - 1, 0)] == "$":  # a Grafana variable
            continue
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
        names.setdefault(word, set()).update(labels)
    for labels in names.values():
        labels |= grouping - {"le"}
    return names


def unresolved(dashboard: dict[str, Any], found: Scrape) -> list[str]:
    """The dashboard's queries that read a series /metrics does not have, or a label its
    samples lack."""
    out = []
    for title, expr in dashboard_queries(dashboard):
        names = metric_names(expr)
        if not names:
            out.append(f"{title}: no metric in {expr!r}")
        for name, labels in names.items():
            if name not in found.names:
                out.append(f"{title}: {name} is not in /metrics")
            elif missing := labels - found.labels[name]:
                out.append(f"{title}: {name} has no label {sorted(missing)}")
    return out


def test_the_query_parser_finds_names_and_labels() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, template) "
        '(rate(orchestra_x_bucket{status="failed"}[$__rate_interval]))) / ignoring(a) up'
    )
    assert metric_names(expr) == {
        "orchestra_x_bucket": {"template", "status", "a"},
        "up": {"template", "a"},
    }


# -- one process ---------------------------------------------------------------------------------


async def test_series_change_as_tasks_run_and_every_dashboard_query_resolves(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    settings = with_workers(settings, concurrency=3)
    # What the panels of fallbacks, model-process crashes and schedule ticks read: a chain of
    # two entries, an embedded provider (never started: no model file), a schedule. Their
    # counters start at 0.
    settings = with_provider(
        settings, "local", kind="embedded", model_path=str(tmp_path / "none.gguf")
    )
    settings = msgspec.structs.replace(
        settings, models={**settings.models, "spare": ["ollama/llama3.2", "ollama/qwen2.5"]}
    )
    async with start_service(settings) as svc:
        made = await svc.client.post(
            "/api/v1/schedules",
            json={"name": "hourly", "template": "summarize", "params": TEXT, "every": "1h"},
        )
        assert made.status_code == 201, made.text
        before = await scrape(svc.client)
        assert before("orchestra_worker_slots") >= 3  # (earlier tests' pools in this process)

        # Three that succeed.
        done = [await svc.wait((await svc.submit("summarize", **TEXT))["id"]) for _ in range(3)]
        assert [t["status"] for t in done] == ["succeeded"] * 3
        tokens_in = sum(s["usage"]["prompt_tokens"] for t in done for s in t["steps"])
        tokens_out = sum(s["usage"]["completion_tokens"] for t in done for s in t["steps"])
        assert tokens_in > 0 and tokens_out > 0

        # One whose model fails twice (500: retryable): retried once, then failed.
        fake_ollama.failure = Failure(500, "the model server is on fire")
        response = await svc.client.post(
            "/api/v1/tasks", json={"template": "summarize", "params": TEXT, "max_attempts": 2}
        )
        failed = await svc.wait(response.json()["id"], 30)
        assert failed["status"] == "failed" and len(failed["attempts"]) == 2
        fake_ollama.failure = None

        # One cancelled while queued (never ran), one cancelled while running.
        response = await svc.client.post(
            "/api/v1/tasks", json={"template": "summarize", "params": TEXT, "delay": 3600}
        )
        assert (await svc.client.post(f"/api/v1/tasks/{response.json()['id']}/cancel")).is_success
        fake_ollama.latency = 30
        slow = await svc.submit("summarize", **TEXT)

        async def busy() -> bool:
            found = await scrape(svc.client)
            return found("orchestra_worker_slots_busy") == before("orchestra_worker_slots_busy") + 1

        await wait_until(busy, timeout=15, interval=0.05)
        assert (await svc.client.post(f"/api/v1/tasks/{slow['id']}/cancel")).is_success
        assert (await svc.wait(slow["id"]))["status"] == "cancelled"
        fake_ollama.latency = 0

        async def all_counted() -> bool:  # the workers count just after the database write
            found = await scrape(svc.client)
            return found("orchestra_tasks_finished_total") - before(
                "orchestra_tasks_finished_total"
            ) == 6 and found("orchestra_worker_slots_busy") == before("orchestra_worker_slots_busy")

        await wait_until(all_counted, timeout=15, interval=0.05)

        after = await scrape(svc.client)
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        assert unresolved(dashboard, after) == []

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    t = {"template": "summarize"}
    call = {"provider": "ollama", "model": "llama3.2"}
    assert delta("orchestra_tasks_submitted_total", **t) == 6
    assert delta("orchestra_tasks_finished_total", **t, status="succeeded") == 3
    assert delta("orchestra_tasks_finished_total", **t, status="failed") == 1
    assert delta("orchestra_tasks_finished_total", **t, status="cancelled") == 2
    # Tasks by status come from this test's own database: absolute numbers.
    assert {
        s: after("orchestra_tasks", status=s) for s in ("succeeded", "failed", "cancelled")
    } == {
        "succeeded": 3,
        "failed": 1,
        "cancelled": 2,
    }
    assert (
        after("orchestra_tasks", status="queued") == after("orchestra_tasks", status="running") == 0
    )
    # Attempts that ran: 3 + 2 + the slow one.
    assert delta("orchestra_task_queue_wait_seconds_count", **t) == 6
    assert delta("orchestra_task_duration_seconds_count", **t, status="succeeded") == 3
    assert delta("orchestra_task_duration_seconds_count", **t, status="failed") == 1
    assert delta("orchestra_task_duration_seconds_sum", **t, status="succeeded") > 0
    assert delta("orchestra_step_duration_seconds_count", kind="llm", **call) == 6
    assert delta("orchestra_step_duration_seconds_count", kind="llm", status="succeeded") == 3
    # Failed steps are timed under the provider and model they asked last; so is the step the
    # cancel cut short.
    assert delta("orchestra_step_duration_seconds_count", kind="llm", status="failed", **call) == 2
    interrupted = {"kind": "llm", "status": "interrupted", **call}
    assert delta("orchestra_step_duration_seconds_count", **interrupted) == 1
    # Model calls: 3 answered, 2 failed, and the one the cancel cut short (never answered).
    assert delta("orchestra_model_call_duration_seconds_count", **call) == 6
    assert delta("orchestra_model_tokens_total", **call, direction="in") == tokens_in
    assert delta("orchestra_model_tokens_total", **call, direction="out") == tokens_out
    assert delta("orchestra_provider_errors_total", provider="ollama") == 2
    assert (
        delta("orchestra_provider_errors_total", provider="ollama", error="provider_unavailable")
        == 2
    )
    assert delta("orchestra_task_retries_total", **t) == 1
    # Its 500s marked the model, not the provider (test_providers.py).
    assert after("orchestra_provider_available", provider="ollama", kind="ollama") == 1
    assert delta("orchestra_worker_slots_busy") == 0
    assert delta("orchestra_worker_slots") == 0
    for result in ("delivered", "failed", "retrying"):
        assert ("orchestra_webhook_deliveries_total", frozenset({("result", result)})) in (
            after.samples
        )
    # No task ids anywhere: every label value is one of few.
    assert not re.search(r'task_id="|id="\d', after.text)


async def test_an_unreachable_provider_reads_zero(
    settings: Settings, start_service: StartService
) -> None:
    nothing = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = with_provider(settings, "ollama", url=nothing)
    async with start_service(unreachable) as svc:
        found = await scrape(svc.client)
        up = (
            "orchestra_provider_available",
            frozenset({("provider", "ollama"), ("kind", "ollama")}),
        )
        assert found.samples[up] == 0


async def test_metrics_need_the_read_scope_unless_public(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    tokens = await make_keys(db_url, "read")
    async with start_service(settings) as svc:
        assert (await svc.client.get("/metrics")).status_code == 401
        wrong = {"Authorization": "Bearer orc_nope_nope"}
        assert (await svc.client.get("/metrics", headers=wrong)).status_code == 401
        await scrape(svc.client, headers={"Authorization": f"Bearer {tokens['read']}"})
    async with start_service(with_metrics(settings, public=True)) as svc:
        await scrape(svc.client)
        # Public metrics open nothing else.
        assert (await svc.client.get("/api/v1/tasks")).status_code == 401
    async with start_service(with_metrics(settings, enabled=False)) as svc:
        answer = await svc.client.get(
            "/metrics", headers={"Authorization": f"Bearer {tokens['read']}"}
        )
        assert answer.status_code == 404


@pytest.mark.skipif(not ON_POSTGRESQL, reason="stops the database server")
async def test_a_database_outage_is_scraped_with_the_key_and_asked_again_later(
    settings: Settings,
    start_service: StartService,
    db_url: str,
    postgres: PostgresServer | None,
) -> None:
    """With Prometheus's read key, every scrape during an outage answered 503: the key check
    read the keys again and failed. Now the keys last read stay in use, and the outage is a
    series of its own."""
    assert postgres is not None
    tokens = await make_keys(db_url, "read")
    key = {"Authorization": f"Bearer {tokens['read']}"}
    async with start_service(settings) as svc:
        before = await scrape(svc.client, headers=key)
        assert before("orchestra_database_up") == 1 and "orchestra_tasks" in before.names
        sql_rows(db_url, "CHECKPOINT")
        postgres.stop()
        try:
            with structlog.testing.capture_logs() as logged:
                loop = asyncio.get_running_loop()
                stopped = loop.time()
                while loop.time() < stopped + REFRESH_SECONDS + 1:  # the keys read again
                    during = await scrape(svc.client, headers=key)
                    assert during("orchestra_database_up") == 0
                    assert "orchestra_tasks" not in during.names
                    assert during("orchestra_worker_slots") > 0  # the rest is served
                    probe = await svc.client.get("/health")  # no key: anyone's view
                    assert probe.status_code == 503
                    # Not where the database is (its host, port, socket): the read scope's.
                    assert probe.json() == {"status": "down", "database": "error"}
                    detailed = (await svc.client.get("/health", headers=key)).json()
                    assert "cannot be used" in detailed["database"], detailed
                    await asyncio.sleep(0.2)
                assert (await svc.client.get("/metrics")).status_code == 401  # still a key's
                # What needs the database answers 503, and says when to ask again.
                for _ in range(5):
                    listing = await svc.client.get("/api/v1/tasks", headers=key)
                    assert listing.status_code == 503, listing.text
                assert listing.json()["code"] == "storage_unavailable"
                assert listing.headers["Retry-After"] == "5"
        finally:
            postgres.resume()
        # A line an outage for each (a scrape, a probe, a refused request), not one each time:
        # 16 lines a second under load before.
        said = Counter(e["event"] for e in logged)
        for event in ("metrics.counts_failed", "health.database_failed", "api.storage_failed"):
            assert said[event] == 1, (event, said)

        async def back() -> bool:
            answer = await svc.client.get("/metrics", headers=key)
            return answer.status_code == 200 and Scrape(answer.text)("orchestra_database_up") == 1

        await wait_until(back, timeout=20, interval=0.2)


async def test_a_workers_only_process_serves_metrics(
    settings: Settings, start_service: StartService
) -> None:
    workers_only = msgspec.structs.replace(settings, server=ServerSettings(api=False))
    async with start_service(workers_only) as svc:
        found = await scrape(svc.client)
        assert "orchestra_tasks" in found.names
        answer = await svc.client.get("/api/v1/tasks")
        assert answer.status_code == 404 and answer.json()["code"] == "workers_only"


# -- several processes ---------------------------------------------------------------------------


async def test_one_scrape_reports_every_process_and_survives_a_restart(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    """Six tasks submitted over fresh connections (the kernel spreads them over the two
    processes); every scrape, whichever process answers, counts all six. After one process
    is killed and restarted, its counts stay and its slots are not counted twice."""
    port, config = free_port(), tmp_path / "two.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, concurrency=2)
    async with serving(config, port, "--processes", "2") as served:

        async def both_serve() -> bool:  # (/health answers once the first one serves)
            try:
                async with httpx.AsyncClient(base_url=served.url, timeout=5) as fresh:
                    return (await scrape(fresh))("orchestra_worker_slots") == 4
            except httpx.HTTPError:  # the restarted one's socket, before it serves
                return False

        await wait_until(both_serve, timeout=60, interval=0.1)
        ids = []
        for _ in range(6):
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
                response = await client.post(
                    "/api/v1/tasks", json={"template": "summarize", "params": TEXT}
                )
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            for task_id in ids:
                body = (await client.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})).json()
                assert body["status"] == "succeeded"

        async def all_counted() -> bool:
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as fresh:
                found = await scrape(fresh)
            return found("orchestra_task_duration_seconds_count") == 6

        async def every_scrape(expected_slots: float, lost: int = 0) -> None:
            for _ in range(6):  # new connections: they land on either process
                async with httpx.AsyncClient(base_url=served.url, timeout=30) as fresh:
                    found = await scrape(fresh)
                assert found("orchestra_tasks_submitted_total") == 6 + lost, found.text
                assert found("orchestra_tasks_finished_total", status="succeeded") == 6
                assert found("orchestra_tasks_finished_total", status="failed") == lost
                assert found("orchestra_task_duration_seconds_count") == 6
                assert found("orchestra_worker_slots") == expected_slots
                assert found("orchestra_tasks", status="succeeded") == 6  # not 12
                assert found("orchestra_tasks", status="failed") == lost

        # A task's counts follow its end in the database by a moment (its worker counts
        # once the write is done), and the answer above may come from the other process.
        await wait_until(all_counted, timeout=15, interval=0.05)
        await every_scrape(4)
        # The process running a task on its last attempt is killed: the task fails (the
        # supervisor has the other take it back), and is counted as finished, failed.
        fake_ollama.close_gate("llama3.2")
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            body = {"template": "summarize", "params": TEXT, "max_attempts": 1}
            held = (await client.post("/api/v1/tasks", json=body)).json()["id"]
            await wait_until(lambda: fake_ollama.held("llama3.2") == 1, timeout=10)
            [attempt] = (await client.get(f"/api/v1/tasks/{held}")).json()["attempts"]
        victim = pid_of(attempt["worker"])
        os.kill(victim, signal.SIGKILL)
        fake_ollama.open_gate("llama3.2")
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            failed = (await client.get(f"/api/v1/tasks/{held}", params={"wait": 20})).json()
        assert failed["status"] == "failed", failed
        assert failed["error"]["type"] == "lease_expired", failed
        await wait_until(
            lambda: len(served.services()) == 2 and victim not in served.services(), timeout=30
        )
        await wait_until(both_serve, timeout=60, interval=0.1)
        await every_scrape(4, lost=1)


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 14
    assert all(metric_names(expr) for _, expr in queries)


async def test_a_scrape_has_no_created_series_and_is_gzipped_when_asked(
    service: Service,
) -> None:
    """prometheus-client's ``*_created`` series (one gauge per counter and histogram child,
    unused by Prometheus over the text format) are not sent; Prometheus asks for gzip and
    gets it."""
    task = await service.submit("summarize", text="count me")
    await service.wait(task["id"])
    plain = await service.client.get("/metrics", headers={"accept-encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    assert "orchestra_tasks_submitted_total" in plain.text
    assert "_created" not in plain.text
    refused = await service.client.get("/metrics", headers={"accept-encoding": "gzip;q=0"})
    assert "content-encoding" not in refused.headers
    packed = await service.client.get("/metrics", headers={"accept-encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert int(packed.headers["content-length"]) < len(plain.content) / 3
    assert "orchestra_tasks_submitted_total" in packed.text  # httpx unpacks it
    assert packed.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_a_running_task_cancelled_is_timed_as_cancelled(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """``orchestra_task_duration_seconds`` times the attempt that ended a task, whatever the
    status: a running task cancelled too (it was left out)."""
    before = await scrape(service.client)  # the series are the test process's, shared
    fake_ollama.close_gate("llama3.2")
    task = await service.submit("summarize", text="held")  # model: default, llama3.2
    await wait_until(lambda: fake_ollama.held("llama3.2") == 1, timeout=15)
    answer = await service.client.post(f"/api/v1/tasks/{task['id']}/cancel")
    assert answer.status_code == 200, answer.text
    assert (await service.wait(task["id"]))["status"] == "cancelled"
    count, total = "orchestra_task_duration_seconds_count", "orchestra_task_duration_seconds_sum"
    cancelled = {"template": "summarize", "status": "cancelled"}

    async def timed() -> bool:  # the worker times it just after the database write
        found = await scrape(service.client)
        return found(count, **cancelled) - before(count, **cancelled) >= 1

    await wait_until(timed, timeout=10)
    found = await scrape(service.client)
    assert found(count, **cancelled) - before(count, **cancelled) == 1
    assert found(total, **cancelled) > before(total, **cancelled)


async def test_tasks_cancelled_in_bulk_while_queued_are_counted_as_finished(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """A batch's cancel and the dashboard's bulk cancel count the queued tasks they cancel,
    as a single cancel does: only the running ones were counted, so ``submitted -
    finished`` never came back down."""
    before = await scrape(service.client)
    fake_ollama.close_gate("llama3.2")
    rows = "".join(f'{{"text": "row {i}"}}\n' for i in range(6))
    upload = await service.client.post(
        "/api/v1/batches", params={"template": "summarize", "format": "jsonl"}, content=rows
    )
    assert upload.status_code == 201, upload.text
    await wait_until(lambda: fake_ollama.held("llama3.2") >= 1, timeout=15)
    batch_id = upload.json()["batch"]["id"]
    cancel = await service.client.post(f"/api/v1/batches/{batch_id}/cancel")
    assert cancel.status_code == 200, cancel.text
    later = []
    for i in range(2):
        body = {"template": "summarize", "params": {"text": f"later {i}"}, "delay": 3600}
        later.append((await service.client.post("/api/v1/tasks", json=body)).json())
    bulk = await service.client.post(
        "/ui/tasks/bulk",
        data={"action": "cancel", "id": [str(t["id"]) for t in later]},
        headers={"sec-fetch-site": "same-origin"},
    )
    assert bulk.status_code == 303, bulk.text

    async def all_cancelled() -> bool:  # (the running ones by their workers)
        listed = await service.client.get("/api/v1/tasks", params={"status": "cancelled"})
        return len(listed.json()["items"]) == 8

    await wait_until(all_cancelled, timeout=15)
    fake_ollama.open_gate("llama3.2")

    async def counted() -> bool:
        found = await scrape(service.client)
        labels = {"template": "summarize", "status": "cancelled"}
        name = "orchestra_tasks_finished_total"
        return found(name, **labels) - before(name, **labels) == 8

    await wait_until(counted, timeout=15)


async def test_a_task_timeout_and_a_cancel_are_timed_as_model_calls_and_steps(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """A model call cut short by the task's timeout or by a cancel recorded nothing in the
    latency histograms: it is timed now (the step under status ``interrupted``)."""
    calls = "orchestra_model_call_duration_seconds_count"
    calls_sum = "orchestra_model_call_duration_seconds_sum"
    steps = "orchestra_step_duration_seconds_count"
    model = {"model": "llama3.2"}
    cut = {"status": "interrupted", "kind": "llm", **model}

    before = await scrape(service.client)  # the series are the test process's, shared
    fake_ollama.latency = 3
    response = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": TEXT, "timeout": 1, "max_attempts": 1},
    )
    assert response.status_code == 201, response.text
    timed_out = await service.wait(response.json()["id"], 15)
    assert (timed_out["status"], timed_out["error"]["type"]) == ("failed", "timeout")
    after_timeout = await scrape(service.client)
    assert after_timeout(calls, **model) - before(calls, **model) == 1
    assert after_timeout(calls_sum, **model) - before(calls_sum, **model) >= 0.9
    assert after_timeout(steps, **cut) - before(steps, **cut) == 1

    fake_ollama.latency = 0
    fake_ollama.close_gate("llama3.2")
    task = await service.submit("summarize", text="held")
    await wait_until(lambda: fake_ollama.held("llama3.2") == 1, timeout=15)
    answer = await service.client.post(f"/api/v1/tasks/{task['id']}/cancel")
    assert answer.status_code == 200, answer.text
    assert (await service.wait(task["id"]))["status"] == "cancelled"
    after_cancel = await scrape(service.client)
    assert after_cancel(calls, **model) - after_timeout(calls, **model) == 1
    assert after_cancel(steps, **cut) - after_timeout(steps, **cut) == 1


@pytest.mark.sqlite_only
async def test_a_database_that_refuses_writes_is_scraped_as_not_writable(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    """With SQLite's write lock held, submits got 503 and /health said degraded, while every
    series said the database was fine (``orchestra_database_up`` 1: reads answer)."""
    quick = msgspec.structs.replace(
        settings, database=msgspec.structs.replace(settings.database, busy_timeout_ms=300)
    )
    async with start_service(quick) as svc:
        before = await scrape(svc.client)
        assert before("orchestra_database_writable") == 1
        shell = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None)
        try:
            shell.execute("BEGIN IMMEDIATE")  # as a person in the sqlite3 shell would
            locked = await svc.client.post(
                "/api/v1/tasks", json={"template": "summarize", "params": TEXT}
            )
            assert locked.status_code == 503, locked.text
            during = await scrape(svc.client)
        finally:
            shell.execute("ROLLBACK")
            shell.close()
        assert during("orchestra_database_up") == 1  # reads answer
        assert during("orchestra_database_writable") == 0
        accepted = await svc.submit("summarize", **TEXT)
        assert (await svc.wait(accepted["id"]))["status"] == "succeeded"
        assert (await scrape(svc.client))("orchestra_database_writable") == 1


@pytest.mark.timeout(180)
async def test_the_label_bound_holds_for_the_host_across_processes_and_restarts(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    """The 200 values a label may take were counted per process, and a restarted process got
    a fresh 200: a scrape of two processes reported up to 200 x (processes + restarts)
    models. Tasks naming 300 models (unknown to the model server: each fails at once), over
    two processes one of which is killed and restarted halfway, show 200 at most."""
    port, config = free_port(), tmp_path / "labels.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, concurrency=4)
    async with serving(config, port, "--processes", "2") as served:

        async def both_serve() -> bool:
            try:
                async with httpx.AsyncClient(base_url=served.url, timeout=5) as fresh:
                    return (await scrape(fresh))("orchestra_worker_slots") == 8
            except httpx.HTTPError:
                return False

        async def run(models: range) -> None:
            ids = []
            # A connection for each submit, so both processes take some: not a client for
            # each (a loaded run's minute ran out loading a new client's certificates).
            fresh = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=served.url, timeout=30, limits=fresh) as client:
                for n in models:
                    response = await client.post(
                        "/api/v1/tasks",
                        json={
                            "template": "summarize",
                            "params": TEXT,
                            "model": f"model-{n}",
                            "max_attempts": 1,
                        },
                    )
                    assert response.status_code == 201, response.text
                    ids.append(response.json()["id"])
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
                for task_id in ids:
                    answer = await client.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})
                    assert answer.json()["status"] == "failed"

        await wait_until(both_serve, timeout=60, interval=0.1)
        await run(range(150))
        victim = served.services()[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(
            lambda: len(served.services()) == 2 and victim not in served.services(), timeout=30
        )
        await wait_until(both_serve, timeout=60, interval=0.1)
        await run(range(150, 300))

        async def all_counted() -> bool:
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as fresh:
                found = await scrape(fresh)
            return found("orchestra_model_call_duration_seconds_count") == 300

        await wait_until(all_counted, timeout=15, interval=0.05)
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as fresh:
            found = await scrape(fresh)
    for series in (
        "orchestra_model_call_duration_seconds_count",
        "orchestra_step_duration_seconds_count",
    ):
        models = {
            dict(labels)["model"]
            for (name, labels), value in found.samples.items()
            if name == series and value > 0
        }
        assert len(models - {"other"}) == 200, (series, len(models))
        assert "other" in models


def pg_system(db_url: str, sql: str) -> None:
    """``sql`` outside a transaction (``ALTER SYSTEM``), then the server's settings reloaded:
    every session's next transaction sees them."""
    import psycopg

    from orchestra.db.postgres_engine import conninfo

    with psycopg.connect(conninfo(db_url), autocommit=True) as pg:
        pg.execute(sql)  # type: ignore[arg-type]
        pg.execute("SELECT pg_reload_conf()")


@pytest.mark.skipif(not ON_POSTGRESQL, reason="makes the database server read-only")
async def test_a_read_only_postgresql_is_scraped_as_not_writable(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    """PostgreSQL turned read-only (a standby promoted the other way, a disk-full guard): reads
    answer, every write is refused."""
    async with start_service(settings) as svc:
        assert (await scrape(svc.client))("orchestra_database_writable") == 1
        pg_system(db_url, "ALTER SYSTEM SET default_transaction_read_only = on")
        try:

            async def refused() -> bool:
                answer = await svc.client.post(
                    "/api/v1/tasks", json={"template": "summarize", "params": TEXT}
                )
                return answer.status_code == 503

            await wait_until(refused, timeout=10, interval=0.1)
            during = await scrape(svc.client)
        finally:
            pg_system(db_url, "ALTER SYSTEM RESET default_transaction_read_only")
        assert during("orchestra_database_up") == 1
        assert during("orchestra_database_writable") == 0

        async def accepted() -> bool:
            answer = await svc.client.post(
                "/api/v1/tasks", json={"template": "summarize", "params": TEXT}
            )
            return answer.status_code == 201

        await wait_until(accepted, timeout=10, interval=0.1)
        assert (await scrape(svc.client))("orchestra_database_writable") == 1


async def test_http_requests_are_counted_by_method_route_pattern_and_status(
    service: Service,
) -> None:
    """What an operator graphs first: requests by route and status, and their latency. The
    route is the matched pattern, never the path (a task id would make a series per task)."""
    task = await service.submit("summarize", text="count my requests")
    before = await scrape(service.client)
    one = "/api/v1/tasks/{task_id}"
    assert (await service.client.get(f"/api/v1/tasks/{task['id']}")).status_code == 200
    assert (await service.client.get("/api/v1/tasks/987654321")).status_code == 404
    assert (await service.client.get("/no/such/path")).status_code == 404
    assert (await service.client.post("/api/v1/tasks", content=b"{")).status_code == 400
    assert (await service.client.request("TRACE", "/api/v1/tasks")).status_code == 405
    assert (await service.client.head("/metrics")).status_code == 200
    after = await scrape(service.client)

    def more(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    requests = "orchestra_http_requests_total"
    assert more(requests, method="GET", route=one, status="200") == 1
    assert more(requests, method="GET", route=one, status="404") == 1
    assert more(requests, method="GET", route="unmatched", status="404") == 1
    assert more(requests, method="POST", route="/api/v1/tasks", status="400") == 1
    assert more(requests, method="other", status="405") == 1
    assert more(requests, method="HEAD", route="/metrics", status="200") == 1
    assert more(requests, method="GET", route="/metrics", status="200") == 1  # `before`
    assert more(requests) == 7
    assert more("orchestra_http_request_duration_seconds_count", method="GET", route=one) == 2
    assert not [route for route in after.values("route") if re.search(r"/\d+(/|$)", route)]


async def test_every_lease_expiry_outcome_is_a_series_from_the_start(service: Service) -> None:
    """Known label values start at 0 so that rate() sees the first one: a lease expiry that
    ends a task asked to cancel (``cancelled``) had no series until it happened."""
    found = await scrape(service.client)
    name = "orchestra_lease_expiries_total"
    seen = {v for (n, ls), _ in found.samples.items() if n == name for k, v in ls if k == "outcome"}
    assert seen == {"queued", "failed", "cancelled"}, seen
