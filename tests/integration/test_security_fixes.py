"""Findings of a security review, each held by a test against real servers and files:

- a provider that echoes its credentials back (its API key in an error body, its URL's
  password as Basic auth) never gets them shown: not in a task's error, /health, the models
  list, the dashboard, the database nor the log;
- webhooks and callbacks refuse IPv6 forms of private IPv4 addresses (NAT64, 6to4, ...);
- a webhook never calls the service itself, even where private destinations are allowed;
- a new SQLite database file is readable by its owner alone (0600), its -wal and -shm too;
- deploy/compose.yaml publishes Grafana and Prometheus on loopback only.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from ruamel.yaml import YAML

from orchestra.config import WebhookSettings
from orchestra.db import Database, TaskStore
from orchestra.db.schema import upgrade
from orchestra.db.webhooks import WebhookStore
from orchestra.domain import NewTask, iso_now
from orchestra.webhook_sender import WebhookSender
from orchestra.webhooks import DestinationRefused, NewWebhook, Webhook, WebhookService
from tests.conftest import Service, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import hostile_service
from tests.fixtures.servers import loopback_server, serve, wait_until

ROOT = Path(__file__).resolve().parents[2]

# -- provider credentials echoed back -------------------------------------------------------

#: The API key the providers are given (by the variable :data:`KEY_VARIABLE`).
KEY = "sk-echoed-7c1e9a5b3d2f4e6a8b0c1d2e3f4a5b6c"
KEY_VARIABLE = "ORCHESTRA_TEST_ECHO_KEY"
#: The password in a provider's URL, which httpx sends as Basic auth.
PASSWORD = "pw-echoed-91b7d3f5a2c4"
BASIC = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
#: What of each credential must not show: whole, or the start of it (an error body cut off
#: at 200 characters in the middle of one).
LEAKS = (KEY, KEY[:12], PASSWORD, BASIC, BASIC[:12])
#: Put before the credential in a plain-text answer, so that the 200 characters of it kept
#: for a message end inside the credential.
PADDING = "p" * 160


async def _echo_authorization(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI model server that refuses every request, repeating the Authorization header
    it was sent: as JSON (``{"error": {"message": ...}}``) to a POST, in plain text after
    :data:`PADDING` to a GET (a health check)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while (await receive()).get("more_body"):
        pass
    auth = dict(scope["headers"]).get(b"authorization", b"").decode()
    if scope["method"] == "GET":
        body, media = f"{PADDING} invalid api key: {auth} (check it)".encode(), b"text/plain"
    else:
        error = {"error": {"message": f"invalid api key: {auth}", "type": "auth"}}
        body, media = json.dumps(error).encode(), b"application/json"
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    async with serve(_echo_authorization) as url:
        yield url


def _assert_no_credential(where: str, text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} shown in {where}: {text[:3000]}"


async def test_a_provider_echoing_its_credentials_never_gets_them_shown_or_stored(
    tmp_path: Path, fake_ollama: FakeOllama, echo_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)  # the service, a child process, inherits it
    with_password = echo_server.replace("http://", f"http://admin:{PASSWORD}@", 1)
    extra = "\n".join(
        [
            f'[providers.oai]\nkind = "openai"\nurl = "{echo_server}/v1"',
            f'api_key_env = "{KEY_VARIABLE}"',
            f'[providers.oll]\nkind = "ollama"\nurl = "{echo_server}"',
            f'api_key_env = "{KEY_VARIABLE}"',
            f'[providers.basic]\nkind = "openai"\nurl = "{with_password}/v1"',
            "[fallback]\noutage_wait = 0",
            '[logging]\nlevel = "debug"',
        ]
    )
    async with hostile_service(tmp_path, fake_ollama.url, extra) as svc:
        client = svc.client
        ids = {}
        for model in ("oai/gpt-fake", "oll/llama3.2", "basic/gpt-fake"):
            body = {"template": "summarize", "params": {"text": "hi"}, "model": model}
            created = await client.post("/api/v1/tasks", json={**body, "max_attempts": 1})
            assert created.status_code == 201, created.text
            ids[model] = created.json()["id"]
        done = {model: await svc.wait(task_id) for model, task_id in ids.items()}
        health = await client.get("/health", params={"check": "now"})
        models = await client.get("/api/v1/models")
        page = await client.get("/ui/providers")
        events = [(await client.get(f"/api/v1/tasks/{i}/events")).text for i in ids.values()]
        log = svc.config.with_suffix(".log")
        await wait_until(lambda: "invalid api key" in log.read_text(), timeout=10)

    for task in done.values():
        assert task["status"] == "failed", task
        message = task["error"]["message"]
        # The server's reason still shows, its credential masked.
        assert "refused the credentials (401): invalid api key: B" in message, message
    assert "Bearer ***" in done["oai/gpt-fake"]["error"]["message"]
    assert "Basic ***" in done["basic/gpt-fake"]["error"]["message"]
    providers = health.json()["providers"]
    for name in ("oai", "oll", "basic"):
        assert providers[name]["available"] is False
        assert "invalid api key" in providers[name]["detail"], providers[name]
    assert page.status_code == 200, page.text
    database = b"".join(p.read_bytes() for p in tmp_path.glob("orchestra.db*"))
    assert b"invalid api key" in database  # the errors were stored, without the credential
    for where, shown in [
        ("task errors", json.dumps(done)),
        ("task events", "\n".join(events)),
        ("/health?check=now", health.text),
        ("/api/v1/models", models.text),
        ("the dashboard's providers page", page.text),
        ("the service log", log.read_text()),
        ("the database", database.decode("utf-8", "replace")),
    ]:
        _assert_no_credential(where, shown)


# -- IPv6 forms of private addresses ----------------------------------------------------------

#: Loopback and the cloud metadata address 169.254.169.254, in IPv6 forms that reach them.
TRANSLATED = [
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[64:ff9b:1::a9fe:a9fe]/",
    "http://[2002:7f00:1::]/",
    "http://[2002:a9fe:a9fe::]/",
    "http://[::7f00:1]/",
    "http://[::ffff:0:7f00:1]/",
]


@pytest.mark.parametrize("url", TRANSLATED)
async def test_ipv6_forms_of_private_addresses_are_refused_for_webhooks_and_callbacks(
    service: Service, url: str
) -> None:
    hook = await service.client.post("/api/v1/webhooks", json={"url": url})
    assert hook.status_code == 422, hook.text
    assert hook.json()["fields"][0]["field"] == "url", hook.text
    task = await service.client.post(
        "/api/v1/tasks",
        json={"template": "summarize", "params": {"text": "hi"}, "callback_url": url},
    )
    assert task.status_code == 422, task.text
    assert task.json()["fields"][0]["field"] == "callback_url", task.text


# -- the service itself as a destination ------------------------------------------------------

PRIVATE_OK = WebhookSettings(
    allow_private=True, retry_base_seconds=0.05, retry_max_seconds=0.3, poll_interval=0.2
)


@contextmanager
def _listening() -> Iterator[int]:
    """A port something listens on, on 127.0.0.1 (the service, as far as the check knows)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_a_webhook_or_callback_to_the_service_itself_is_refused_naming_the_field(
    db: Database,
) -> None:
    with _listening() as port:
        service = WebhookService(WebhookStore(db), PRIVATE_OK, own=("127.0.0.1", port))
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0"):
            url = f"http://{host}:{port}/api/v1/webhooks/1/roll-secret"
            with pytest.raises(DestinationRefused) as refused:
                await service.create(NewWebhook(url=url))
            assert [p.field for p in refused.value.fields] == ["url"], host
            assert "this Orchestra service itself" in refused.value.message
            with pytest.raises(DestinationRefused) as refused:
                await service.check_callback(url)
            assert [p.field for p in refused.value.fields] == ["callback_url"], host
        # Another port of loopback is a receiver beside the service: allowed here.
        hook, _ = await service.create(NewWebhook(url=f"http://127.0.0.1:{port + 1}/hook"))
        assert hook.id > 0
    # A service on every address is itself on each address of this host.
    on_all = WebhookService(WebhookStore(db), PRIVATE_OK, own=("0.0.0.0", 8000))
    with pytest.raises(DestinationRefused):
        await on_all.create(NewWebhook(url="http://127.0.0.1:8000/api/v1/keys"))


