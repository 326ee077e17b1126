"""The client is typed for its users: an integrator's own mypy --strict sees its types
(the package ships py.typed), and a misspelt submit option is a type error, not a surprise
at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

APP = """\
from datetime import timedelta

from orchestra.client import Client


def run() -> None:
    with Client("http://127.0.0.1:8000") as client:
        task = client.submit("summarize", {"text": "x"}, delay=timedelta(minutes=5))
        reveal_type(task)
        client.submit("summarize", {"text": "x"}, priorty=3)
        client.create_schedule(name="n", template="summarize", every="1h", timezon="UTC")
        client.update_schedule("n", enabeld=False)
        client.update_webhook(1, event_type=["task.finished"])
        client.create_schedule(name="n", template="summarize", every=timedelta(hours=1))
        client.update_schedule("n", cron=None, every=3600, catch_up="latest")
        client.update_webhook(1, template=None, enabled=False, event_types="task.finished")
"""


@pytest.mark.slow
def test_an_integrators_mypy_sees_the_clients_types(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = checked.stdout
    assert "py.typed" not in out and "missing library stubs" not in out, out
    assert 'Revealed type is "orchestra.wire.schemas.TaskOut"' in out, out
    assert 'Unexpected keyword argument "priorty"' in out, out
    for misspelt in ("timezon", "enabeld", "event_type"):  # a schedule's, a webhook's fields
        assert f'Unexpected keyword argument "{misspelt}"' in out, out
    assert "Found 4 errors" in out, out  # the misspelt options alone


def test_submit_options_are_the_submits_other_fields() -> None:
    """The keywords submit() is typed to take are exactly the body's fields besides the
    template and its params: a field added to one is added to the other."""
    from typing import get_type_hints

    from orchestra.client import SubmitOptions, SubmitTask

    others = set(SubmitTask.__struct_fields__) - {"template", "params"}
    assert set(get_type_hints(SubmitOptions)) == others


def test_schedule_and_webhook_keywords_are_their_bodies_fields() -> None:
    """create/update_schedule and update_webhook are typed to take exactly the fields of the
    bodies they send (a misspelt keyword was found at run time only)."""
    from typing import get_type_hints

    from orchestra.client import ScheduleFields, ScheduleSpec, WebhookFields
    from orchestra.schedules import ScheduleChanges
    from orchestra.webhooks import WebhookChanges

    fields = set(get_type_hints(ScheduleFields))
    assert fields == set(ScheduleSpec.__struct_fields__) == set(ScheduleChanges.__struct_fields__)
    assert set(get_type_hints(WebhookFields)) == set(WebhookChanges.__struct_fields__)


def test_one_event_type_as_a_plain_string_is_that_type() -> None:
    """A str is an Iterable[str], so a type check lets it by; it was sent as one event type
    per character (400: "unknown event type '.', 'a', 'd' …")."""
    from orchestra.client import core

    assert core.feed(None, "task.finished", None).params == {"type": ["task.finished"]}
    assert core.feed(None, ("task.queued", "task.finished"), 7).params == {
        "after": 7,
        "type": ["task.queued", "task.finished"],
    }


def test_a_subscription_is_sent_without_the_fields_left_at_their_defaults() -> None:
    """``enabled`` (new) went out as ``true`` every time: a service older than it refuses
    unknown fields, so every subscription failed there with a 400 (review)."""
    import msgspec

    from orchestra.client import webhook_calls

    made = webhook_calls.new_webhook("https://hooks.example.com/x", None, None, True)
    assert "enabled" not in msgspec.json.decode(msgspec.json.encode(made))
    paused = webhook_calls.new_webhook("https://hooks.example.com/x", None, None, False)
    assert msgspec.json.decode(msgspec.json.encode(paused))["enabled"] is False
