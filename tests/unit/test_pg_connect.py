"""PostgreSQL connection settings the URL leaves out, and failures of prepared statements."""

from __future__ import annotations

import os

import psycopg
import pytest

from orchestra.db.pg_failures import storage_error
from orchestra.db.postgres_engine import CONNECT_TIMEOUT, KEEPALIVES, connect_args
from orchestra.errors import StorageUnavailable


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
    assert connect_args(given) == KEEPALIVES


def test_tcp_keepalives_are_on_unless_the_url_says() -> None:
    """A connection whose server vanished (a failover, a dropped NAT entry) failed no read:
    one waited for ever (review)."""
    args = connect_args("postgresql+psycopg://o@db/orch")
    assert {k: args[k] for k in KEEPALIVES} == KEEPALIVES and args["keepalives"] == 1
    mine = connect_args("postgresql+psycopg://o@db/orch?keepalives_idle=5&tcp_user_timeout=0")
    assert "keepalives_idle" not in mine and "tcp_user_timeout" not in mine


def test_libpqs_environment_is_left_to_say_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    monkeypatch.setenv("PGAPPNAME", "mine")
    assert connect_args("postgresql+psycopg://orchestra@db.example/orch") == KEEPALIVES


def test_without_prepared_statements_psycopg_prepares_none() -> None:
    args = connect_args("postgresql+psycopg://o@db/orch", prepared_statements=False)
    assert "prepare_threshold" in args and args["prepare_threshold"] is None
    assert "prepare_threshold" not in connect_args("postgresql+psycopg://o@db/orch")


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.InvalidSqlStatementName('prepared statement "_pg3_0" does not exist'),
        psycopg.errors.DuplicatePreparedStatement('prepared statement "_pg3_3" already exists'),
        psycopg.errors.ProtocolViolation(
            'bind message supplies 19 parameters, but prepared statement "_pg3_2" requires 5'
        ),
    ],
)
def test_a_lost_prepared_statement_is_unavailable_storage_naming_the_setting(
    error: psycopg.Error,
) -> None:
    """What pgbouncer in transaction mode (before 1.21) does to prepared statements: a 503
    that says which setting helps, not an internal error."""
    found = storage_error(error, "db")
    assert isinstance(found, StorageUnavailable)
    assert "prepared_statements = false" in found.message and "_pg3_" in found.message


def test_a_nul_postgresql_cannot_store_is_the_caller_s_error_not_a_500() -> None:
    """A NUL in a text reached PostgreSQL from a schedule's name in the path and a task's
    model (both checked now): psycopg's DataError was a 500. What no check catches is said."""
    from psycopg.types.string import StrDumper

    from orchestra.db.pg_failures import refused_value
    from orchestra.errors import InvalidRequest

    with pytest.raises(psycopg.DataError) as caught:
        StrDumper(str).dump("a\x00b")  # what psycopg does with the value before sending it
    refused = refused_value(caught.value)
    assert isinstance(refused, InvalidRequest) and "NUL character" in refused.message
    assert refused_value(psycopg.DataError("numeric field overflow")) is None
    assert storage_error(caught.value, "here") is None  # not the database failing


def test_a_statement_past_the_roles_statement_timeout_names_the_setting() -> None:
    """``ALTER ROLE … SET statement_timeout = '1ms'`` stopped the start with "the database
    is busy …; retry shortly", which points away from the cause (helper-147)."""
    from orchestra.errors import StorageLocked

    error = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    found = storage_error(error, "db")
    assert isinstance(found, StorageLocked)
    assert "statement_timeout" in found.message and "busy" not in found.message, found.message
    other = storage_error(psycopg.errors.LockNotAvailable("could not obtain lock"), "db")
    assert isinstance(other, StorageLocked) and "busy" in other.message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://orchestra@db.example:6543/orch",
            {"host": "db.example", "port": "6543", "user": "orchestra", "dbname": "orch"},
        ),
        (
            "postgresql+psycopg://postgres@/orch?host=/run/postgresql&port=5433",
            {"host": "/run/postgresql", "port": "5433", "user": "postgres", "dbname": "orch"},
        ),
        (
            "postgresql+psycopg://postgres@/orch?host=127.0.0.1:22090&host=127.0.0.1:22091"
            "&target_session_attrs=read-write",
            {
                "host": "127.0.0.1,127.0.0.1",
                "port": "22090,22091",
                "user": "postgres",
                "dbname": "orch",
                "target_session_attrs": "read-write",
            },
        ),
        (
            "postgresql+psycopg://o@/orch?host=db1,db2&port=5432,5433&sslmode=require",
            {"host": "db1,db2", "port": "5432,5433", "user": "o", "dbname": "orch"}
            | {"sslmode": "require"},
        ),
        (
            "postgresql+psycopg://o:p%40ss%20w%27rd%3D%2F@db/orch?options=-c%20work_mem%3D8MB",
            {"host": "db", "user": "o", "password": "p@ss w'rd=/", "dbname": "orch"}
            | {"options": "-c work_mem=8MB"},
        ),
    ],
)
def test_the_listeners_conninfo_says_what_the_pools_are_given(
    url: str, expected: dict[str, str]
) -> None:
    """The LISTEN connection's libpq string: with SQLAlchemy's multi-host form it named one
    host "127.0.0.1:22091" and never connected (``failed to resolve host``)."""
    from psycopg.conninfo import conninfo_to_dict

    from orchestra.db.postgres_engine import conninfo

    assert conninfo_to_dict(conninfo(url)) == expected


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("postgresql+psycopg://o:secret@db.example/orch", "postgresql://db.example:5432/orch"),
        ("postgresql+psycopg://o@db.example:6543/orch", "postgresql://db.example:6543/orch"),
        (
            "postgresql+psycopg://postgres@/orch?host=127.0.0.1:22090&host=127.0.0.1:22091"
            "&target_session_attrs=read-write",
            "postgresql://127.0.0.1:22090,127.0.0.1:22091/orch",
        ),
        (
            "postgresql+psycopg://o@/orch?host=db1,db2&port=6000,6001&password=secret",
            "postgresql://db1:6000,db2:6001/orch",
        ),
        (
            "postgresql+psycopg://o@/orch?host=db1:7000&host=db2",
            "postgresql://db1:7000,db2:5432/orch",
        ),
        (
            "postgresql+psycopg://o@/orch?host=/run/postgresql",
            "PostgreSQL database 'orch' on the socket in /run/postgresql (port 5432)",
        ),
    ],
)
def test_messages_name_every_host_and_its_port_and_never_the_password(url: str, where: str) -> None:
    """With the multi-host form, errors and /health named
    ``postgresql://('127.0.0.1:22090', '127.0.0.1:22091'):5432/orch``."""
    from orchestra.db.engine import server_where

    assert server_where(url) == where
