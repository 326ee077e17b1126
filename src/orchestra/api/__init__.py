"""The HTTP API: app factory and lifespan (``app``), thin controllers, request/response structs.

``create_app`` is imported on first use: the client (:mod:`orchestra.client`) reads the
response structs of this package without loading the app and every controller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestra.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from orchestra.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