async def test_a_delivery_to_the_service_itself_is_refused_at_send_time(
    db: Database, db_url: str
) -> None:
    """A subscription stored before the check existed (or by hand) is refused when sent:
    failed at once, the service never called."""
    called: list[bytes] = []

    async def answer(reader: Any, writer: Any) -> None:
        called.append(await reader.readline())
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    async with loopback_server(answer) as url:
        port = int(url.rsplit(":", 1)[1])
        hooks = WebhookStore(db)
        target = f"{url}/api/v1/webhooks/1/roll-secret"
        hook = await hooks.create(
            Webhook(0, target, ["task.queued"], None, None, True, iso_now()), "whsec_c2VjcmV0"
        )
        await TaskStore(db).enqueue(NewTask(template="summarize", template_version=1, params={}))
        sender = WebhookSender(hooks, PRIVATE_OK, own=("127.0.0.1", port))

        async def settled() -> bool:
            rows = sql_rows(db_url, "SELECT status FROM webhook_deliveries")
            return bool(rows) and rows[0][0] != "pending"

        with structlog.testing.capture_logs() as logged:  # from before the first send
            await sender.start()
            try:
                await wait_until(settled, timeout=10)
            finally:
                await sender.stop()
        [delivery] = await hooks.deliveries(hook.id)
    assert delivery.status == "failed"
    [attempt] = delivery.history
    assert attempt.error is not None and "this Orchestra service itself" in attempt.error
    assert called == []
    # A delivery given up is logged as a warning (it was info).
    [given_up] = [e for e in logged if e["event"] == "webhook.attempt"]
    assert given_up["result"] == "failed" and given_up["log_level"] == "warning"


