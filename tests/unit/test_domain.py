from __future__ import annotations

from datetime import UTC, datetime, timedelta

from orchestra.domain import ACTIVE, TERMINAL, TRANSITIONS, TaskStatus, can_transition, iso


def test_every_status_is_active_or_terminal_never_both() -> None:
    assert ACTIVE | TERMINAL == set(TaskStatus)
    assert not ACTIVE & TERMINAL


def test_legal_transitions() -> None:
    assert can_transition(TaskStatus.QUEUED, TaskStatus.RUNNING)
    assert can_transition(TaskStatus.RUNNING, TaskStatus.QUEUED)  # lease expired / handed back
    assert can_transition(TaskStatus.FAILED, TaskStatus.QUEUED)  # retried by a person
    assert not can_transition(TaskStatus.SUCCEEDED, TaskStatus.QUEUED)
    assert not can_transition(TaskStatus.QUEUED, TaskStatus.SUCCEEDED)
    assert set(TRANSITIONS) == set(TaskStatus)


def test_stored_times_sort_as_text_in_time_order() -> None:
    base = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    moments = [base + timedelta(microseconds=n) for n in (0, 1, 999_999, 10**7)]
    texts = [iso(m) for m in moments]
    assert texts == sorted(texts)
    assert texts[0] == "2026-01-02T03:04:05.000000Z"
