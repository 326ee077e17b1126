"""API keys and scopes: every endpoint answers 401 without a valid key and 403 with too small
a scope; the loopback default; the key a first start beyond loopback makes; rate limits; CORS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from orchestra.api.auth import KEEP_SECONDS, REFRESH_SECONDS, Gatekeeper
from orchestra.auth import ApiKey, Scope, matches
from orchestra.config import AuthSettings, CorsSettings, ServerSettings, Settings
from orchestra.db import Database
from orchestra.db.keys import KeyStore
from orchestra.errors import StorageError, Unauthorized
from tests.conftest import Service, StartService, make_keys, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, start_process, wait_until, write_config
from tests.fixtures.startup import preflight

TEMPLATE = (
    "name: mine\nparameters:\n  x: {type: string}\nsteps:\n  - id: a\n    text: '{{ params.x }}'\n"
)

#: (method, path, body, scope it needs)
ENDPOINTS = [
    ("GET", "/api/v1/tasks", None, "read"),
    ("GET", "/api/v1/tasks/1", None, "read"),
    ("GET", "/api/v1/tasks/1/events", None, "read"),
    ("GET", "/api/v1/templates", None, "read"),
    ("GET", "/api/v1/templates/summarize", None, "read"),
    ("GET", "/api/v1/templates/summarize/versions", None, "read"),
    ("GET", "/api/v1/models", None, "read"),
    ("POST", "/api/v1/tasks", {"template": "summarize", "params": {"text": "x"}}, "submit"),
    ("POST", "/api/v1/tasks/1/cancel", None, "submit"),
    ("POST", "/api/v1/tasks/1/retry", None, "submit"),
    ("POST", "/api/v1/templates/validate", TEMPLATE, "submit"),
    ("POST", "/api/v1/templates", TEMPLATE, "admin"),
    ("POST", "/api/v1/templates/reload", None, "admin"),
    ("DELETE", "/api/v1/templates/mine", None, "admin"),
]
SCOPES: list[Scope] = ["read", "submit", "admin"]
#: A whole key as handed out: orc_<8-character id>_<43-character secret>.
TOKEN = re.compile(r"orc_[a-z0-9]{8}_[A-Za-z0-9_-]{43}")


@pytest.fixture
async def keyed(
    settings: Settings, db_url: str, start_service: StartService
) -> AsyncIterator[tuple[Service, dict[str, str]]]:
    tokens = await make_keys(db_url, *SCOPES)
    async with start_service(settings) as svc:
        yield svc, tokens


async def _call(
    client: httpx.AsyncClient, method: str, path: str, body: object, token: str | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, str):
        return await client.request(method, path, content=body, headers=headers)
    if method == "GET" and path.endswith("/events"):
        async with client.stream(method, path, headers=headers) as response:
            return response
    return await client.request(method, path, json=body, headers=headers)


async def test_every_endpoint_needs_a_key_with_enough_scope(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = keyed
    task = await _call(svc.client, *ENDPOINTS[7][:3], tokens["submit"])
    assert task.status_code == 201 and task.json()["id"] == 1
    for method, path, body, need in ENDPOINTS:
        for token in (None, "orc_abcdefgh_wrong", "not-even-shaped", tokens["read"] + "x"):
            response = await _call(svc.client, method, path, body, token)
            assert response.status_code == 401, (method, path, token, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            if not path.endswith("/events"):
                assert response.json()["code"] == "unauthorized"
        for scope in SCOPES:
            response = await _call(svc.client, method, path, body, tokens[scope])
            allowed = SCOPES.index(scope) >= SCOPES.index(need)
            if allowed:
                assert response.status_code not in (401, 403), (method, path, scope)
            else:
                assert response.status_code == 403, (method, path, scope, response.text)
                assert response.json()["code"] == "forbidden"
    # Liveness and the API description stay open.
    assert (await svc.client.get("/health")).status_code == 200
    assert (await svc.client.get("/schema/openapi.json")).status_code == 200


async def test_a_request_without_a_key_is_told_what_anonymous_requests_may_do(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    """With ``allow_anonymous`` and a read scope, a submit without a key was told "this API
    key may not do this": it sent none."""
    tokens = await make_keys(db_url, "submit", "read")
    reads = msgspec.structs.replace(
        settings, auth=AuthSettings(allow_anonymous=True, anonymous_scope="read")
    )
    async with start_service(reads) as svc:
        body = {"template": "summarize", "params": {"text": "x"}}
        refused = await _call(svc.client, "POST", "/api/v1/tasks", body, None)
        assert refused.status_code == 403, refused.text
        message = refused.json()["message"]
        assert "without an API key" in message and "read" in message, message
        assert "needs the submit scope" in message and "this API key" not in message, message
        keyed = await _call(svc.client, "POST", "/api/v1/tasks", body, tokens["read"])
        assert keyed.status_code == 403, keyed.text
        assert keyed.json()["message"] == "this API key may not do this (it needs the submit scope)"
        assert (
            await _call(svc.client, "POST", "/api/v1/tasks", body, tokens["submit"])
        ).status_code == 201