async def test_an_open_loopback_service_refuses_a_webhook_to_itself(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    async with hostile_service(
        tmp_path, fake_ollama.url, "[webhooks]\nallow_private = true"
    ) as svc:
        url = f"{svc.url}/api/v1/webhooks/1/roll-secret"
        hook = await svc.client.post("/api/v1/webhooks", json={"url": url})
        task = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "hi"}, "callback_url": url},
        )
    assert hook.status_code == 422, hook.text
    assert hook.json()["fields"][0]["field"] == "url"
    assert task.status_code == 422, task.text
    assert task.json()["fields"][0]["field"] == "callback_url"


# -- the SQLite file's mode ---------------------------------------------------------------------


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.sqlite_only
async def test_a_new_sqlite_database_and_its_wal_and_shm_are_readable_by_the_owner_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fresh" / "orchestra.db"
    with _umask(0o022):
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await upgrade(db)
            await TaskStore(db).enqueue(
                NewTask(template="summarize", template_version=1, params={"text": "x"})
            )
            wal, shm = path.with_name("orchestra.db-wal"), path.with_name("orchestra.db-shm")
            assert wal.exists() and shm.exists()
            modes = {p.name: oct(_mode(p)) for p in (path, wal, shm)}
        finally:
            await db.close()
    assert modes == {name: "0o600" for name in modes}


@pytest.mark.sqlite_only
async def test_an_existing_sqlite_database_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "orchestra.db"
    path.touch()
    path.chmod(0o640)  # the operator's choice (a group that backs it up)
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(db)
    finally:
        await db.close()
    assert _mode(path) == 0o640


# -- deploy/compose.yaml ------------------------------------------------------------------------


def test_grafana_and_prometheus_are_published_on_loopback_only() -> None:
    compose = YAML(typ="safe", pure=True).load((ROOT / "deploy" / "compose.yaml").read_text())
    for name in ("grafana", "prometheus"):
        ports = compose["services"][name]["ports"]
        assert ports, name
        for mapping in ports:
            host = str(mapping).rsplit(":", 2)[0] if str(mapping).count(":") == 2 else ""
            assert host == "127.0.0.1", f"{name} publishes {mapping} on every interface"


# -- the secrets a provider sends, as scrubbed ----------------------------------------------------


def test_a_providers_secrets_are_its_key_its_password_and_their_basic_auth_form() -> None:
    from orchestra.redact import scrub, secret_values

    found = secret_values("sk-abc123", "http://admin:p%40ss!@h:1/v1?key=qq12345&x=1")
    basic = base64.b64encode(b"admin:p@ss!").decode()
    assert set(found) == {"sk-abc123", "p%40ss!", "p@ss!", basic, "qq12345"}
    assert [len(v) for v in found] == sorted((len(v) for v in found), reverse=True)
    echoed = f"bad key Bearer sk-abc123; Basic {basic}; pw p@ss!; x=1 key=qq12345"
    assert scrub(echoed, found) == "bad key Bearer ***; Basic ***; pw ***; x=1 key=***"
    assert secret_values(None, "http://h:1/v1") == ()
    assert secret_values("abc") == ()  # too short to look for


@pytest.mark.parametrize(
    "path",
    ["/api/v1/tasks", "/api/v1/tasks/77", "/health", "/metrics", "/api/v1/tasks?x=%00", "/ui"],
)
async def test_every_answer_says_nosniff_once(service: Service, path: str) -> None:
    """A browser must not take JSON or text for something it could run: the dashboard's
    answers said so, the API's JSON, /metrics and the NUL 400 did not."""
    response = await service.client.get(path, follow_redirects=True)
    assert response.headers.get_list("x-content-type-options") == ["nosniff"], response.headers
