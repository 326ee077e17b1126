"""PostgreSQL connection settings the URL leaves out."""

from __future__ import annotations

import os

import pytest

from orchestra.db.postgres_engine import CONNECT_TIMEOUT, connect_args


def test_a_connect_timeout_and_a_name_are_added_unless_the_url_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    monkeypatch.delenv("PGAPPNAME", raising=False)
    args = connect_args("postgresql+psycopg://orchestra@db.example/orch")
    assert args["connect_timeout"] == CONNECT_TIMEOUT
    assert args["application_name"].startswith("orchestra ")
    assert args["application_name"].endswith(f":{os.getpid()}")
    given = "postgresql+psycopg://o@db/orch?connect_timeout=3&application_name=mine"
    assert connect_args(given) == {}


def test_libpqs_environment_is_left_to_say_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    monkeypatch.setenv("PGAPPNAME", "mine")
    assert connect_args("postgresql+psycopg://orchestra@db.example/orch") == {}
