"""Secrets stay secret: a provider URL's password (``http://admin:PASSWORD@host``) and a key in
its query never show in /health, /api/v1/models, the dashboard, a failed task's error or the
service's log; and /health shows providers only to a caller with the read scope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import msgspec

from orchestra.config import AuthSettings, Settings
from tests.conftest import StartService, make_keys, with_provider
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.hostile import hostile_service
from tests.fixtures.servers import free_socket, wait_until
from tests.fixtures.webhook_receiver import Receiver

PASSWORD = "s3cr3t-pw-7f1c"
QUERY_KEY = "qkey-9d2e41"
SECRETS = (PASSWORD, QUERY_KEY)


def _with_password(url: str) -> str:
    """``url`` (http://127.0.0.1:PORT) with userinfo carrying :data:`PASSWORD`."""
    return url.replace("http://", f"http://admin:{PASSWORD}@", 1)


def _assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} shown in {where}: {text[:2000]}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_provider_password_never_shows_in_answers_errors_or_the_log(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    tokens = await make_keys(f"sqlite+aiosqlite:///{tmp_path / 'orchestra.db'}", "read", "submit")
    sock = free_socket()  # bound but not listening: connections are refused
    closed = sock.getsockname()[1]
    extra = "\n".join(
        [
            '[providers.dead]\nkind = "ollama"',
            f'url = "http://admin:{PASSWORD}@127.0.0.1:{closed}"',
            '[providers.oai]\nkind = "openai"',
            f'url = "http://admin:{PASSWORD}@127.0.0.1:{closed}/v1?key={QUERY_KEY}"',
            # httpx's line per request shows from debug: its URLs must be redacted too.
            '[logging]\nlevel = "debug"',
        ]
    )
    good = _with_password(fake_ollama.url)
    try:
        async with hostile_service(tmp_path, good, extra) as svc:
            client = svc.client
            anonymous = await client.get("/health")
            read = _bearer(tokens["read"])
            detailed = await client.get("/health", params={"check": "now"}, headers=read)
            models = await client.get("/api/v1/models", headers=read)

            submit = _bearer(tokens["submit"])
            tasks = {}
            for model in ("dead/llama3.2", "oai/gpt", "ollama/llama3.2"):
                body = {"template": "summarize", "params": {"text": "hi"}, "model": model}
                created = await client.post(
                    "/api/v1/tasks", json={**body, "max_attempts": 1}, headers=submit
                )
                assert created.status_code == 201, created.text
                tasks[model] = created.json()["id"]
            done = {}
            for model, task_id in tasks.items():
                answer = await client.get(
                    f"/api/v1/tasks/{task_id}", params={"wait": 30}, headers=read
                )
                done[model] = answer.json()
            details = await client.get(f"/api/v1/tasks/{tasks['dead/llama3.2']}", headers=read)

            # The dashboard's providers page, through a session made from the read key.
            same_site = {"Sec-Fetch-Site": "same-origin"}
            login = await client.post("/ui/login", data={"key": tokens["read"]}, headers=same_site)
            assert login.status_code == 303, login.text
            cookies = {"orchestra_session": login.cookies["orchestra_session"]}
            async with httpx.AsyncClient(base_url=svc.url, cookies=cookies) as browser:
                page = await browser.get("/ui/providers")
            log = svc.config.with_suffix(".log")

            # httpx logs each request when its response ends: wait for the chat call's line.
            await wait_until(lambda: "/api/chat" in log.read_text(), timeout=10)
    finally:
        sock.close()

    assert anonymous.status_code == 200
    assert set(anonymous.json()) == {"status", "database"}
    assert anonymous.json()["database"] == "ok"

    assert detailed.status_code == 200
    providers = detailed.json()["providers"]
    assert providers["ollama"]["available"] is True
    assert (
        f"at http://***@127.0.0.1:{fake_ollama.url.rsplit(':', 1)[1]}"
        in (providers["ollama"]["detail"])
    )
    assert providers["dead"]["available"] is False
    assert f"http://***@127.0.0.1:{closed}" in providers["dead"]["detail"]
    assert f"http://***@127.0.0.1:{closed}/v1?key=***" in providers["oai"]["detail"]

    assert models.status_code == 200
    assert "http://***@127.0.0.1" in models.text

    assert done["ollama/llama3.2"]["status"] == "succeeded"
    for model in ("dead/llama3.2", "oai/gpt"):
        assert done[model]["status"] == "failed", done[model]
        message = done[model]["error"]["message"]
        assert f"http://***@127.0.0.1:{closed}" in message, message
    assert page.status_code == 200 and "http://***@127.0.0.1" in page.text

    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [line["event"] for line in lines if line.get("logger") == "httpx"]
    assert any(e.startswith("HTTP Request: POST http://***@127.0.0.1:") for e in requests)
    for where, shown in [
        ("/health without a key", anonymous.text),
        ("/health with a read key", detailed.text),
        ("/api/v1/models", models.text),
        ("task errors", json.dumps(done)),
        ("a task's details", details.text),
        ("the dashboard's providers page", page.text),
        ("the service log", text),
    ]:
        _assert_no_secret(where, shown)


async def test_a_server_error_repeating_the_url_is_redacted(
    settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    # A proxy in front of the model server may name the URL it was asked for in its answer.
    fake_ollama.failure = Failure(502, f"upstream http://admin:{PASSWORD}@10.0.0.7:11434 down")
    secret_url = with_provider(settings, "ollama", url=_with_password(fake_ollama.url))
    async with start_service(secret_url) as svc:
        task = await svc.submit("summarize", text="hi")
        done = await svc.wait(task["id"])
    assert done["status"] == "failed"
    assert "upstream http://***@10.0.0.7:11434 down" in done["error"]["message"]
    _assert_no_secret("a task's error", json.dumps(done))


async def test_health_without_a_key_shows_only_status_and_database_once_keys_exist(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    tokens = await make_keys(db_url, "read")
    async with start_service(settings) as svc:
        for path in ("/health", "/api/v1/health"):
            for headers in ({}, _bearer("orc_abcdefgh_wrong"), _bearer("not-a-key")):
                answer = await svc.client.get(path, params={"check": "now"}, headers=headers)
                assert answer.status_code == 200, (path, headers)
                assert answer.json() == {"status": "ok", "database": "ok"}, (path, headers)
            keyed = await svc.client.get(path, headers=_bearer(tokens["read"]))
            assert keyed.status_code == 200
            body: dict[str, Any] = keyed.json()
            assert set(body) == {"status", "database", "workers", "providers", "version"}
            assert body["providers"]["ollama"]["models"]


async def test_health_shows_details_where_no_key_is_needed(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    # Keys exist, but anonymous callers may read: they see what a read key sees.
    await make_keys(db_url, "admin")
    open_reads = msgspec.structs.replace(
        settings, auth=AuthSettings(allow_anonymous=True, anonymous_scope="read")
    )
    async with start_service(open_reads) as svc:
        body = (await svc.client.get("/health")).json()
    assert "ollama" in body["providers"] and body["version"]


async def test_a_webhook_urls_secret_path_and_code_never_reach_the_debug_log(
    tmp_path: Path, fake_ollama: FakeOllama, db_url: str
) -> None:
    # Slack's and Discord's webhook URLs carry their secret in the path, Azure Functions' in
    # `?code=`: at debug level httpx logs every request's URL, and it must not log these.
    path_secret, code_secret = "Xk9PathSecret4", "Zq7CodeSecret2"
    hook = f"/services/T0/B0/{path_secret}?code={code_secret}"
    receiver = Receiver()
    await receiver.start()
    extra = '[logging]\nlevel = "debug"\n[webhooks]\nallow_private = true'
    try:
        async with hostile_service(tmp_path, fake_ollama.url, extra, db_url=db_url) as svc:
            secret = (await svc.client.get("/api/v1/webhooks/callback-secret")).json()["secret"]
            receiver.secrets[hook] = secret
            body = {"template": "summarize", "params": {"text": "x"}}
            created = await svc.client.post(
                "/api/v1/tasks", json={**body, "callback_url": receiver.url(hook)}
            )
            assert created.status_code == 201, created.text
            log = svc.config.with_suffix(".log")
            await wait_until(lambda: "webhook.attempt" in log.read_text(), timeout=30)
    finally:
        await receiver.stop()
    assert len(receiver.received) == 1, receiver.rejected
    text = log.read_text()
    assert "/api/tags" in text, text  # httpx's request lines are logged: a provider's probe
    for secret in (path_secret, code_secret):
        assert secret not in text, [line for line in text.splitlines() if secret in line]
