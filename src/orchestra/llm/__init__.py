"""Model providers: one protocol (``base``), one module per kind of model server."""

from orchestra.llm.base import ChatMessage, ChatRequest, ChatResult, Health, Provider
from orchestra.llm.router import Router, build_providers

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "Health",
    "Provider",
    "Router",
    "build_providers",
]
