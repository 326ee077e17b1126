"""The tables. Statuses are words, JSON is text, times are ISO-8601 UTC text.

A person with the sqlite3 shell can read everything: ``SELECT id, status, error FROM tasks``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    event,
    text,
)

metadata = MetaData()

#: SQLite's INTEGER is 64 bits; PostgreSQL's is 32, so there the columns are BIGINT (as the
#: migrations make them) and values are bound as such: an id or a priority past 2**31 works
#: the same on both.
Int = Integer().with_variant(BigInteger(), "postgresql")

TASK_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
STEP_STATUSES = ("running", "succeeded", "failed", "skipped")
ATTEMPT_STATUSES = ("running", "succeeded", "failed", "cancelled", "lost", "handed_back")


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    words = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({words})", name=f"ck_{column}_word")


schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Int, primary_key=True),
    Column("applied_at", Text, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    # INTEGER PRIMARY KEY AUTOINCREMENT: ids are never reused, even after old tasks are deleted.
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("template", Text, nullable=False),
    Column("template_version", Int, nullable=False),
    Column("status", Text, nullable=False),
    Column("params", Text, nullable=False),  # JSON
    Column("model", Text),
    Column("result", Text),  # JSON
    Column("error", Text),  # JSON: {"type", "message", "step"}
    Column("priority", Int, nullable=False, server_default=text("0")),
    # Attempts started (every claim adds one; also the fencing token). Those handed back on
    # shutdown do not count against max_attempts.
    Column("attempts", Int, nullable=False, server_default=text("0")),
    Column("handed_back", Int, nullable=False, server_default=text("0")),
    Column("max_attempts", Int, nullable=False, server_default=text("3")),
    Column("timeout_seconds", Float),  # the whole attempt; NULL: no limit
    Column("run_at", Text, nullable=False),  # not claimed before this time
    Column("cancel_requested", Int, nullable=False, server_default=text("0")),
    Column("idempotency_key", Text),
    # Whose the key is: the API key's id; '' for anonymous requests (and keys stored before
    # keys were scoped). The key is unique within its scope.
    Column("idempotency_scope", Text, nullable=False, server_default=text("''")),
    Column("request_hash", Text),  # what the key was first used with
    Column("lease_owner", Text),
    Column("lease_expires_at", Text),
    Column("created_at", Text, nullable=False),
    Column("started_at", Text),
    Column("finished_at", Text),
    # The task's say on the cache of model answers: 1 use it, 0 bypass it, NULL: the steps'.
    Column("cache", Int),
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
# The dashboard's filters: by model (newest first), and by creation time.
Index("ix_tasks_model_id", tasks.c.model, tasks.c.id)
Index("ix_tasks_created", tasks.c.created_at)
# The dashboard's recent failures, latest to fail first (migration 20).
Index("ix_tasks_failed", tasks.c.finished_at, sqlite_where=tasks.c.status == "failed")
Index("ux_tasks_idempotency", tasks.c.idempotency_scope, tasks.c.idempotency_key, unique=True)
# Retention deletes the oldest finished tasks first; the dashboard counts succeeded and failed
# tasks per minute from this index alone (the status is in it).
Index(
    "ix_tasks_finished_status",
    tasks.c.finished_at,
    tasks.c.status,
    sqlite_where=tasks.c.finished_at.is_not(None),
)

task_attempts = Table(
    "task_attempts",
    metadata,
    Column("task_id", Int, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("number", Int, nullable=False),
    Column("worker", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("started_at", Text, nullable=False),
    Column("finished_at", Text),
    Column("error", Text),  # JSON
    PrimaryKeyConstraint("task_id", "number"),
    _one_of("status", ATTEMPT_STATUSES),
)

# Templates registered through the API; every version is kept (tasks name the one they ran).
templates = Table(
    "templates",
    metadata,
    Column("name", Text, nullable=False),
    Column("version", Int, nullable=False),
    Column("body", Text, nullable=False),  # the YAML as registered
    Column("body_hash", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("deleted_at", Text),  # deleted: no new tasks; existing tasks still run
    PrimaryKeyConstraint("name", "version"),
)

# The file templates (built-in or from a folder) that tasks were queued with, one row per body
# of each version, so a queued task finds its version after the file changed and a restart.
file_template_versions = Table(
    "file_template_versions",
    metadata,
    Column("name", Text, nullable=False),
    Column("version", Int, nullable=False),
    Column("body_hash", Text, nullable=False),  # SHA-256 of the body
    Column("body", Text, nullable=False),  # the YAML as the file held it
    Column("origin", Text, nullable=False),  # builtin or file
    Column("stored_at", Text, nullable=False),
    PrimaryKeyConstraint("name", "version", "body_hash"),
)

# API keys: the SHA-256 of each key, never the key (see orchestra.auth).
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),  # the public part of the key: orc_<id>_...
    Column("name", Text, nullable=False, unique=True),
    Column("scope", Text, nullable=False),
    Column("digest", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("revoked_at", Text),
    _one_of("scope", ("read", "submit", "admin")),
)

# What happened to each task, in order: transitions and step events. The SSE endpoint replays
# them and then follows new ones; `seq` numbers a task's events from 1 (the SSE event id).
# `id` orders every task's events together (the all-tasks feed's event id, migration 10).
task_events = Table(
    "task_events",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("task_id", Int, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Int, nullable=False),
    Column("time", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("data", Text, nullable=False),  # JSON
    UniqueConstraint("task_id", "seq", name="uq_task_events_seq"),
    sqlite_autoincrement=True,
)

task_steps = Table(
    "task_steps",
    metadata,
    Column("task_id", Int, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Int, nullable=False),
    Column("step_id", Text, nullable=False),
    Column("position", Int, nullable=False),
    Column("status", Text, nullable=False),
    Column("output", Text),  # JSON
    Column("error", Text),  # JSON
    Column("model", Text),
    Column("prompt_tokens", Int),
    Column("completion_tokens", Int),
    Column("usage", Text),  # JSON: every figure the model server reported
    Column("started_at", Text),
    Column("finished_at", Text),
    Column("duration_ms", Float),
    Column("prompt", Text),  # JSON: the messages sent to the model, as rendered
    Column("fallbacks", Text),  # JSON: the chain's entries passed over, each with why
    PrimaryKeyConstraint("task_id", "attempt", "step_id"),
    _one_of("status", STEP_STATUSES),
)

# How many tasks are in each status: one row per status word, kept exact by the triggers below
# in the same transaction as each change, so counts never walk the tasks.
task_counts = Table(
    "task_counts",
    metadata,
    Column("status", Text, primary_key=True),
    Column("n", Int, nullable=False),
    _one_of("status", TASK_STATUSES),
)

# PostgreSQL's trigger appends each change of a count here, and the workers fold them into
# task_counts every few seconds (migration 9, db.counts); a count is its counter plus its
# changes. Empty on SQLite, whose triggers update the counters themselves.
task_count_changes = Table(
    "task_count_changes",
    metadata,
    Column("status", Text, nullable=False),
    Column("delta", Int, nullable=False),
)


# A database created from this description (metadata.create_all, in tests) gets the counters'
# rows and the triggers too.
@event.listens_for(metadata, "after_create")
def _create_counters(_target: MetaData, connection: Connection, **_kw: Any) -> None:
    words = ", ".join(f"('{status}', 0)" for status in TASK_STATUSES)
    connection.exec_driver_sql(f"INSERT INTO task_counts (status, n) VALUES {words}")
    # SQLite's triggers as the migrations wrote them (their SQL is the one definition): the
    # counters' (migration 5; a status UPDATE that leaves the status as it was changes no
    # counter) and the webhook outbox (migration 15).
    from orchestra.db.migrations import COUNT_TRIGGERS, OUTBOX_TRIGGER

    for trigger in (*COUNT_TRIGGERS, OUTBOX_TRIGGER):
        connection.exec_driver_sql(trigger)


# Dashboard sessions: the SHA-256 of each session's token (never the token), the API key it
# stands for, and when it ends (see orchestra.db.sessions).
ui_sessions = Table(
    "ui_sessions",
    metadata,
    Column("digest", Text, primary_key=True),
    Column("key_id", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("expires_at", Text, nullable=False),
)


# Schedules (migration 11): `cron` (5 fields, in `timezone`) or `every_seconds`; `next_fire_at`
# is when the next tick is due (NULL while disabled). `params` and `options` are JSON.
schedules = Table(
    "schedules",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False, unique=True),
    Column("template", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("model", Text),
    Column("priority", Int, nullable=False, server_default=text("0")),
    Column("options", Text, nullable=False),
    Column("cron", Text),
    Column("timezone", Text, nullable=False),
    Column("every_seconds", Float),
    Column("enabled", Int, nullable=False, server_default=text("1")),
    #: A settings schedule's ``enabled`` as its file last declared it (NULL: through the API).
    Column("declared_enabled", Int),
    Column("overlap", Text, nullable=False),
    Column("catch_up", Text, nullable=False),
    Column("next_fire_at", Text),
    Column("source", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    _one_of("overlap", ("skip", "allow")),
    _one_of("catch_up", ("none", "latest")),
    _one_of("source", ("api", "config")),
    Index("ix_schedules_due", "next_fire_at"),
    sqlite_autoincrement=True,
)

# One row per (schedule, fire time), inserted with the task it made: the primary key is what
# makes a tick fire once, however many processes see it due.
schedule_fires = Table(
    "schedule_fires",
    metadata,
    Column("schedule_id", Int, ForeignKey("schedules.id", ondelete="CASCADE"), nullable=False),
    Column("fire_at", Text, nullable=False),
    Column("task_id", Int, ForeignKey("tasks.id", ondelete="SET NULL")),
    Column("outcome", Text, nullable=False),
    # Why a tick made no task: its template or parameters no longer fit (outcome 'failed').
    Column("error", Text),
    Column("time", Text, nullable=False),
    PrimaryKeyConstraint("schedule_id", "fire_at"),
    _one_of("outcome", ("submitted", "skipped", "failed", "missed")),
    # A deleted task sets its tick's task_id to NULL (found by index), and retention drops
    # ticks by age.
    Index("ix_schedule_fires_task", "task_id"),
    Index("ix_schedule_fires_time", "time"),
)

# Webhook subscriptions (migration 12): `event_types` is a JSON list of event words; a row with
# `task_id` is one task's callback_url.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False),
    Column("event_types", Text, nullable=False),
    Column("template", Text),
    Column("task_id", Int, ForeignKey("tasks.id", ondelete="CASCADE")),
    Column("secret", Text, nullable=False),
    Column("enabled", Int, nullable=False, server_default=text("1")),
    Column("created_at", Text, nullable=False),
    # Migration 16: the secret before the last rollover, still signing until then.
    Column("previous_secret", Text),
    Column("previous_secret_until", Text),
    Index("ix_webhooks_task", "task_id"),  # a deleted task takes its callback with it
    sqlite_autoincrement=True,
)

# The outbox: one row per (subscription, event), written in the event's transaction.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("webhook_id", Int, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("task_id", Int),
    Column("event_seq", Int),
    Column("type", Text, nullable=False),
    Column("payload", Text, nullable=False),  # JSON: the body sent
    Column("status", Text, nullable=False),
    Column("attempts", Int, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Text, nullable=False),
    Column("lease_owner", Text),
    Column("lease_expires_at", Text),
    Column("created_at", Text, nullable=False),
    Column("finished_at", Text),
    # Migration 16: where a redelivery's retry window starts (NULL: at created_at).
    Column("retry_from", Text),
    _one_of("status", ("pending", "delivered", "failed")),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_webhook", "webhook_id", "id"),
    sqlite_autoincrement=True,
)

# Every attempt at a delivery: the answer's status and the first 1 KB of its body, or the error.
webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column(
        "delivery_id",
        Int,
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempt", Int, nullable=False),
    Column("time", Text, nullable=False),
    Column("status_code", Int),
    Column("latency_ms", Float),
    Column("response", Text),
    Column("error", Text),
    PrimaryKeyConstraint("delivery_id", "attempt"),
)

# Server-wide webhook secrets by name ("callback": what signs tasks' callback_url deliveries),
# made once by the first process that needs one.
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("name", Text, primary_key=True),
    Column("secret", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)

# A batch over a dataset (migration 14): what every row shares (template, model, priority,
# options), and how its upload went. ``priority`` is the one asked for; its rows' tasks are
# queued below every single task (:mod:`orchestra.db.batches`).
batches = Table(
    "batches",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    Column("template", Text, nullable=False),
    Column("template_version", Int, nullable=False),
    Column("model", Text),
    Column("priority", Int, nullable=False, server_default=text("0")),
    Column("options", Text, nullable=False),  # JSON: max_attempts, timeout
    Column("atomic", Int, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False),
    Column("row_count", Int, nullable=False, server_default=text("0")),
    Column("invalid_count", Int, nullable=False, server_default=text("0")),
    Column("idempotency_key", Text),
    Column("idempotency_scope", Text, nullable=False, server_default=text("''")),
    Column("request_hash", Text),
    Column("created_at", Text, nullable=False),
    Column("loaded_at", Text),
    Column("cancelled_at", Text),
    # Its tally (JSON: db.batches.Tally) once every row has finished, so that reads of a
    # finished batch do not count its rows again (migration 18); cleared, and ``revision``
    # bumped, when rows are queued again (a retry) or added.
    Column("tally", Text),
    Column("revision", Int, nullable=False, server_default=text("0")),
    # While ``loading``: when its upload is given up for lost unless the request reading it
    # renews this first (every lease_seconds / 3); any process's reaper then closes it, as
    # that request would have (migration 19). NULL once loaded.
    Column("upload_expires_at", Text),
    # Which process reads it (orchestra.owners.process_id): one started on the same machine
    # after it died closes the batch at once.
    Column("upload_owner", Text),
    _one_of("status", ("loading", "loaded")),
    Index("ux_batches_idempotency", "idempotency_scope", "idempotency_key", unique=True),
    sqlite_autoincrement=True,
)
# Uploads to reap: only loading rows.
Index("ix_batches_uploads", batches.c.upload_expires_at, sqlite_where=batches.c.status == "loading")

# One row of a batch: its task, or (task_id NULL, error set) why the row was refused. The key
# (batch_id, row_no) makes a row's task unique and orders the results by input row.
batch_rows = Table(
    "batch_rows",
    metadata,
    Column("batch_id", Int, ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("row_no", Int, nullable=False),
    Column("line_no", Int, nullable=False),
    Column("task_id", Int, ForeignKey("tasks.id", ondelete="SET NULL")),
    Column("error", Text),  # JSON: {"message", "fields": [{"field", "message"}]}
    PrimaryKeyConstraint("batch_id", "row_no"),
    Index("ix_batch_rows_task", "task_id"),
)

# The cache of model answers (orchestra.db.cache): a call's key (SHA-256 of the provider,
# model and its digest, messages, options and format) and the answer, as JSON.
model_cache = Table(
    "model_cache",
    metadata,
    Column("key", Text, primary_key=True),
    Column("provider", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("answer", Text, nullable=False),  # JSON: text, model, provider, usage
    Column("created_at", Text, nullable=False),
    Index("ix_model_cache_created", "created_at"),
)
