"""Each built-in template, end to end: the rendered prompt reaches the model and the result
has the promised shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import BUILTINS, Service
from tests.fixtures.fake_ollama import FakeOllama

Reply = Callable[[dict[str, Any]], str]


def fixed(text: str) -> Reply:
    return lambda _request: text


CASES: list[tuple[str, dict[str, Any], Reply, Any, list[str]]] = [
    (
        "summarize",
        {"text": "Orchestra runs AI tasks.", "sentences": 2, "style": "bullets"},
        fixed("  - Orchestra runs tasks.\n"),
        "- Orchestra runs tasks.",
        ["at most 2 sentences", "bullet points", "Orchestra runs AI tasks."],
    ),
    (
        "translate",
        {"text": "Bonjour le monde", "target_language": "English", "source_language": "French"},
        fixed("Hello world\n"),
        "Hello world",
        ["from French into English", "Bonjour le monde"],
    ),
    (
        "classify",
        {"text": "I was charged twice", "labels": ["billing", "bug", "feature request"]},
        fixed("Billing."),
        "billing",
        ["billing, bug, feature request", "I was charged twice"],
    ),
    (
        "extract",
        {"text": "Ada Lovelace, ada@example.org", "fields": ["name", "email", "phone"]},
        fixed('```json\n{"name": "Ada Lovelace", "email": "ada@example.org", "phone": null}\n```'),
        {"name": "Ada Lovelace", "email": "ada@example.org", "phone": None},
        ["name, email, phone", "Ada Lovelace, ada@example.org"],
    ),
    (
        "sentiment",
        {"text": "Loved it, but the ending was weak."},
        fixed("Mixed"),
        "mixed",
        ["positive, negative, neutral or mixed", "Loved it"],
    ),
    (
        "rewrite",
        {"text": "send me the file asap", "tone": "polite"},
        fixed("Could you please send me the file when you have a moment?"),
        "Could you please send me the file when you have a moment?",
        ["in a polite tone", "send me the file asap"],
    ),
    (
        "keywords",
        {"text": "SQLite queues and leases in one asyncio process.", "count": 2},
        fixed("1. SQLite\n2. leases\n3. asyncio"),
        ["SQLite", "leases"],
        ["the 2 most important keywords", "SQLite queues"],
    ),
    (
        "qa",
        {"context": "The service listens on port 8000.", "question": "Which port?"},
        fixed(" Port 8000. "),
        "Port 8000.",
        ["The service listens on port 8000.", "Question: Which port?"],
    ),
]


@pytest.mark.parametrize(
    ("template", "params", "reply", "expected", "in_prompt"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_builtin_template(
    service: Service,
    fake_ollama: FakeOllama,
    template: str,
    params: dict[str, Any],
    reply: Reply,
    expected: Any,
    in_prompt: list[str],
) -> None:
    fake_ollama.reply = reply
    task = await service.submit(template, **params)
    done = await service.wait(task["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"] == expected
    [request] = fake_ollama.requests
    prompt = request["messages"][-1]["content"]
    for fragment in in_prompt:
        assert fragment in prompt


def test_every_builtin_has_a_test() -> None:
    from orchestra.templating.registry import TemplateRegistry

    registry = TemplateRegistry()
    registry.load()
    assert {t.name for t in registry.all()} == {c[0] for c in CASES} == BUILTINS


async def test_classify_fails_when_the_model_invents_a_label(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply = fixed("urgent")
    task = await service.submit("classify", text="help", labels=["billing", "bug"])
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert "'urgent', which is none of: billing, bug" in done["error"]["message"]


async def test_extract_fails_clearly_when_the_reply_is_not_json(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply = fixed("Name is Ada.")
    task = await service.submit("extract", text="Ada", fields=["name"])
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert "not JSON" in done["error"]["message"]
