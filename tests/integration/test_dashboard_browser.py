"""The dashboard in a real headless Chromium against the real service (real HTTP, a real
SQLite file, the fake Ollama on a real port): live updates, forms, bulk actions, the editor,
scopes, and markup that must never run.

Each test asks for ``browser`` after the service, so the browser closes first: a service
stopping with a page still open waits for that page's event streams.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from orchestra.config import Settings
from tests.conftest import Service, StartService, make_keys, with_workers
from tests.fixtures.browser import TrackedPage, new_page
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until

if TYPE_CHECKING:
    from playwright.async_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
#: Playwright's waits, in milliseconds.
WAIT = 15_000


@pytest.fixture
async def slow_service(
    settings: Settings, start_service: StartService, fake_ollama: FakeOllama
) -> AsyncIterator[Service]:
    """One worker slot, and a model that streams a word every 50 ms."""
    fake_ollama.word_delay = 0.05
    one = with_workers(settings, concurrency=1)
    async with start_service(one) as svc:
        yield svc


async def _page(browser: Browser, **kwargs: object) -> TrackedPage:
    return await new_page(browser, **kwargs)


async def _hold_the_slot(svc: Service, fake_ollama: FakeOllama) -> int:
    """Fill the one worker slot with a task whose model call does not answer: tasks submitted
    now stay queued until :func:`_free_the_slot`, however slowly the browser goes."""
    fake_ollama.latency = 60
    blocker = await svc.submit("summarize", text="busy")
    await wait_until(lambda: fake_ollama.in_flight == 1)
    return int(blocker["id"])


async def _free_the_slot(svc: Service, fake_ollama: FakeOllama, blocker: int) -> None:
    """Cancel the blocker (its model call is closed); later calls answer at once."""
    fake_ollama.latency = 0
    answer = await svc.client.post(f"/api/v1/tasks/{blocker}/cancel")
    assert answer.json()["status"] == "cancelled", answer.text


async def test_a_task_submitted_from_the_form_goes_queued_running_succeeded_live(
    slow_service: Service, fake_ollama: FakeOllama, browser: Browser
) -> None:
    from playwright.async_api import expect

    svc = slow_service
    blocker = await _hold_the_slot(svc, fake_ollama)
    page = await _page(browser)
    await page.goto(f"{svc.url}/ui/templates/summarize")
    await page.fill("#param-text", " ".join(f"word{i}" for i in range(80)))
    await page.select_option("#param-style", label="bullets")
    await page.click("#run-form button[type=submit]")
    status = page.locator("#task-body h1 .status")
    await expect(status).to_have_text("queued", timeout=WAIT)
    await _free_the_slot(svc, fake_ollama, blocker)
    await expect(status).to_have_text("running", timeout=WAIT)
    live = page.locator("#live-text")
    await expect(live).to_contain_text("word1", timeout=WAIT)
    # Streamed text arrived while the task still ran.
    assert (await status.text_content()) == "running"
    await expect(status).to_have_text("succeeded", timeout=WAIT)
    await expect(page.locator("#result")).to_contain_text("word79")
    assert page.errors == []


async def test_overview_counts_update_live_and_pause_holds_them(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = await _page(browser)
    await page.goto(f"{service.url}/ui/")
    succeeded = page.locator('.n[data-status="succeeded"]')
    await expect(succeeded).to_have_text("0")
    task = await service.submit("summarize", text="count me")
    await service.wait(task["id"])
    await expect(succeeded).to_have_text("1", timeout=WAIT)
    await page.check("#live-pause")
    # Count the `changed` events the page is sent (each event's data: how many tasks exist),
    # and its requests for fresh counts.
    await page.evaluate(
        "() => { window.changed = []; document.addEventListener('htmx:sseMessage', e => {"
        " if (e.detail.type === 'changed') window.changed.push(e.detail.data); }); }"
    )
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url) if "/overview/body" in r.url else None)
    task = await service.submit("summarize", text="count me too")
    await service.wait(task["id"])
    # A third task, submitted after the second finished: an event saying 3 tasks exist was
    # sent after that, so a page that was not paused would show 2 succeeded by then.
    marker = await service.submit("summarize", text="and a marker")
    # (Polled from here: wait_for_function compiles its predicate, which the CSP forbids.)
    await wait_until(lambda: page.evaluate("window.changed.includes('3')"), timeout=15)
    await expect(succeeded).to_have_text("1")
    assert fetched == []
    await service.wait(marker["id"])
    await page.uncheck("#live-pause")
    task = await service.submit("summarize", text="and me")
    await service.wait(task["id"])
    await expect(succeeded).to_have_text("4", timeout=WAIT)
    assert page.errors == []


async def test_a_422_shows_beside_the_field_it_names(service: Service, browser: Browser) -> None:
    from playwright.async_api import expect

    page = await _page(browser)
    await page.goto(f"{service.url}/ui/templates/summarize")
    await page.fill("#param-sentences", "0")
    await page.click("#run-form button[type=submit]")
    await expect(page.locator("#param-text-error")).to_contain_text("required", timeout=WAIT)
    await expect(page.locator("#param-sentences-error")).to_contain_text("less than the minimum")
    await expect(page.locator("#param-sentences")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#param-style-error")).to_have_count(0)
    assert [e for e in page.errors if "status of 422" not in e] == []


async def test_bulk_cancel_of_a_filter_after_a_confirmation_that_states_n(
    slow_service: Service, fake_ollama: FakeOllama, browser: Browser
) -> None:
    from playwright.async_api import expect

    svc = slow_service
    fake_ollama.latency = 60  # the first task holds the only slot; the rest stay queued
    tasks = [await svc.submit("summarize", text=f"bulk {i}") for i in range(4)]
    await wait_until(lambda: fake_ollama.in_flight == 1)
    page = await _page(browser)
    await page.goto(f"{svc.url}/ui/tasks?template=summarize")
    await page.click("text=Cancel all matching…")
    await expect(page.locator("h1")).to_have_text("Cancel 4 tasks?", timeout=WAIT)
    await page.click("button[name=action][value=cancel]")
    await expect(page.locator(".notice")).to_have_text(
        "Cancelled: 3 tasks; 1 running asked to stop (one may still finish first).", timeout=WAIT
    )
    for task in tasks:
        assert (await svc.wait(task["id"]))["status"] == "cancelled"
    await expect(page.locator("#rows .status-cancelled")).to_have_count(4, timeout=WAIT)
    assert page.errors == []


async def test_the_editor_shows_line_and_column_then_registers_a_version(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = await _page(browser)
    await page.goto(f"{service.url}/ui/templates/new")
    await expect(page.locator("#valid")).to_be_visible(timeout=WAIT)  # the skeleton is valid
    broken = "name: mine\nparameters:\n  x: {type: string}\nsteps:\n  - id: a\n    txet: hi\n"
    await page.fill("#yaml", broken)
    goto = page.locator('#problems button.goto[data-line="6"]')
    await expect(goto).to_have_text("line 6:5", timeout=WAIT)
    await expect(page.locator("#gutter")).to_contain_text("▶ 6")
    await goto.click()
    assert await page.evaluate("document.getElementById('yaml').selectionStart") == len(
        "name: mine\nparameters:\n  x: {type: string}\nsteps:\n  - id: a\n    "
    )
    await page.fill("#yaml", broken.replace("txet: hi", "kind: render\n    text: '{{ params.x }}'"))
    await expect(page.locator("#valid")).to_contain_text("mine", timeout=WAIT)
    await page.click("#register")
    await expect(page.locator("h1")).to_contain_text("version 1", timeout=WAIT)
    assert (await service.client.get("/api/v1/templates/mine")).status_code == 200
    assert page.errors == []


async def test_a_read_key_sees_no_write_controls_and_a_forged_post_gets_403(
    settings: Settings, db_url: str, start_service: StartService, browser: Browser
) -> None:
    from playwright.async_api import expect

    keys = await make_keys(db_url, "read", "submit")
    token, submit = keys["read"], keys["submit"]
    async with start_service(settings) as svc:
        made = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "x"}},
            headers={"authorization": f"Bearer {submit}"},
        )
        task_id = made.json()["id"]
        page = await _page(browser)
        await page.goto(f"{svc.url}/ui/tasks")
        await expect(page.locator("h1")).to_have_text("Log in")
        await page.fill("#key", token)
        await page.click("button[type=submit]")
        await expect(page.locator("h1")).to_have_text("Tasks", timeout=WAIT)
        await expect(page.locator("text=Cancel selected")).to_have_count(0)
        await expect(page.locator("input[name=id]")).to_have_count(0)
        await page.goto(f"{svc.url}/ui/tasks/{task_id}")
        await expect(page.locator("#task-body h1")).to_contain_text(f"Task #{task_id}")
        await expect(page.locator("#task-body button")).to_have_count(0)
        await page.goto(f"{svc.url}/ui/templates/summarize")
        await expect(page.locator("#run-form")).to_have_count(0)
        forged = await page.evaluate(
            f"fetch('/ui/tasks/{task_id}/cancel', {{method: 'POST'}}).then(r => r.status)"
        )
        assert forged == 403
        assert (await svc.client.get(f"/api/v1/tasks/{task_id}")).json()["status"] != "cancelled"
        assert [e for e in page.errors if "status of 403" not in e] == []
        await page.close()  # before the service stops: it would wait for the page's streams


async def test_markup_in_params_results_and_descriptions_is_text_and_inline_script_is_blocked(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    template = (
        "name: hostile\n"
        f"description: '{HOSTILE}'\n"
        "parameters:\n  x: {type: string, description: '" + HOSTILE + "'}\n"
        "steps:\n  - id: a\n    kind: render\n    text: '{{ params.x }}'\n"
    )
    registered = await service.client.post("/api/v1/templates", content=template)
    assert registered.status_code == 201, registered.text
    task = await service.submit("summarize", text=HOSTILE)
    echoed = await service.wait(task["id"])
    assert HOSTILE in str(echoed["result"])
    page = await _page(browser)
    for path in (f"/ui/tasks/{task['id']}", "/ui/templates/hostile", "/ui/templates", "/ui/"):
        await page.goto(f"{service.url}{path}")
        await page.wait_for_load_state("networkidle")
        assert await page.evaluate("window.pwned") is None, path
        assert await page.locator("main img").count() == 0, path
    await page.goto(f"{service.url}/ui/tasks/{task['id']}")
    await expect(page.locator("#params")).to_contain_text("<script>window.pwned=1</script>")
    await expect(page.locator("#result")).to_contain_text('onerror="window.pwned=2"')
    # The policy itself: a script element added to the page does not run.
    await page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.inlineRan = true'; document.body.appendChild(s); }"
    )
    await page.wait_for_timeout(100)
    assert await page.evaluate("window.inlineRan") is None
    assert any("Content Security Policy" in text for _, text in page.console)


async def test_markup_streamed_live_is_text_and_never_runs(
    slow_service: Service, fake_ollama: FakeOllama, browser: Browser
) -> None:
    """The riskiest path: streamed text is appended to the page as HTML (hx-swap=beforeend)."""
    from playwright.async_api import expect

    svc = slow_service
    blocker = await _hold_the_slot(svc, fake_ollama)
    # The fake model streams one word at a time (split at spaces): tabs keep one tag whole, so
    # it arrives in a single event. Early and late copies: the late ones surely come through
    # the stream, after the page has refreshed to show the running step.
    whole = '<img\tsrc=x\tonerror="window.pwned=3">'
    markup = f'<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> {whole}'
    words = " ".join(f"w{i}" for i in range(40))
    task = await svc.submit("summarize", text=f"{markup} {words} {markup} {words}")
    page = await _page(browser)
    await page.goto(f"{svc.url}/ui/tasks/{task['id']}")
    status = page.locator("#task-body h1 .status")
    await expect(status).to_have_text("queued", timeout=WAIT)
    await page.evaluate(
        "() => { window.streamed = []; document.addEventListener('htmx:sseMessage', e => {"
        " if (e.detail.type === 'tokens') window.streamed.push(e.detail.data); }); }"
    )
    await _free_the_slot(svc, fake_ollama, blocker)
    live = page.locator("#live-text")
    late = 'w39 <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>'
    await expect(live).to_contain_text(late, timeout=WAIT)
    await expect(live).to_contain_text('onerror="window.pwned=3"', timeout=WAIT)
    assert await status.text_content() == "running"  # it arrived live
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#live-text img").count() == 0
    assert await page.locator("#live-text script").count() == 0
    streamed = "".join(await page.evaluate("window.streamed"))
    assert "&lt;img\tsrc=x\tonerror=" in streamed  # through the stream, escaped
    await expect(status).to_have_text("succeeded", timeout=WAIT)
    assert await page.evaluate("window.pwned") is None
    assert page.errors == []


async def test_readable_at_375_pixels_with_statuses_in_words(
    service: Service, browser: Browser
) -> None:
    task = await service.submit("summarize", text="narrow")
    await service.wait(task["id"])
    made = await service.client.post(
        "/api/v1/schedules",
        json={"name": "narrow", "template": "summarize", "params": {"text": "x"}, "every": "1h"},
    )
    assert made.status_code == 201, made.text
    page = await _page(browser, viewport={"width": 375, "height": 800})
    for path in (
        "/ui/",
        "/ui/tasks",
        f"/ui/tasks/{task['id']}",
        "/ui/templates/summarize",
        "/ui/schedules",
        f"/ui/schedules/{made.json()['id']}",
        "/ui/batches",
        "/ui/webhooks",
    ):
        await page.goto(f"{service.url}{path}")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, (path, width)
    await page.goto(f"{service.url}/ui/tasks")
    assert await page.locator("#rows .status").first.text_content() == "succeeded"
    # Every control is reachable from the keyboard: tabbing reaches the first task's link.
    # Live updates paused first: a refresh of the rows mid-way would drop the focus.
    await page.check("#live-pause")
    await page.evaluate("document.activeElement.blur()")
    for _ in range(40):
        await page.keyboard.press("Tab")
        focused = await page.evaluate("document.activeElement.getAttribute('href') || ''")
        if focused.endswith(f"/ui/tasks/{task['id']}"):
            break
    else:
        raise AssertionError("the task's link was never focused by Tab")
    assert page.errors == []


async def test_time_filters_are_typed_in_local_time_and_sent_as_utc(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = await new_page(browser, timezone_id="Asia/Tokyo")  # UTC+9, no summer time
    await page.goto(f"{service.url}/ui/tasks")
    start = page.locator("input[type=datetime-local][data-utc]").first
    await start.fill("2026-12-01T09:00:00")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url("**/ui/tasks?*from=2026-12-01T00*")
    assert "from=2026-12-01T00%3A00%3A00.000Z" in page.url
    await expect(page.locator("input[type=datetime-local][data-utc]").first).to_have_value(
        "2026-12-01T09:00"  # Chromium drops zero seconds
    )
    assert page.errors == []


async def test_providers_and_keys_pages_work_in_the_browser(
    service: Service, browser: Browser
) -> None:
    from playwright.async_api import expect

    page = await _page(browser)
    await page.goto(f"{service.url}/ui/providers")
    await expect(page.locator("article.provider").first).to_contain_text("ollama")
    await page.click("text=Check now")
    await expect(page.locator("h1")).to_have_text("Providers and models", timeout=WAIT)
    await expect(page.locator("article.provider .status").first).to_have_text("available")
    await page.goto(f"{service.url}/ui/keys")
    await page.fill("input[name=name]", "from-the-browser")
    await page.select_option("select[name=scope]", "read")
    await expect(page.locator("#first-key-warning")).to_contain_text("401")
    await page.check("#confirm-auth")  # the first key turns authentication on
    await page.click("text=Make key")
    await expect(page.locator("#new-token")).to_have_text(re.compile(r"^orc_"), timeout=WAIT)
    token = await page.locator("#new-token").text_content()
    # A key exists now: the API asks for one, and this one reads.
    assert (await service.client.get("/api/v1/tasks")).status_code == 401
    listed = await service.client.get("/api/v1/tasks", headers={"authorization": f"Bearer {token}"})
    assert listed.status_code == 200
    assert page.errors == []


async def test_times_are_shown_in_local_time_with_the_iso_time_on_hover(
    service: Service, browser: Browser
) -> None:
    """Every ``<time>`` reads in the browser's zone (here UTC+9), on pages as served and in
    rows a live refresh swaps in; hovering shows the ISO time the server sent."""
    from playwright.async_api import expect

    first = await service.submit("summarize", text="what time is it")
    finished = datetime.fromisoformat((await service.wait(first["id"]))["finished_at"])
    page = await new_page(browser, timezone_id="Asia/Tokyo", locale="en-GB")
    tokyo = timezone(timedelta(hours=9))

    async def shown_locally(where: str, count: int) -> None:
        times = page.locator(f"{where} time[datetime]")
        await expect(times).to_have_count(count, timeout=WAIT)
        for i in range(count):
            element = times.nth(i)
            iso = await element.get_attribute("datetime")
            assert iso is not None and await element.get_attribute("title") == iso
            local = datetime.fromisoformat(iso).astimezone(tokyo)
            await expect(element).to_have_text(local.strftime("%d/%m/%Y, %H:%M:%S"))

    # The chart's minutes, on hover: local time first, UTC after.
    await page.goto(f"{service.url}/ui/")
    minute = page.locator("svg.bars title", has_text="1 succeeded")
    utc = finished.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    await expect(minute).to_have_text(
        f"{finished.astimezone(tokyo):%H:%M}: 1 succeeded, 0 failed ({utc} UTC)"
    )
    await page.goto(f"{service.url}/ui/tasks/{first['id']}")
    await shown_locally("dl.facts", 3)  # created, started, finished
    await page.goto(f"{service.url}/ui/tasks")
    await shown_locally("#rows", 1)
    second = await service.submit("summarize", text="and now")
    await service.wait(second["id"])
    await shown_locally("#rows", 2)  # the new row came with a live refresh
    assert page.errors == []


#: Marks every control a keyboard user should reach (visible: not in a closed <details>;
#: enabled; not taken out of the tab order) with its index; returns how many there are.
_MARK_CONTROLS = """() => {
  const wanted = 'a[href], button, input:not([type=hidden]), select, textarea, summary';
  const controls = [...document.querySelectorAll(wanted)].filter(e =>
    !e.disabled && e.getAttribute('tabindex') !== '-1' &&
    e.checkVisibility({contentVisibilityAuto: true, visibilityProperty: true}));
  controls.forEach((e, i) => e.setAttribute('data-kb', String(i)));
  return controls.length;
}"""


async def test_every_control_of_every_page_is_reached_by_the_tab_key(
    service: Service, browser: Browser
) -> None:
    task = await service.submit("summarize", text="by keyboard")
    await service.wait(task["id"])
    schedule = await service.client.post(
        "/api/v1/schedules",
        json={"name": "kb", "template": "summarize", "params": {"text": "x"}, "every": "1h"},
    )
    batch = await service.client.post(
        "/api/v1/batches", params={"template": "summarize", "format": "csv"}, content=b"text\na\n"
    )
    assert schedule.status_code == 201 and batch.status_code == 201, (schedule.text, batch.text)
    page = await _page(browser)
    await page.goto(f"{service.url}/ui/tasks")
    await page.check("#live-pause")  # a live refresh would replace controls mid-way
    for path in (
        "/ui/",
        "/ui/tasks",
        f"/ui/tasks/{task['id']}",
        "/ui/templates",
        "/ui/templates/summarize",
        "/ui/templates/new",
        "/ui/providers",
        "/ui/keys",
        "/ui/schedules",
        f"/ui/schedules/{schedule.json()['id']}",
        "/ui/batches",
        f"/ui/batches/{batch.json()['batch']['id']}",
        "/ui/webhooks",
    ):
        await page.goto(f"{service.url}{path}")
        await page.wait_for_load_state("networkidle")
        assert (
            await page.locator("[tabindex]:not([tabindex='-1']):not([tabindex='0'])").count() == 0
        )
        count = await page.evaluate(_MARK_CONTROLS)
        assert count > 5, path
        await page.evaluate("document.activeElement.blur()")
        reached: set[str] = set()
        # More presses than controls: Tab also walks a date input's fields one by one.
        for _ in range(3 * count + 20):
            await page.keyboard.press("Tab")
            reached.add(await page.evaluate("document.activeElement.dataset.kb || ''"))
            if len(reached - {""}) == count:
                break
        missed = await page.evaluate(
            "ids => [...document.querySelectorAll('[data-kb]')].filter(e =>"
            " !ids.includes(e.dataset.kb)).map(e => e.outerHTML.slice(0, 120))",
            sorted(reached),
        )
        assert missed == [], (path, missed)
    assert page.errors == []