async def test_one_key_holds_at_most_max_streams_per_key_event_streams(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    """A client that opens streams and never closes them (a bug in a loop) held connections
    until every one of the server's (`max_connections`) was its: no one else was served.
    Past `[auth] max_streams_per_key` it gets 429 with Retry-After; another key is served,
    and a stream closed gives its place back."""
    tokens = await make_keys(db_url, "read", "submit")
    auth = msgspec.structs.replace(settings.auth, max_streams_per_key=3)
    async with start_service(msgspec.structs.replace(settings, auth=auth)) as svc:
        later = {"template": "summarize", "params": {"text": "x"}, "delay": 3600}
        task = await _call(svc.client, "POST", "/api/v1/tasks", later, tokens["submit"])
        task_id = task.json()["id"]
        paths = [f"/api/v1/tasks/{task_id}/events", "/api/v1/events", "/api/v1/events"]
        read = {"Authorization": f"Bearer {tokens['read']}"}
        async with contextlib.AsyncExitStack() as held:
            for path in paths:
                opened = await held.enter_async_context(
                    svc.client.stream("GET", path, headers=read)
                )
                assert opened.status_code == 200
            # (A stream answered instead would never end: the timeout says so.)
            refused = await svc.client.get("/api/v1/events", headers=read, timeout=10)
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "too_many_streams"
            assert "3 event streams" in refused.json()["message"]
            assert refused.headers["Retry-After"]
            other = {"Authorization": f"Bearer {tokens['submit']}"}
            async with svc.client.stream("GET", "/api/v1/events", headers=other) as theirs:
                assert theirs.status_code == 200  # another key's count is its own
            assert (await svc.client.get("/api/v1/tasks", headers=read)).status_code == 200

        async def given_back() -> bool:  # closed by the client: the server sees it go
            async with svc.client.stream("GET", "/api/v1/events", headers=read) as again:
                return again.status_code == 200

        await wait_until(given_back, timeout=10, interval=0.1)


@pytest.mark.parametrize("path", ["/api/v1/events", "/ui/live"])
async def test_a_stream_whose_request_says_a_body_it_never_sends_gives_its_place_back(
    settings: Settings, db_url: str, start_service: StartService, path: str
) -> None:
    """A stream's request that declares a body and sends none: once ``[server]
    body_timeout`` passed, the stream's watch for its client leaving read the body's
    deadline instead and stopped (review of the body timeout): the client gone, the API's
    stream went on for good and kept its place (429 for that key until a restart), and the
    dashboard's was cut with its client still there, logged as an error of the app."""
    tokens = await make_keys(db_url, "read")
    auth = msgspec.structs.replace(settings.auth, max_streams_per_key=1)
    server = msgspec.structs.replace(settings.server, body_timeout=1.0)
    changed = msgspec.structs.replace(settings, auth=auth, server=server)
    async with start_service(changed) as svc:
        read = {"Authorization": f"Bearer {tokens['read']}"}
        if path.startswith("/ui"):
            login = await svc.client.post(
                "/ui/login", data={"key": tokens["read"]}, headers={"Origin": svc.url}
            )
            assert login.status_code in (200, 303), login.text
            read = {"Cookie": "; ".join(f"{k}={v}" for k, v in svc.client.cookies.items())}
        url = httpx.URL(svc.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Length: 5"]
        lines += [f"{k}: {v}" for k, v in read.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        # Past the body's timeout, the stream goes on while its client is there.
        await asyncio.sleep(2.5)
        writer.write(b"")
        assert not reader.at_eof()
        writer.close()

        async def given_back() -> bool:
            async with svc.client.stream("GET", path, headers=read) as again:
                return again.status_code == 200

        await wait_until(given_back, timeout=10, interval=0.2)


async def test_a_revoked_key_stops_working(
    keyed: tuple[Service, dict[str, str]], db_url: str
) -> None:
    svc, tokens = keyed
    headers = {"Authorization": f"Bearer {tokens['read']}"}
    assert (await svc.client.get("/api/v1/tasks", headers=headers)).status_code == 200
    db = Database(db_url)
    try:
        await KeyStore(db).revoke("k-read")
    finally:
        await db.close()

    async def refused() -> bool:
        return (await svc.client.get("/api/v1/tasks", headers=headers)).status_code == 401

    await wait_until(refused, timeout=10)


class HeldKeyStore(KeyStore):
    """The real store, whose reads are counted and wait for ``go`` (to hold one open)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.reads = 0
        self.go = asyncio.Event()
        self.failing = False

    async def active_digests(self) -> dict[str, tuple[str, ApiKey]]:
        self.reads += 1
        await self.go.wait()
        if self.failing:
            raise StorageError("the database is away")
        return await super().active_digests()


async def test_requests_that_find_the_keys_stale_together_wait_for_one_read(db: Database) -> None:
    """Under load, the requests in flight when the copy of the keys goes stale share one read
    (each read is a trip to the database); a key made meanwhile is not missed."""
    now = [0.0]
    store = HeldKeyStore(db)
    gatekeeper = Gatekeeper(store, AuthSettings(), loopback=True, clock=lambda: now[0])

    async def together(n: int) -> list[dict[str, tuple[str, ApiKey]]]:
        waiting = [asyncio.ensure_future(gatekeeper.keys()) for _ in range(n)]
        await asyncio.sleep(0)  # every one has asked
        store.go.set()
        found = await asyncio.gather(*waiting)
        store.go.clear()
        return found

    assert await together(20) == [{}] * 20 and store.reads == 1
    assert await together(20) == [{}] * 20 and store.reads == 1, "fresh: not read again"
    now[0] += REFRESH_SECONDS + 0.1
    one_gone = asyncio.ensure_future(gatekeeper.keys())
    await asyncio.sleep(0)
    one_gone.cancel()  # its client hung up: the read goes on for the others
    assert await together(5) == [{}] * 5 and store.reads == 2

    # A key made while a read is under way: that read may predate it, so the next asks again.
    now[0] += REFRESH_SECONDS + 0.1
    early = asyncio.ensure_future(gatekeeper.keys())
    await asyncio.sleep(0)
    key, _token = await store.create("late", "read")
    gatekeeper.forget()
    store.go.set()
    await early
    assert key.id in await gatekeeper.keys() and store.reads == 4

    # A read that fails (the database away) keeps the keys of the last read, for every
    # request that waited for it; /metrics answered 503 to Prometheus's key through an
    # outage. It is tried again a refresh later.
    now[0] += REFRESH_SECONDS + 0.1
    store.failing = True
    kept = await asyncio.gather(*(gatekeeper.keys() for _ in range(3)))
    assert [set(k) for k in kept] == [{key.id}] * 3 and store.reads == 5
    assert key.id in await gatekeeper.keys() and store.reads == 5
    now[0] += REFRESH_SECONDS + 0.1
    store.failing = False
    assert key.id in await gatekeeper.keys() and store.reads == 6

    # Kept for a bounded time only (a key revoked by a process that reaches the database
    # would otherwise stay good here for as long as this one is cut off).
    store.failing = True
    now[0] += KEEP_SECONDS - 1
    assert key.id in await gatekeeper.keys() and store.reads == 7
    now[0] += 2 + REFRESH_SECONDS
    with pytest.raises(StorageError):
        await gatekeeper.keys()
    assert store.reads == 8

    # Before any read succeeded there are no keys to keep: the outage's error is the answer.
    fresh = Gatekeeper(store, AuthSettings(), loopback=True, clock=lambda: now[0])
    failed = await asyncio.gather(*(fresh.keys() for _ in range(3)), return_exceptions=True)
    assert [type(e) for e in failed] == [StorageError] * 3 and store.reads == 9


async def test_keys_kept_through_an_outage_open_nothing_and_refuse_no_key_they_may_lack(
    db: Database,
) -> None:
    """The copy kept while the keys cannot be read may predate a key made since: the first
    one (an empty copy would leave loopback open) or another (refused as "not valid", a 401
    that clients take for a bad key, not an outage). Both are the outage's 503 instead; a
    key the copy holds goes on working."""
    now = [0.0]
    store = HeldKeyStore(db)
    store.go.set()
    gatekeeper = Gatekeeper(store, AuthSettings(), loopback=True, clock=lambda: now[0])
    local = (None, "127.0.0.1:8000", False)
    assert (await gatekeeper.caller(*local)).scope == "admin"  # no keys yet: this machine's
    first, first_token = await store.create("first", "admin")  # by another process
    now[0] += REFRESH_SECONDS + 0.1
    store.failing = True
    with pytest.raises(StorageError):
        await gatekeeper.caller(*local)  # not anonymous admin: a key may exist (one does)
    with pytest.raises(StorageError):
        await gatekeeper.caller(f"Bearer {first_token}", "127.0.0.1:8000", False)
    # Read again: the copy holds the first key, which works through the next outage.
    store.failing = False
    now[0] += REFRESH_SECONDS + 0.1
    assert (await gatekeeper.caller(f"Bearer {first_token}", None, False)).key_id == first.id
    _second, second_token = await store.create("second", "read")
    now[0] += REFRESH_SECONDS + 0.1
    store.failing = True
    assert (await gatekeeper.caller(f"Bearer {first_token}", None, False)).key_id == first.id
    with pytest.raises(StorageError):
        await gatekeeper.caller(f"Bearer {second_token}", None, False)
    with pytest.raises(Unauthorized):  # keys exist: none sent is refused, outage or not
        await gatekeeper.caller(*local)
    # What no key made since could be is refused as ever: not shaped as our keys are, or a
    # wrong secret for a key the copy holds (a key's secret never changes).
    for wrong in ("Bearer not-ours", "Basic dXNlcjpwYXNz", f"Bearer {first_token}x"):
        with pytest.raises(Unauthorized):
            await gatekeeper.caller(wrong, None, False)
    store.failing = False
    now[0] += REFRESH_SECONDS + 0.1
    assert (await gatekeeper.caller(f"Bearer {second_token}", None, False)).scope == "read"
    with pytest.raises(Unauthorized):  # read: a key that is not one is a 401 again
        await gatekeeper.caller("Bearer orc_nope_nothing", None, False)


async def test_only_the_digest_is_stored(db_url: str) -> None:
    tokens = await make_keys(db_url, *SCOPES)
    if db_url.startswith("sqlite"):
        raw = Path(db_url.split("///", 1)[1]).read_bytes()  # the whole file
    else:  # every column of every key, as the server keeps them
        raw = repr(sql_rows(db_url, "SELECT * FROM api_keys")).encode()
        assert b"k-read" in raw  # the rows are there
    for token in tokens.values():
        assert token.startswith("orc_")
        secret = token.split("_", 2)[2]  # the secret may itself hold "_"
        assert len(secret) >= 40
        assert token.encode() not in raw and secret.encode() not in raw


async def test_a_key_is_made_only_beyond_loopback_with_no_active_key(
    settings: Settings, db_url: str
) -> None:
    def on(host: str, **auth: object) -> Settings:
        return msgspec.structs.replace(
            settings,
            server=ServerSettings(host=host, port=0),
            auth=AuthSettings(**auth),  # type: ignore[arg-type]
        )

    db = Database(db_url)
    store = KeyStore(db)
    try:
        for host in ("127.0.0.1", "::1", "localhost"):
            assert await preflight(on(host)) is None
        assert await preflight(on("0.0.0.0", allow_anonymous=True)) is None
        assert await store.all() == []

        shown = await preflight(on("0.0.0.0"))
        [made] = await store.all()
        assert (made.name, made.scope) == ("bootstrap", "admin")
        assert shown is not None and shown[0] == made
        assert matches(shown[1], (await store.active_digests())[made.id][0])

        assert await preflight(on("0.0.0.0")) is None
        assert len(await store.all()) == 1

        # Only active keys count: with every key revoked, the next start makes a new one.
        await store.revoke("bootstrap")
        await preflight(on("0.0.0.0"))
        active = [k for k in await store.all() if k.revoked_at is None]
        assert [(k.name, k.scope) for k in active] == [(f"bootstrap-{active[0].id}", "admin")]
    finally:
        await db.close()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_serve_on_a_public_address_makes_an_admin_key_once_and_shows_it(
    fake_ollama: FakeOllama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRA_SERVER__HOST", "0.0.0.0")  # as the Containerfile does
    port = free_port()
    config = tmp_path / "o.toml"
    write_config(config, port=port, db=tmp_path / "o.db", ollama_url=fake_ollama.url)
    log = config.with_suffix(".log")

    def shown() -> tuple[set[str], list[dict[str, object]]]:
        text = log.read_text()
        events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        made = [e for e in events if e.get("event") == "auth.bootstrap_key_created"]
        return set(TOKEN.findall(text)), made

    async def answers(token: str | None) -> list[int]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            listed = await client.get("/api/v1/tasks", headers=headers)
            reloaded = await client.post("/api/v1/templates/reload", headers=headers)
        return [listed.status_code, reloaded.status_code]

    first = await start_process(config)
    try:
        tokens, made = shown()
        assert len(tokens) == 1 and len(made) == 1
        [token] = tokens
        assert made[0]["token"] == token and made[0]["scope"] == "admin"
        assert "orchestra keys revoke bootstrap" in str(made[0]["hint"])
        assert f"\n    {token}\n" in log.read_text()  # plainly, for a person reading the log
        assert await answers(token) == [200, 200]  # an admin key: reloading needs admin
        assert await answers(None) == [401, 401]
        assert await answers("orc_abcdefgh_wrong") == [401, 401]
    finally:
        await _stop(first)

    second = await start_process(config)
    try:
        assert shown() == ({token}, made)  # nothing new in the log
        assert await answers(token) == [200, 200]
        assert await answers(None) == [401, 401]
    finally:
        await _stop(second)


async def test_cli_creates_lists_and_revokes_keys(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/o.db"
    await make_keys(url)  # the service's database (the keys commands never make one)
    config = tmp_path / "o.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestra", "keys", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = cli("create", "--name", "ci", "--scope", "read")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("orc_") and len(token) > 40
    listed = cli("list")
    assert "ci" in listed.stdout and "read" in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout
    assert cli("create", "--name", "ci").returncode != 0
    for empty in ("", "  "):
        nameless = cli("create", "--name", empty)
        assert nameless.returncode == 1 and "a key needs a name" in nameless.stderr
        assert "Traceback" not in nameless.stderr
    second = cli("create", "--name", "other", "--scope", "read")
    assert second.returncode == 0, second.stderr
    first = cli("revoke", "ci")
    assert first.returncode == 0 and "no active key is left" not in first.stderr
    # Revoking the last one reopens the service to this machine: said, not done silently.
    last = cli("revoke", "other")
    assert last.returncode == 0 and "no active key is left" in last.stderr
    assert "requests from this machine" in last.stderr
    assert "revoked" in cli("list").stdout
    # Beyond loopback nothing reopens: every request is refused until a restart makes a
    # bootstrap key (it said the machine's requests were served as admin).
    config.write_text(f'[server]\nhost = "0.0.0.0"\n[database]\nurl = "{url}"\n')
    assert cli("create", "--name", "third").returncode == 0
    wide = cli("revoke", "third")
    assert wide.returncode == 0 and "no active key is left" in wide.stderr
    assert "requests from this machine" not in wide.stderr
    assert "0.0.0.0 refuses every request" in wide.stderr
    config.write_text(f'[auth]\nallow_anonymous = true\n[database]\nurl = "{url}"\n')
    assert cli("create", "--name", "fourth").returncode == 0
    open_to_all = cli("revoke", "fourth")
    assert "no active key is left" not in open_to_all.stderr  # nothing changes for anyone


async def test_rate_limit_per_key_answers_429(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    tokens = await make_keys(db_url, *SCOPES)
    limited = msgspec.structs.replace(settings, auth=AuthSettings(rate_limit_per_minute=3))
    async with start_service(limited) as svc:
        a = {"Authorization": f"Bearer {tokens['read']}"}
        b = {"Authorization": f"Bearer {tokens['admin']}"}
        codes = [(await svc.client.get("/api/v1/tasks", headers=a)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = await svc.client.get("/api/v1/tasks", headers=a)
        assert refused.json()["code"] == "rate_limited"
        # When to come back, as every HTTP client reads it (orchestra.toml promises it).
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another key has its own allowance.
        assert (await svc.client.get("/api/v1/tasks", headers=b)).status_code == 200


async def test_cors_origins_come_from_the_settings(
    settings: Settings, start_service: StartService
) -> None:
    allowed = msgspec.structs.replace(
        settings, cors=CorsSettings(allow_origins=["https://app.example"])
    )
    async with start_service(allowed) as svc:
        ok = await svc.client.options(
            "/api/v1/tasks",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert ok.headers.get("access-control-allow-origin") == "https://app.example"
        other = await svc.client.get("/api/v1/tasks", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # A page of the allowed origin may read where its task is and how long to wait
        # (helper-135: it could read neither Location nor Retry-After).
        made = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "x"}, "delay": 600},
            headers={"Origin": "https://app.example"},
        )
        exposed = made.headers.get("access-control-expose-headers", "").lower()
        assert "location" in exposed and "retry-after" in exposed, made.headers
