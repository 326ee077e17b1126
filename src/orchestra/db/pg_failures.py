"""When PostgreSQL fails: its errors in words (the counterpart of :mod:`orchestra.db.failures`
for SQLite), and which failures mean "run the transaction again".

psycopg raises its errors with the server's SQLSTATE (``sqlstate``); a connection that cannot be
made or was lost has none (``psycopg.OperationalError``). :func:`storage_error` turns those
into the error tree's :class:`~orchestra.errors.StorageError` kinds; other errors (a bug, a
constraint the caller handles) are left as they are.
"""

from __future__ import annotations

import psycopg

from orchestra.errors import (
    InvalidRequest,
    StorageError,
    StorageFull,
    StorageLocked,
    StorageUnavailable,
    StorageUnreachable,
)

#: Run the transaction again: two transactions met (a serialization failure, a deadlock), or
#: two processes inserted the same key at once — a transaction body reads before it writes,
#: and when run again it reads what the other one wrote (a key name taken, the next version).
RETRY = {"40001", "40P01", "23505"}


#: A prepared statement missing on the server connection, or already there (or, a protocol
#: violation, there with other parameters): what a pooler that moves a client between server
#: connections (pgbouncer in transaction mode) causes.
_PREPARED = {"26000", "42P05"}


def _psycopg_error(exc: BaseException) -> psycopg.Error | None:
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, psycopg.Error):
        seen = getattr(seen, "orig", None) or seen.__cause__
    return seen


#: A write refused in a read-only transaction: the server is a hot standby, or the session
#: was opened under ``default_transaction_read_only = on`` (``ALTER DATABASE``/``ALTER ROLE …
#: SET``), which it keeps for its life even after the setting is reset.
READ_ONLY = "25006"


def read_only(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused because the session is read-only (see
    :data:`READ_ONLY`)."""
    found = _psycopg_error(exc)
    return found is not None and found.sqlstate == READ_ONLY


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a conflict with another transaction (see :data:`RETRY`)."""
    found = _psycopg_error(exc)
    return found is not None and found.sqlstate in RETRY


def refused_value(exc: BaseException) -> InvalidRequest | None:
    """A value PostgreSQL cannot store (a NUL character in a text: psycopg refuses it before
    sending), as the caller's error, or None. Requests are checked for NUL where it can come
    in; this is what is left to say, rather than a 500, where a check is missing."""
    found = _psycopg_error(exc)
    if isinstance(found, psycopg.DataError) and "NUL" in str(found):
        return InvalidRequest(
            "a value holds a NUL character (\\u0000), which the database cannot store"
        )
    return None


def translate(exc: BaseException, where: str) -> InvalidRequest | StorageError | None:
    """What an exception from PostgreSQL stands for in the error tree: a value it cannot
    store (:func:`refused_value`), a failure of the database (:func:`storage_error`), or
    None (a bug, a constraint the caller handles)."""
    return refused_value(exc) or storage_error(exc, where)


def storage_error(exc: BaseException, where: str) -> StorageError | None:
    """The :class:`StorageError` an exception from PostgreSQL (raw, or wrapped by SQLAlchemy)
    stands for, or None when it is not a failure of the database itself."""
    found = _psycopg_error(exc)
    if found is None:
        return None
    state = found.sqlstate or ""
    detail = str(found).strip().splitlines()[0] if str(found).strip() else type(found).__name__
    if state == "53100":
        return StorageFull(f"the database server's disk is full ({where}); free space and retry")
    if state == "57014" and "statement timeout" in detail:
        return StorageLocked(
            f"the database ({where}) cancelled a statement past its statement_timeout (set "
            "for the role, the database, the server or in the URL's options: the service's "
            "statements need longer; ALTER ROLE … SET statement_timeout = 0, or larger)"
        )
    if state in ("55P03", "57014"):  # lock not available, a statement cancelled
        return StorageLocked(f"the database ({where}) is busy: {detail}; retry shortly")
    if state in _PREPARED or (state == "08P01" and "prepared statement" in detail):
        return StorageUnavailable(
            f"the database ({where}) lost a prepared statement: {detail}. Behind pgbouncer "
            "in transaction mode before 1.21, set [database] prepared_statements = false"
        )
    if state == READ_ONLY:
        return StorageUnavailable(f"the database ({where}) is read-only: {detail}")
    if isinstance(found, psycopg.OperationalError) or state.startswith(
        ("08", "53", "57P", "58", "XX")
    ):
        return StorageUnreachable(f"the database ({where}) cannot be used: {detail}")
    return None
