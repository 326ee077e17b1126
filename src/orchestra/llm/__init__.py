"""Model providers: one protocol (``base``), one module per kind of model server."""

from orchestra.llm.base import ChatMessage, ChatRequest, ChatResult, Health, Provider
from orchestra.llm.ollama import OllamaProvider

__all__ = ["ChatMessage", "ChatRequest", "ChatResult", "Health", "OllamaProvider", "Provider"]
