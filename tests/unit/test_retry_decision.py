"""The retry decision: whether a failed attempt runs again, and when (domain.decide_retry)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from orchestra.domain import RetryPolicy, Task, TaskError, TaskStatus, decide_retry

FAILED_AT = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
RETRYABLE = TaskError(type="model_unavailable", message="connection refused", retryable=True)
FINAL = TaskError(type="invalid_output", message="not JSON")


def _task(attempts: int, max_attempts: int = 3, handed_back: int = 0) -> Task:
    """A task as claimed for its ``attempts``-th attempt."""
    return Task(
        id=1,
        template="summarize",
        template_version=1,
        status=TaskStatus.RUNNING,
        params={},
        model=None,
        priority=0,
        attempts=attempts,
        max_attempts=max_attempts,
        created_at="2026-11-22T02:59:00.000000Z",
        run_at="2026-11-22T02:59:00.000000Z",
        handed_back=handed_back,
    )


class _Fixed(random.Random):
    """Jitter that always draws ``fraction`` of its range (0: the least, 1: the most)."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def test_a_non_retryable_error_fails_the_task_at_once() -> None:
    assert decide_retry(_task(1), FINAL, RetryPolicy(), at=FAILED_AT) is None


def test_a_retryable_error_on_the_last_attempt_fails_the_task() -> None:
    assert decide_retry(_task(3, max_attempts=3), RETRYABLE, RetryPolicy(), at=FAILED_AT) is None


def test_a_task_allowed_one_attempt_is_never_retried() -> None:
    assert decide_retry(_task(1, max_attempts=1), RETRYABLE, RetryPolicy(), at=FAILED_AT) is None


def test_a_retryable_error_with_attempts_left_runs_again_after_the_backoff() -> None:
    policy = RetryPolicy(initial_delay=2, max_delay=60)
    retry = decide_retry(_task(1, max_attempts=3), RETRYABLE, policy, at=FAILED_AT, rng=_Fixed(1))
    assert retry is not None
    assert retry.delay == 2
    assert retry.at == FAILED_AT + timedelta(seconds=2)
    assert retry.attempts_left == 2


def test_the_task_max_attempts_counts_not_the_policy_one() -> None:
    # The policy's max_attempts set the task's when it was submitted (or a submit overrode it).
    policy = RetryPolicy(max_attempts=1)
    assert decide_retry(_task(1, max_attempts=2), RETRYABLE, policy, at=FAILED_AT) is not None
    policy = RetryPolicy(max_attempts=5)
    assert decide_retry(_task(2, max_attempts=2), RETRYABLE, policy, at=FAILED_AT) is None


def test_attempts_handed_back_at_shutdown_do_not_count() -> None:
    # Three attempts started, two of them given back at shutdown: only one counts.
    task = _task(3, max_attempts=2, handed_back=2)
    retry = decide_retry(task, RETRYABLE, RetryPolicy(), at=FAILED_AT)
    assert retry is not None and retry.attempts_left == 1
    assert (
        decide_retry(
            _task(3, max_attempts=2, handed_back=1), RETRYABLE, RetryPolicy(), at=FAILED_AT
        )
        is None
    )


def test_exponential_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff="exponential", initial_delay=1, max_delay=10)
    delays = []
    for attempt in range(1, 7):
        retry = decide_retry(
            _task(attempt, max_attempts=100), RETRYABLE, policy, at=FAILED_AT, rng=_Fixed(1)
        )
        assert retry is not None
        delays.append(retry.delay)
    assert delays == [1, 2, 4, 8, 10, 10]


def test_fixed_backoff_waits_the_same_each_time() -> None:
    policy = RetryPolicy(backoff="fixed", initial_delay=3, max_delay=10)
    for attempt in range(1, 6):
        retry = decide_retry(
            _task(attempt, max_attempts=100), RETRYABLE, policy, at=FAILED_AT, rng=_Fixed(1)
        )
        assert retry is not None and retry.delay == 3


@pytest.mark.parametrize("attempt", [1, 2, 3, 8])
def test_jitter_keeps_the_delay_between_half_and_all_of_the_backoff(attempt: int) -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=10)
    full = min(2 ** (attempt - 1), 10)
    task = _task(attempt, max_attempts=100)
    least = decide_retry(task, RETRYABLE, policy, at=FAILED_AT, rng=_Fixed(0))
    most = decide_retry(task, RETRYABLE, policy, at=FAILED_AT, rng=_Fixed(1))
    assert least is not None and least.delay == full / 2
    assert most is not None and most.delay == full
    rng = random.Random(17)
    for _ in range(100):
        retry = decide_retry(task, RETRYABLE, policy, at=FAILED_AT, rng=rng)
        assert retry is not None
        assert full / 2 <= retry.delay <= full
        assert retry.at == FAILED_AT + timedelta(seconds=retry.delay)
