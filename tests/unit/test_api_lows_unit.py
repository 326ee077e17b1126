"""Time zone names that are IANA's, and the error a refused webhook destination raises."""

from __future__ import annotations

import pytest

from orchestra.api.errors import status_of
from orchestra.errors import InvalidParams, InvalidRequest
from orchestra.schedules import ScheduleSpec, check, time_zone
from orchestra.webhooks import DestinationRefused, parse_destination


@pytest.mark.parametrize(
    "name", ["localtime", "posixrules", "posix/Europe/Paris", "right/UTC", "Mars/Olympus", ""]
)
def test_a_zone_name_that_is_no_iana_name_names_no_zone(name: str) -> None:
    assert time_zone(name) is None


@pytest.mark.parametrize("name", ["UTC", "Europe/Paris", "America/Indiana/Indianapolis", "GMT"])
def test_iana_names_name_their_zone(name: str) -> None:
    zone = time_zone(name)
    assert zone is not None and zone.key == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("localtime", "'localtime' is not an IANA time zone name: use one like Europe/Paris"),
        ("posix/Asia/Tokyo", "use one like Europe/Paris (here: Asia/Tokyo)"),
        ("right/UTC", "use one like Europe/Paris (here: UTC)"),
    ],
)
def test_a_schedule_in_a_host_zone_file_is_refused_naming_timezone(name: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check(ScheduleSpec(name="s", template="t", cron="0 9 * * *", timezone=name))
    [problem] = caught.value.fields
    assert problem.field == "timezone" and says in problem.message


def test_a_zone_given_with_every_is_kept_not_refused() -> None:
    every = ScheduleSpec(name="s", template="t", every="1h", timezone="Europe/Paris")
    assert check(every) == 3600.0


def test_a_malformed_destination_is_a_400_as_any_bad_field() -> None:
    """A URL that is no http(s) URL is a bad field like any other (400); a well-formed one
    that cannot be used (private, unresolvable) is the 422 (tests/integration)."""
    with pytest.raises(DestinationRefused) as refused:
        parse_destination("ftp://example.com/x", field="callback_url")
    error = refused.value
    assert isinstance(error, InvalidRequest) and not isinstance(error, InvalidParams)
    assert error.code == "invalid_request"
    assert [f.field for f in error.fields] == ["callback_url"]
    assert status_of(error) == 400
    assert status_of(DestinationRefused("callback_url: its host does not resolve")) == 422
