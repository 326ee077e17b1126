"""Dashboard sessions and the requests that must not get through: DNS rebinding, logged-out
cookies, expired sessions, cross-site logins; and errors answered as pages."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from orchestra.config import Settings
from tests.conftest import Service, StartService, make_keys, sql_rows
from tests.fixtures.servers import wait_until

SAME_SITE = {"sec-fetch-site": "same-origin"}
#: What a page on another site sees after pointing its own name at 127.0.0.1.
REBOUND = {"host": "evil.example:8000", "origin": "http://evil.example:8000", **SAME_SITE}


@pytest.fixture
async def keyed(
    settings: Settings, db_url: str, start_service: StartService
) -> AsyncIterator[tuple[Service, dict[str, str]]]:
    tokens = await make_keys(db_url, "read", "admin")
    async with start_service(settings) as svc:
        yield svc, tokens


def _with_cookie(svc: Service, session: str) -> httpx.AsyncClient:
    """A browser-like client holding the session cookie ``session``."""
    return httpx.AsyncClient(
        base_url=svc.url, headers=SAME_SITE, cookies={"orchestra_session": session}
    )


async def _login(svc: Service, token: str) -> str:
    answer = await svc.client.post("/ui/login", data={"key": token}, headers=SAME_SITE)
    assert answer.status_code == 303, answer.text
    return str(answer.cookies["orchestra_session"])


async def test_a_rebound_name_gets_no_open_access_on_loopback(service: Service) -> None:
    # No keys, on loopback: open to this machine's own names only.
    assert (await service.client.get("/api/v1/tasks")).status_code == 200
    assert (await service.client.get("/ui/keys")).status_code == 200
    api = await service.client.get("/api/v1/tasks", headers={"host": "evil.example:8000"})
    assert api.status_code == 401
    page = await service.client.get("/ui/keys", headers={"host": "evil.example:8000"})
    assert page.status_code == 303 and "/ui/login" in page.headers["location"]
    made = await service.client.post(
        "/ui/keys", data={"name": "pwn", "scope": "admin"}, headers=REBOUND
    )
    assert made.status_code == 401
    assert "orc_" not in made.text
    listing = (await service.client.get("/ui/keys")).text
    assert "pwn" not in listing


@pytest.mark.parametrize(
    "forwarding",
    [
        {"x-forwarded-for": "203.0.113.5"},
        {"forwarded": "for=203.0.113.5;proto=https"},
        {"x-real-ip": "203.0.113.5"},
    ],
)
async def test_a_request_through_a_proxy_gets_no_open_access_on_loopback(
    service: Service, forwarding: dict[str, str]
) -> None:
    """A proxy on this machine (the README's nginx) connects from 127.0.0.1 and passes Host
    on as 127.0.0.1:8000: its forwarding header says the request is someone else's."""
    api = await service.client.get("/api/v1/tasks", headers=forwarding)
    assert api.status_code == 401
    assert "proxy" in api.json()["message"]
    page = await service.client.get("/ui/keys", headers=forwarding)
    assert page.status_code == 303 and "/ui/login" in page.headers["location"]
    made = await service.client.post(
        "/ui/keys", data={"name": "pwn", "scope": "admin"}, headers={**forwarding, **SAME_SITE}
    )
    assert made.status_code == 401 and "orc_" not in made.text
    assert (await service.client.get("/api/v1/tasks")).status_code == 200  # this machine's own


async def test_logging_out_ends_the_session_on_the_server(
    keyed: tuple[Service, dict[str, str]], db_url: str
) -> None:
    svc, tokens = keyed
    token = await _login(svc, tokens["admin"])
    rows = sql_rows(db_url, "SELECT digest, key_id FROM ui_sessions")
    assert len(rows) == 1 and token not in rows[0][0]  # only its digest is kept
    async with _with_cookie(svc, token) as browser:
        assert (await browser.get("/ui/tasks")).status_code == 200
        assert (await browser.post("/ui/logout")).status_code == 303
    # The same cookie, replayed after the logout, is worth nothing.
    async with _with_cookie(svc, token) as replay:
        assert (await replay.get("/ui/tasks")).status_code == 303
    assert sql_rows(db_url, "SELECT count(*) FROM ui_sessions") == [(0,)]


async def test_an_expired_session_is_refused(
    keyed: tuple[Service, dict[str, str]], db_url: str
) -> None:
    svc, tokens = keyed
    token = await _login(svc, tokens["read"])
    async with _with_cookie(svc, token) as browser:
        assert (await browser.get("/ui/tasks")).status_code == 200
        sql_rows(db_url, "UPDATE ui_sessions SET expires_at = '2000-01-01T00:00:00.000000Z'")
        assert (await browser.get("/ui/tasks")).status_code == 303


async def test_the_editor_says_what_a_read_key_cannot_check(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    """A read key's editor said "Checked as you type." and checked nothing (checking asks
    for the submit scope, as the API's validate does)."""
    svc, tokens = keyed
    for scope, checked in (("read", False), ("admin", True)):
        token = await _login(svc, tokens[scope])
        async with _with_cookie(svc, token) as browser:
            editor = (await browser.get("/ui/templates/new")).text
        assert ("Checked as you type." in editor) is checked, scope
        assert ("hx-post=" in editor.split('name="yaml"')[1].split(">")[0]) is checked, scope
        if not checked:
            assert "Not checked as you type: that needs a submit key" in editor


async def test_cross_site_logins_are_refused(keyed: tuple[Service, dict[str, str]]) -> None:
    svc, tokens = keyed
    for headers in ({"sec-fetch-site": "cross-site"}, {"origin": "null"}):
        answer = await svc.client.post("/ui/login", data={"key": tokens["admin"]}, headers=headers)
        assert answer.status_code == 403, headers
        assert "set-cookie" not in answer.headers
        # The dashboard's error page, with its headers (it was the API's JSON).
        assert answer.headers["content-type"].startswith("text/html")
        assert "cross-site request refused" in answer.text
        assert answer.headers["x-frame-options"] == "DENY"


async def test_a_fragment_asked_for_without_a_session_returns_to_its_page(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    svc, _ = keyed
    answer = await svc.client.get(
        "/ui/tasks/rows",
        headers={"hx-request": "true", "hx-current-url": f"{svc.url}/ui/tasks?status=failed"},
    )
    assert answer.status_code == 401
    assert answer.headers["hx-redirect"] == "/ui/login?next=%2Fui%2Ftasks%3Fstatus%3Dfailed"


async def test_a_change_asked_for_after_the_session_ended_is_said_not_done(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    """A Retry pressed after the session had ended went to the login page and back to the
    task, still failed, and nothing said the retry was not done (helper-128)."""
    svc, _ = keyed
    headers = {
        "hx-request": "true",
        "hx-current-url": f"{svc.url}/ui/tasks/5",
        "sec-fetch-site": "same-origin",
    }
    answer = await svc.client.post("/ui/tasks/5/retry", headers=headers)
    assert answer.status_code == 401
    login = answer.headers["hx-redirect"]
    assert login == "/ui/login?next=%2Fui%2Ftasks%2F5&unsent=1", login
    shown = await svc.client.get(login)
    assert shown.status_code == 200 and 'id="unsent"' in shown.text
    assert "was not done" in shown.text
    assert 'name="next" value="/ui/tasks/5"' in shown.text
    plain = await svc.client.get("/ui/login?next=%2Fui%2Ftasks%2F5")  # a page asked for
    assert 'id="unsent"' not in plain.text
    # A mistyped key keeps saying it (second review).
    form = {"key": "orc_wrong", "next": "/ui/tasks/5", "unsent": "1"}
    again = await svc.client.post("/ui/login", data=form, headers={"sec-fetch-site": "same-origin"})
    assert again.status_code == 401 and 'id="unsent"' in again.text


async def test_revoking_by_id_never_revokes_a_key_named_like_that_id(
    keyed: tuple[Service, dict[str, str]], db_url: str
) -> None:
    svc, tokens = keyed
    read_id = tokens["read"].split("_")[1]
    async with _with_cookie(svc, await _login(svc, tokens["admin"])) as admin:
        # No key is named like another's id any more ...
        made = await admin.post("/ui/keys", data={"name": read_id, "scope": "read"})
        assert made.status_code == 422 and "is the id of another key" in made.text
        # ... but one may have been, before names were checked.
        made = await admin.post("/ui/keys", data={"name": "later", "scope": "read"})
        assert made.status_code == 200
        sql_rows(db_url, "UPDATE api_keys SET name = ? WHERE name = 'later'", (read_id,))
        assert (await admin.post(f"/ui/keys/{read_id}/revoke")).status_code == 303
    rows = dict(sql_rows(db_url, "SELECT name, revoked_at IS NOT NULL FROM api_keys"))
    assert rows["k-read"] == 1 and rows[read_id] == 0


async def test_bad_values_get_an_html_400_page(service: Service) -> None:
    answer = await service.client.get("/ui/templates/summarize", params={"version": "abc"})
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("text/html")
    assert 'id="error-message"' in answer.text


async def test_checking_providers_now_is_a_same_site_post(service: Service) -> None:
    page = await service.client.get("/ui/providers")
    assert page.status_code == 200 and "/ui/providers/check" in page.text
    # A GET checks nothing: it goes to the providers page (a reload after a check lands here).
    got = await service.client.get("/ui/providers/check")
    assert got.status_code == 303 and got.headers["location"] == "/ui/providers"
    checked = await service.client.post("/ui/providers/check", headers=SAME_SITE)
    assert checked.status_code == 200 and "ollama" in checked.text
    forged = await service.client.post(
        "/ui/providers/check", headers={"sec-fetch-site": "cross-site"}
    )
    assert forged.status_code == 403


async def test_run_again_from_a_garbage_task_id_is_a_400(service: Service) -> None:
    for value in ("%C2%B2", "99999999999999999999999", "abc"):
        answer = await service.client.get(f"/ui/templates/summarize?from={value}")
        assert answer.status_code == 400, value


async def test_dashboard_live_streams_count_against_the_keys_streams(
    settings: Settings, db_url: str, start_service: StartService
) -> None:
    """A key signed in to the dashboard opened live streams without bound (130 of /ui/live,
    where /api/v1/events refused the 101st): they count against `[auth] max_streams_per_key`
    with the key's API streams; past it, 429 (the page's stream tries again later)."""
    tokens = await make_keys(db_url, "read", "submit")
    auth = msgspec.structs.replace(settings.auth, max_streams_per_key=3)
    async with start_service(msgspec.structs.replace(settings, auth=auth)) as svc:
        submit = {"Authorization": f"Bearer {tokens['submit']}"}
        later = {"template": "summarize", "params": {"text": "x"}, "delay": 3600}
        task_id = (await svc.client.post("/api/v1/tasks", json=later, headers=submit)).json()["id"]
        read = {"Authorization": f"Bearer {tokens['read']}"}
        async with (
            _with_cookie(svc, await _login(svc, tokens["read"])) as browser,
            contextlib.AsyncExitStack() as held,
        ):
            for client, path in [
                (browser, "/ui/live"),
                (browser, f"/ui/tasks/{task_id}/live"),
                (svc.client, "/api/v1/events"),
            ]:
                headers = read if client is svc.client else {}
                opened = await held.enter_async_context(client.stream("GET", path, headers=headers))
                assert opened.status_code == 200
            # (A stream answered instead would never end: the timeout says so.)
            for path in ("/ui/live", f"/ui/tasks/{task_id}/live"):
                refused = await browser.get(path, timeout=10)
                assert refused.status_code == 429, refused.text
                assert refused.headers["content-type"].startswith("text/html")
                assert refused.headers["Retry-After"]
            api = await svc.client.get("/api/v1/events", headers=read, timeout=10)
            assert api.status_code == 429  # one count, the dashboard's and the API's
            async with _with_cookie(svc, await _login(svc, tokens["submit"])) as other:
                async with other.stream("GET", "/ui/live") as theirs:
                    assert theirs.status_code == 200  # another key's count is its own

        async def again() -> bool:  # closed by the client: the server sees it go
            async with (
                _with_cookie(svc, await _login(svc, tokens["read"])) as browser,
                browser.stream("GET", "/ui/live") as stream,
            ):
                return stream.status_code == 200

        await wait_until(again, timeout=10, interval=0.1)


async def test_without_keys_dashboard_streams_are_not_counted(
    settings: Settings, start_service: StartService
) -> None:
    """As the API's streams without a key: an open dashboard on loopback has no key to count."""
    auth = msgspec.structs.replace(settings.auth, max_streams_per_key=2)
    async with (
        start_service(msgspec.structs.replace(settings, auth=auth)) as svc,
        contextlib.AsyncExitStack() as held,
    ):
        for _ in range(3):
            opened = await held.enter_async_context(svc.client.stream("GET", "/ui/live"))
            assert opened.status_code == 200
