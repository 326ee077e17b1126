"""The HTTP API: app factory and lifespan (``app``), thin controllers, request/response structs."""

from orchestra.api.app import create_app

__all__ = ["create_app"]
