"""The tables. Statuses are words, JSON is text, times are ISO-8601 UTC text.

A person with the sqlite3 shell can read everything: ``SELECT id, status, error FROM tasks``.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)

metadata = MetaData()

TASK_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
STEP_STATUSES = ("running", "succeeded", "failed", "skipped")


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    words = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({words})", name=f"ck_{column}_word")


schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Text, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    # INTEGER PRIMARY KEY AUTOINCREMENT: ids are never reused, even after old tasks are deleted.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("template", Text, nullable=False),
    Column("template_version", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("params", Text, nullable=False),  # JSON
    Column("model", Text),
    Column("result", Text),  # JSON
    Column("error", Text),  # JSON: {"type", "message", "step"}
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("run_at", Text, nullable=False),  # not claimed before this time
    Column("lease_owner", Text),
    Column("lease_expires_at", Text),
    Column("created_at", Text, nullable=False),
    Column("started_at", Text),
    Column("finished_at", Text),
    _one_of("status", TASK_STATUSES),
    sqlite_autoincrement=True,
)

# The queue: only queued rows, in claim order. Finished rows never enter this index, so a claim
# costs the same with a thousand or a million finished tasks in the table.
Index(
    "ix_tasks_queue",
    tasks.c.priority.desc(),
    tasks.c.run_at,
    tasks.c.id,
    sqlite_where=tasks.c.status == "queued",
)
# Leases to reap: only running rows.
Index("ix_tasks_leases", tasks.c.lease_expires_at, sqlite_where=tasks.c.status == "running")
Index("ix_tasks_status_id", tasks.c.status, tasks.c.id)
Index("ix_tasks_template_id", tasks.c.template, tasks.c.id)

task_steps = Table(
    "task_steps",
    metadata,
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("step_id", Text, nullable=False),
    Column("position", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("output", Text),  # JSON
    Column("error", Text),  # JSON
    Column("model", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("usage", Text),  # JSON: every figure the model server reported
    Column("started_at", Text),
    Column("finished_at", Text),
    Column("duration_ms", Float),
    PrimaryKeyConstraint("task_id", "attempt", "step_id"),
    _one_of("status", STEP_STATUSES),
)
