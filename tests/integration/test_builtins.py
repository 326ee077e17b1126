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
        fixed('{"label": "billing"}'),
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
        fixed('{"sentiment": "mixed"}'),
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
    (
        "summarize_long",
        {"text": "Short enough for one chunk.", "sentences": 2},
        lambda req: "Combined." if "Combine them" in req["messages"][-1]["content"] else "Part.",
        "Combined.",
        ["Part 1: Part.", "at most 2 sentences"],
    ),
    (
        "extract_schema",
        {
            "text": "Invoice total: 42 EUR",
            "schema": {
                "type": "object",
                "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
                "required": ["total", "currency"],
            },
        },
        fixed('{"total": 42, "currency": "EUR"}'),
        {"total": 42, "currency": "EUR"},
        ['"required": ["total", "currency"]', "Invoice total: 42 EUR"],
    ),
    (
        "classify_confidence",
        {"text": "The app crashes on start", "labels": ["bug", "question"]},
        fixed('{"label": "bug", "confidence": 0.9, "reason": "It describes a crash."}'),
        {"label": "bug", "confidence": 0.9, "reason": "It describes a crash."},
        ["bug, question", "The app crashes on start"],
    ),
    (
        "qa_evidence",
        {
            "context": "Orchestra stores tasks in SQLite. It needs no broker.",
            "question": "Where are tasks stored?",
        },
        fixed(
            '{"answer": "In SQLite.", "found": true, "evidence": '
            '["Orchestra stores tasks in SQLite.", "It is made of cheese.", " ", '
            '" Orchestra stores tasks in SQLite. ", "It needs no broker.", '
            '"it needs no broker."]}'  # blank: in any context; in another case: not in it
        ),
        {
            "answer": "In SQLite.",
            "found": True,
            "evidence": ["Orchestra stores tasks in SQLite.", "It needs no broker."],
        },
        ["Question: Where are tasks stored?", "It needs no broker."],
    ),
    (
        "code_review",
        {"code": "def f(x):\n    return eval(x)", "language": "Python"},
        fixed(
            '[{"line": 2, "severity": "critical", "message": "eval of input", '
            '"suggestion": "use ast.literal_eval"}]'
        ),
        [
            {
                "line": 2,
                "severity": "critical",
                "message": "eval of input",
                "suggestion": "use ast.literal_eval",
            }
        ],
        ["Review this Python", "   2 |     return eval(x)"],
    ),
    (
        "title",
        {"text": "We moved the queue from Redis to SQLite and halved our costs.", "max_words": 6},
        fixed(' "Moving the queue to SQLite" \n'),
        "Moving the queue to SQLite",
        ["at most 6 words", "halved our costs"],
    ),
    (
        "compare",
        {
            "text_a": "Price 10 EUR, delivery in 3 days.",
            "text_b": "Price 12 EUR, delivery in 3 days.",
            "aspect": "prices",
        },
        fixed(
            '{"similarities": ["3-day delivery"], "differences": ["price 10 vs 12 EUR"], '
            '"summary": "B costs more."}'
        ),
        {
            "similarities": ["3-day delivery"],
            "differences": ["price 10 vs 12 EUR"],
            "summary": "B costs more.",
        },
        ["focusing on prices", "Price 12 EUR"],
    ),
    (
        "translate_glossary",
        {
            "text": "Submit a task to Orchestra.",
            "target_language": "French",
            "glossary": {"task": "tâche", "Orchestra": "Orchestra"},
        },
        fixed("Soumettez une tâche à Orchestra."),
        "Soumettez une tâche à Orchestra.",
        ["- Orchestra → Orchestra", "- task → tâche", "into French"],
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
    prompts = "\n".join(m["content"] for r in fake_ollama.requests for m in r["messages"])
    for fragment in in_prompt:
        assert fragment in prompts
    spec = (await service.client.get(f"/api/v1/templates/{template}")).json()
    if template in STRUCTURED:
        assert "format" in fake_ollama.requests[-1]
    assert spec["description"] and all(
        p.get("description") for p in spec["parameters"]["properties"].values()
    )


STRUCTURED = {
    "classify",
    "extract",
    "sentiment",
    "extract_schema",
    "classify_confidence",
    "qa_evidence",
    "code_review",
    "compare",
}


def test_every_builtin_has_a_test() -> None:
    from orchestra.templating.registry import TemplateRegistry

    registry = TemplateRegistry()
    registry.load()
    assert {t.name for t in registry.all()} == {c[0] for c in CASES} == BUILTINS


async def test_classify_cannot_return_an_invented_label(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply = fixed('{"label": "urgent"}')
    task = await service.submit("classify", text="help", labels=["billing", "bug"])
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "invalid_output"
    assert "'urgent' is not one of ['billing', 'bug']" in done["error"]["message"]
    sent = fake_ollama.requests[0]["format"]["properties"]["label"]["enum"]
    assert sent == ["billing", "bug"]


async def test_summarize_long_maps_over_chunks_then_combines(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.reply = lambda req: (
        "Combined." if "Combine them" in req["messages"][-1]["content"] else "Part."
    )
    text = ("A sentence about queues and leases. " * 80).strip()
    task = await service.submit("summarize_long", text=text, chunk_size=1000)
    done = await service.wait(task["id"])
    assert done["status"] == "succeeded"
    parts = done["steps"][0]["output"]
    assert len(parts) >= 3
    assert len(fake_ollama.requests) == len(parts) + 1
    assert fake_ollama.requests[-1]["messages"][-1]["content"].count("Part ") == len(parts)


async def test_extract_schema_rejects_a_schema_that_is_not_one(service: Service) -> None:
    task = await service.submit("extract_schema", text="x", schema={"type": "objekt"})
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert "not a valid JSON Schema" in done["error"]["message"]


async def test_extract_refuses_a_field_named_twice_when_submitted(service: Service) -> None:
    """["a", "a"] was queued, then failed as "steps.fields.format is not a valid JSON
    Schema: ['a', 'a'] has non-unique elements"."""
    answer = await service.client.post(
        "/api/v1/tasks", json={"template": "extract", "params": {"text": "x", "fields": ["a", "a"]}}
    )
    assert answer.status_code == 422, answer.text
    [field] = answer.json()["fields"]
    assert field["field"] == "params.fields" and "non-unique" in field["message"], field
