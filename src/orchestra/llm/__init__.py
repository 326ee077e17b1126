"""Model providers: one protocol (``base``), one module per kind of model server.

The names below are imported on first use, so that importing ``orchestra.llm.base`` (the
client's wire structs name its ``Phase`` and ``ProcessState``) does not load the router and
every provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestra.llm.base import ChatMessage, ChatRequest, ChatResult, Health, Provider
    from orchestra.llm.providers import build_providers
    from orchestra.llm.router import Router

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "Health",
    "Provider",
    "Router",
    "build_providers",
]

_HOME = {
    "ChatMessage": "orchestra.llm.base",
    "ChatRequest": "orchestra.llm.base",
    "ChatResult": "orchestra.llm.base",
    "Health": "orchestra.llm.base",
    "Provider": "orchestra.llm.base",
    "Router": "orchestra.llm.router",
    "build_providers": "orchestra.llm.providers",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
