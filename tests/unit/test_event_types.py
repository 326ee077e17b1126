"""Event types and their payloads: one payload per type, encoding to the JSON the events table
and the event stream carry."""

from __future__ import annotations

import msgspec

from orchestra.domain import TaskError, Usage
from orchestra.event_types import (
    PAYLOADS,
    EventType,
    StepFinished,
    StepSkipped,
    StepStarted,
    StepTokens,
    TaskFinished,
    TaskHandedBack,
    TaskLeaseExpired,
    TaskQueued,
    TaskRetrying,
    TaskStarted,
)


def test_every_event_type_has_one_payload_that_knows_its_type() -> None:
    assert set(PAYLOADS) == set(EventType)
    assert all(payload.type is event_type for event_type, payload in PAYLOADS.items())


def test_payloads_encode_to_the_stored_json() -> None:
    error = TaskError(type="timeout", message="slow", retryable=True)
    expected = {
        TaskQueued(
            run_at="2026-01-01T00:00:00.000000Z"
        ): '{"run_at":"2026-01-01T00:00:00.000000Z"}',
        TaskQueued(retry=True): '{"retry":true}',
        TaskStarted(attempt=1, worker="w"): '{"attempt":1,"worker":"w"}',
        StepStarted(step="s", position=0, attempt=2): '{"step":"s","position":0,"attempt":2}',
        StepTokens(step="s", text="hi"): '{"step":"s","text":"hi"}',
        StepFinished(step="s", status="succeeded", model="m", usage=Usage(prompt_tokens=3)): (
            '{"step":"s","status":"succeeded","model":"m","usage":{"prompt_tokens":3}}'
        ),
        StepFinished(step="s", status="failed", error="boom"): (
            '{"step":"s","status":"failed","error":"boom"}'
        ),
        StepSkipped(step="s", status="skipped"): '{"step":"s","status":"skipped"}',
        TaskRetrying(attempt=1, error=error, next_run_at="t"): (
            '{"attempt":1,"error":{"type":"timeout","message":"slow","retryable":true},'
            '"next_run_at":"t"}'
        ),
        TaskHandedBack(attempt=3): '{"attempt":3}',
        TaskLeaseExpired(attempt=3): '{"attempt":3}',
        TaskFinished(status="succeeded"): '{"status":"succeeded"}',
        TaskFinished(status="failed", error=error): (
            '{"status":"failed","error":{"type":"timeout","message":"slow","retryable":true}}'
        ),
    }
    for payload, text in expected.items():
        assert msgspec.json.encode(payload).decode() == text


def test_event_types_compare_equal_to_their_words() -> None:
    assert EventType.STEP_TOKENS == "step.tokens"
    assert f"{EventType.TASK_FINISHED}" == "task.finished"
