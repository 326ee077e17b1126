"""``import orchestra.client`` stays light: the wire structs it decodes into
(:mod:`orchestra.wire`) load none of the server's libraries, so the CLI and Python callers
start in a fraction of a second. Each check runs in a fresh interpreter: this one has the
server loaded already."""

from __future__ import annotations

import pytest

from tests.fixtures.imports import loaded_after

#: What only the server needs; importing any of them costs the client a second or more.
HEAVY = ("sqlalchemy", "litestar", "jinja2", "ruamel", "llama_cpp", "aiosqlite", "psycopg")


def heavy_modules_after(statement: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``statement``."""
    return loaded_after(statement, HEAVY)


@pytest.mark.parametrize(
    "statement",
    [
        "import orchestra.client",
        "from orchestra.client import AsyncClient, Client",
        "import orchestra.wire.schemas, orchestra.wire.events, orchestra.wire.tasks",
        "import orchestra.wire.schedules, orchestra.wire.webhooks, orchestra.wire.batches",
        # The CLI's module and what a command that calls a server loads before its request.
        "import orchestra.cli, orchestra.cli_common, orchestra.client",
    ],
)
def test_the_client_loads_none_of_the_servers_libraries(statement: str) -> None:
    assert heavy_modules_after(statement) == []


def test_the_probe_sees_a_heavy_import() -> None:
    # The check above can fail: the server's own modules do load them.
    assert "sqlalchemy" in heavy_modules_after("import orchestra.db.events")


def test_the_server_and_the_client_share_one_definition_of_each_struct() -> None:
    from orchestra import tasks, wire
    from orchestra.api import batches, schedules, schemas, webhooks
    from orchestra.db import events, feed
    from orchestra.wire import batches as wire_batches
    from orchestra.wire import events as wire_events
    from orchestra.wire import schedules as wire_schedules
    from orchestra.wire import schemas as wire_schemas
    from orchestra.wire import tasks as wire_tasks
    from orchestra.wire import webhooks as wire_webhooks

    assert wire.__doc__
    assert schemas.TaskOut is wire_schemas.TaskOut
    assert schemas.ErrorBody is wire_schemas.ErrorBody
    assert tasks.SubmitTask is wire_tasks.SubmitTask
    assert events.TaskEvent is wire_events.TaskEvent
    assert feed.FeedEvent is wire_events.FeedEvent
    assert schedules.ScheduleOut is wire_schedules.ScheduleOut
    assert webhooks.DeliveryOut is wire_webhooks.DeliveryOut
    assert batches.UploadOut is wire_batches.UploadOut
