"""How the dashboard words a length of time: days past two days, years past two years (a
task delayed by years read "in 69890521 h")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestra.web.views import duration, until

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ms", "words"),
    [
        (850, "850 ms"),
        (3_200, "3.2 s"),
        (245_000, "4 min 05 s"),
        (86_340_000, "23 h 59 min"),
        (47 * 3_600_000 + 60_000, "47 h 01 min"),
        (48 * 3_600_000, "2 d 00 h"),
        (9 * 86_400_000 + 5 * 3_600_000 + 59 * 60_000, "9 d 05 h"),
        (729 * 86_400_000, "729 d 00 h"),
        (730 * 86_400_000, "2 years"),
        (69_890_521 * 3_600_000, "7,978 years"),
    ],
)
def test_a_length_of_time_is_worded_in_the_unit_that_reads(ms: float, words: str) -> None:
    assert duration(ms) == words


def test_a_time_years_ahead_is_in_years() -> None:
    assert until((NOW + timedelta(days=3 * 365 + 1)).isoformat(), NOW) == "in 3 years"
