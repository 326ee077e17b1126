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


def test_durations() -> None:
    from orchestra.domain import parse_duration

    assert parse_duration("500ms") == 0.5
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("2m") == 120
    assert parse_duration("1h") == 3600
    assert parse_duration(7) == 7.0
    assert parse_duration("10") == 10.0
    for bad in ("soon", "-1s", True, -3, "1d"):
        try:
            parse_duration(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def test_exponential_backoff_with_jitter_stays_within_bounds() -> None:
    import random

    from orchestra.domain import RetryPolicy

    policy = RetryPolicy(initial_delay=1, max_delay=10)
    rng = random.Random(7)
    for failures, full in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)):
        delays = [policy.delay(failures, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # jitter really spreads them
    fixed = RetryPolicy(backoff="fixed", initial_delay=2, max_delay=10)
    assert all(1 <= fixed.delay(n, rng) <= 2 for n in range(1, 8))


def test_truncation_is_flagged_from_what_the_model_reports() -> None:
    from orchestra.domain import Usage, total_usage

    full = Usage(prompt_tokens=2048, completion_tokens=10, finish_reason="stop")
    assert full.flag_truncation(2048).truncated == "prompt"
    assert full.flag_truncation(4096).truncated is None
    assert full.flag_truncation(None).truncated is None
    cut = Usage(prompt_tokens=10, completion_tokens=128, finish_reason="length")
    assert cut.flag_truncation(4096).truncated == "output"
    total = total_usage([full, None, cut.flag_truncation(None)])
    assert total is not None
    assert (total.prompt_tokens, total.completion_tokens, total.truncated) == (2058, 138, "output")
    assert total_usage([None, None]) is None


def test_a_submission_fingerprint_is_what_it_was_before_the_cache_option() -> None:
    """An idempotency key used before ``cache`` existed still matches the same body after an
    upgrade (the digest was computed by the code before the field was added)."""
    from orchestra.tasks import SubmitTask

    body = SubmitTask(template="summarize", params={"text": "x"}, priority=3, idempotency_key="k")
    assert body.fingerprint() == "c994ed3f54faf9680cf02453e1549bf5e21caae0796c1cabb40c39bdd615d09f"
    cached = SubmitTask(template="summarize", params={"text": "x"}, priority=3, cache=True)
    assert cached.fingerprint() != body.fingerprint()


def test_a_key_used_before_callback_url_existed_still_matches_the_same_body() -> None:
    """Versions before ``callback_url`` (84ace60, schema 4, among them) hashed no such field:
    the same body sent again after an upgrade got a 409 ("a different request")."""
    from orchestra.tasks import SubmitTask

    body = SubmitTask(template="summarize", params={"text": "x"}, priority=3, idempotency_key="k")
    before = "ca394c2e22300b192c2b5748a451e152e301e20a9fe4bc9836f7455269c72637"  # by 84ace60
    assert body.matches(before) and body.matches(body.fingerprint())
    called = SubmitTask(
        template="summarize", params={"text": "x"}, priority=3, callback_url="https://e.x/h"
    )
    assert not called.matches(before)  # a body that differs still differs
    assert not SubmitTask(template="summarize", params={"text": "y"}, priority=3).matches(before)
