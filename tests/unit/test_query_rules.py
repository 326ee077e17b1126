"""The query rules (orchestra.api.query_rules) are the app's ``before_request`` hook, which
Litestar takes from the nearest layer only: a router, controller or handler that set its own
would turn them off for its routes. Every route of every surface keeps them."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar import Litestar

from orchestra.api.app import Surface, _build
from orchestra.api.query_rules import strict_query
from orchestra.config import Settings


def _handlers(app: Litestar) -> list[Any]:
    return [h for route in app.routes for h in getattr(route, "route_handlers", [])]


@pytest.mark.parametrize("api", [True, False])
def test_every_route_reads_its_query_by_the_rules(api: bool) -> None:
    settings = Settings()
    if not api:  # orchestra serve --no-api: /health and /metrics alone
        settings = msgspec.structs.replace(
            settings, server=msgspec.structs.replace(settings.server, api=False)
        )
    handlers = _handlers(_build(Surface.of(settings)))
    assert len(handlers) > (20 if api else 1)
    hooks = {h.handler_name: h.resolve_before_request() for h in handlers}
    assert {name for name, hook in hooks.items() if hook is not strict_query} == set()
