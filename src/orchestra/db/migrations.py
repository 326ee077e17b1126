"""Every migration of the schema, in order: explicit SQL for each version (a PostgreSQL twin
where SQLite's words cannot say it), which :mod:`~orchestra.db.schema` applies.

Add new ones at the end of :data:`MIGRATIONS`; never edit one that has shipped. The SQL is
written for SQLite; :func:`~orchestra.db.portable.portable_ddl` gives PostgreSQL its own words
for the types that differ.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection

from orchestra.db.portable import portable_ddl

Migration = Callable[[Connection], None]

_V1 = """
CREATE TABLE tasks (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    template TEXT NOT NULL,
    template_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    model TEXT,
    result TEXT,
    error TEXT,
    priority INTEGER DEFAULT 0 NOT NULL,
    attempts INTEGER DEFAULT 0 NOT NULL,
    handed_back INTEGER DEFAULT 0 NOT NULL,
    max_attempts INTEGER DEFAULT 3 NOT NULL,
    timeout_seconds FLOAT,
    run_at TEXT NOT NULL,
    cancel_requested INTEGER DEFAULT 0 NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    lease_owner TEXT,
    lease_expires_at TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    CONSTRAINT ck_status_word CHECK (
        status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')
    )
);
CREATE INDEX ix_tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX ix_tasks_leases ON tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX ix_tasks_queue ON tasks (priority DESC, run_at, id) WHERE status = 'queued';
CREATE INDEX ix_tasks_status_id ON tasks (status, id);
CREATE INDEX ix_tasks_template_id ON tasks (template, id);
CREATE UNIQUE INDEX ux_tasks_idempotency_key ON tasks (idempotency_key);
CREATE TABLE task_attempts (
    task_id INTEGER NOT NULL,
    number INTEGER NOT NULL,
    worker TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    error TEXT,
    PRIMARY KEY (task_id, number),
    CONSTRAINT ck_status_word CHECK (
        status IN ('running', 'succeeded', 'failed', 'cancelled', 'lost', 'handed_back')
    ),
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
CREATE TABLE task_steps (
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    step_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    usage TEXT,
    started_at TEXT,
    finished_at TEXT,
    duration_ms FLOAT,
    PRIMARY KEY (task_id, attempt, step_id),
    CONSTRAINT ck_status_word CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
"""


_V2 = """
CREATE TABLE templates (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    deleted_at TEXT,
    PRIMARY KEY (name, version)
);
"""


_V3 = """
CREATE TABLE task_events (
    task_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (task_id, seq),
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
"""

_V4 = """
CREATE TABLE api_keys (
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    PRIMARY KEY (id),
    UNIQUE (name),
    CONSTRAINT ck_scope_word CHECK (scope IN ('read', 'submit', 'admin'))
);
"""


# Counts by status without counting: one row per status word, kept exact by triggers inside
# the transaction of each change, so the dashboard reads five rows where counting would walk
# an index of a million entries. The counters start from the rows already there. (On
# PostgreSQL, a future issue, a single counter row per status is a hot spot: every claim and
# finish in every worker would wait for the same row lock; there, shard each counter or count
# from the index.) The finished index also carries the status, so the per-minute chart of
# succeeded and failed tasks is an index-only range scan; retention still walks it in
# finished_at order. The dashboard filters by model and by creation time: without an index,
# a model no task has, or a time range holding few tasks, reads the whole table (0.3 s at a
# million rows; benchmarks/dashboard_data.py). Triggers contain ";", so these statements are
# listed one by one.
#: Migration 5's triggers, which keep ``task_counts`` exact (tables.py's description creates
#: them from here too).
COUNT_TRIGGERS = (
    """
CREATE TRIGGER tr_task_counts_insert AFTER INSERT ON tasks
BEGIN
    UPDATE task_counts SET n = n + 1 WHERE status = NEW.status;
END""",
    """
CREATE TRIGGER tr_task_counts_status AFTER UPDATE OF status ON tasks
WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE task_counts SET n = n + 1 WHERE status = NEW.status;
END""",
    """
CREATE TRIGGER tr_task_counts_delete AFTER DELETE ON tasks
BEGIN
    UPDATE task_counts SET n = n - 1 WHERE status = OLD.status;
END""",
)
_V5 = (
    """
CREATE TABLE task_counts (
    status TEXT NOT NULL PRIMARY KEY,
    n INTEGER NOT NULL,
    CONSTRAINT ck_status_word CHECK (
        status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')
    )
)""",
    """
INSERT INTO task_counts (status, n)
SELECT word, (SELECT count(*) FROM tasks WHERE tasks.status = word)
FROM (
    SELECT 'queued' AS word UNION ALL SELECT 'running' UNION ALL SELECT 'succeeded'
    UNION ALL SELECT 'failed' UNION ALL SELECT 'cancelled'
)""",
    *COUNT_TRIGGERS,
    "DROP INDEX ix_tasks_finished",
    """
CREATE INDEX ix_tasks_finished_status ON tasks (finished_at, status)
WHERE finished_at IS NOT NULL""",
    "CREATE INDEX ix_tasks_model_id ON tasks (model, id)",
    "CREATE INDEX ix_tasks_created ON tasks (created_at)",
)


# The dashboard shows each llm step's prompt as rendered, and keeps its login sessions where
# every process sharing the database finds them.
_V6 = """
ALTER TABLE task_steps ADD COLUMN prompt TEXT;
CREATE TABLE ui_sessions (
    digest TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (digest)
);
"""


# Idempotency keys belong to the API key that used them, as Stripe scopes them to an account:
# two keys may use the same idempotency key, and a 409 never names another key's task. The
# scope is the API key's id; '' is the anonymous scope, which also holds every key used
# before this migration (their owner was not recorded).
_V7 = """
ALTER TABLE tasks ADD COLUMN idempotency_scope TEXT DEFAULT '' NOT NULL;
DROP INDEX ux_tasks_idempotency_key;
CREATE UNIQUE INDEX ux_tasks_idempotency ON tasks (idempotency_scope, idempotency_key);
"""


# The file template versions that tasks were queued with: a queued task still runs the version
# it pinned after its file changed and the service restarted. A file may change without its
# ``version`` changing, so each (name, version) may hold several bodies, told apart by hash.
_V8 = """
CREATE TABLE file_template_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    body_hash TEXT NOT NULL,
    body TEXT NOT NULL,
    origin TEXT NOT NULL,
    stored_at TEXT NOT NULL,
    PRIMARY KEY (name, version, body_hash)
);
"""


# Migration 10: every event gets an id that orders all tasks' events (the all-tasks feed,
# GET /api/v1/events, resumes from it with Last-Event-ID). The table is rebuilt: SQLite cannot
# add a key column to a table, and both engines run the same statements.
_V10 = """
CREATE TABLE task_events_v10 (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    CONSTRAINT uq_task_events_seq UNIQUE (task_id, seq),
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
INSERT INTO task_events_v10 (task_id, seq, time, type, data)
    SELECT task_id, seq, time, type, data FROM task_events ORDER BY time, task_id, seq;
DROP TABLE task_events;
ALTER TABLE task_events_v10 RENAME TO task_events;
"""

# A schedule's ticks (migration 11), made again by migration 16 with one outcome more.
_FIRES = """CREATE TABLE {table} (
    schedule_id INTEGER NOT NULL,
    fire_at TEXT NOT NULL,
    task_id INTEGER,
    outcome TEXT NOT NULL,
    error TEXT,
    time TEXT NOT NULL,
    PRIMARY KEY (schedule_id, fire_at),
    FOREIGN KEY(schedule_id) REFERENCES schedules (id) ON DELETE CASCADE,
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE SET NULL,
    CONSTRAINT ck_outcome_word CHECK (outcome IN ({outcomes}))
)"""

# Migration 11: schedules, and one row per (schedule, fire time) — the unique key that makes
# each tick create exactly one task, however many processes see it due.
_V11 = """
CREATE TABLE schedules (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    template TEXT NOT NULL,
    params TEXT NOT NULL,
    model TEXT,
    priority INTEGER DEFAULT 0 NOT NULL,
    options TEXT NOT NULL,
    cron TEXT,
    timezone TEXT NOT NULL,
    every_seconds FLOAT,
    enabled INTEGER DEFAULT 1 NOT NULL,
    overlap TEXT NOT NULL,
    catch_up TEXT NOT NULL,
    next_fire_at TEXT,
    source TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    CONSTRAINT ck_overlap_word CHECK (overlap IN ('skip', 'allow')),
    CONSTRAINT ck_catch_up_word CHECK (catch_up IN ('none', 'latest')),
    CONSTRAINT ck_source_word CHECK (source IN ('api', 'config'))
);
CREATE INDEX ix_schedules_due ON schedules (next_fire_at);
""" + _FIRES.format(table="schedule_fires", outcomes="'submitted', 'skipped', 'failed'")
_V11 += """;
CREATE INDEX ix_schedule_fires_task ON schedule_fires (task_id);
CREATE INDEX ix_schedule_fires_time ON schedule_fires (time);
"""

# Migration 12: webhook subscriptions, and their outbox — a delivery row is written in the
# transaction of the event it reports, and a sender works through them (with every attempt).
_V12 = """
CREATE TABLE webhooks (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    event_types TEXT NOT NULL,
    template TEXT,
    task_id INTEGER,
    secret TEXT NOT NULL,
    enabled INTEGER DEFAULT 1 NOT NULL,
    created_at TEXT NOT NULL,
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
CREATE TABLE webhook_deliveries (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    webhook_id INTEGER NOT NULL,
    task_id INTEGER,
    event_seq INTEGER,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER DEFAULT 0 NOT NULL,
    next_attempt_at TEXT NOT NULL,
    lease_owner TEXT,
    lease_expires_at TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    FOREIGN KEY(webhook_id) REFERENCES webhooks (id) ON DELETE CASCADE,
    CONSTRAINT ck_status_word CHECK (status IN ('pending', 'delivered', 'failed'))
);
CREATE INDEX ix_webhooks_task ON webhooks (task_id);
CREATE INDEX ix_webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX ix_webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
CREATE TABLE webhook_attempts (
    delivery_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    time TEXT NOT NULL,
    status_code INTEGER,
    latency_ms FLOAT,
    response TEXT,
    error TEXT,
    PRIMARY KEY (delivery_id, attempt),
    FOREIGN KEY(delivery_id) REFERENCES webhook_deliveries (id) ON DELETE CASCADE
);
CREATE TABLE webhook_secrets (
    name TEXT NOT NULL PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""

# Migration 13: the cache of model answers (docs/cache.md), one row per call's key (a SHA-256),
# the oldest found by created_at (expiry and the size cap); and a task's own say on it.
_V13 = """
CREATE TABLE model_cache (
    key TEXT NOT NULL PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX ix_model_cache_created ON model_cache (created_at);
ALTER TABLE tasks ADD COLUMN cache INTEGER;
"""

# Migration 5 on PostgreSQL: one trigger function keeps the counters; the subquery of the
# first count needs a name there.
_V5_POSTGRESQL = (
    _V5[0],
    """
INSERT INTO task_counts (status, n)
SELECT word, (SELECT count(*) FROM tasks WHERE tasks.status = word)
FROM (VALUES ('queued'), ('running'), ('succeeded'), ('failed'), ('cancelled')) AS words (word)
""",
    """
CREATE FUNCTION orchestra_task_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE task_counts SET n = n + 1 WHERE status = NEW.status;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE task_counts SET n = n - 1 WHERE status = OLD.status;
    ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
        UPDATE task_counts SET n = n - 1 WHERE status = OLD.status;
        UPDATE task_counts SET n = n + 1 WHERE status = NEW.status;
    END IF;
    RETURN NULL;
END
$$""",
    """
CREATE TRIGGER tr_task_counts AFTER INSERT OR DELETE OR UPDATE OF status ON tasks
FOR EACH ROW EXECUTE FUNCTION orchestra_task_counts()""",
    *_V5[5:],
)

# Migration 14: batches over a dataset. Each valid row of a batch becomes a task; batch_rows
# maps (batch, row) to its task (the key: a row resubmitted queues nothing new) or holds the
# row's validation error, and its key orders the results by input row. A task deleted by
# retention leaves its row without a task.
_V14 = """
CREATE TABLE batches (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    template TEXT NOT NULL,
    template_version INTEGER NOT NULL,
    model TEXT,
    priority INTEGER DEFAULT 0 NOT NULL,
    options TEXT NOT NULL,
    atomic INTEGER DEFAULT 0 NOT NULL,
    status TEXT NOT NULL,
    row_count INTEGER DEFAULT 0 NOT NULL,
    invalid_count INTEGER DEFAULT 0 NOT NULL,
    idempotency_key TEXT,
    idempotency_scope TEXT DEFAULT '' NOT NULL,
    request_hash TEXT,
    created_at TEXT NOT NULL,
    loaded_at TEXT,
    cancelled_at TEXT,
    CONSTRAINT ck_status_word CHECK (status IN ('loading', 'loaded'))
);
CREATE UNIQUE INDEX ux_batches_idempotency ON batches (idempotency_scope, idempotency_key);
CREATE TABLE batch_rows (
    batch_id INTEGER NOT NULL,
    row_no INTEGER NOT NULL,
    line_no INTEGER NOT NULL,
    task_id INTEGER,
    error TEXT,
    PRIMARY KEY (batch_id, row_no),
    FOREIGN KEY(batch_id) REFERENCES batches (id) ON DELETE CASCADE,
    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE SET NULL
);
CREATE INDEX ix_batch_rows_task ON batch_rows (task_id);
"""

# Migration 15: SQLite writes the outbox (migration 12) with a trigger: a delivery row for each
# enabled subscription an event matches, in the statement that inserts the event. Run from
# Python, that INSERT … SELECT was a second statement for every event (five a task), each with
# its own call, bindings and cursors, whether any subscription exists or not: about a tenth of
# the store's CPU per task. PostgreSQL keeps writing both in one statement (a data-modifying
# CTE, orchestra.db.webhooks), which costs no second round trip, and gets nothing here. The
# tables' description (tables.py, for tests) creates the trigger from this same text.
OUTBOX_TRIGGER = """
CREATE TRIGGER tr_task_events_outbox AFTER INSERT ON task_events
BEGIN
    INSERT INTO webhook_deliveries (
        webhook_id, task_id, event_seq, type, payload, status, attempts, next_attempt_at,
        created_at
    )
    SELECT webhooks.id, tasks.id, NEW.seq, NEW.type,
        json_object(
            'type', NEW.type, 'timestamp', NEW.time,
            'data', json_object(
                'task_id', tasks.id, 'template', tasks.template, 'status', tasks.status,
                'seq', NEW.seq, 'event', json(NEW.data)
            )
        ),
        'pending', 0, NEW.time, NEW.time
    FROM webhooks JOIN tasks ON tasks.id = NEW.task_id
    WHERE webhooks.enabled = 1
        AND (webhooks.task_id IS NULL OR webhooks.task_id = tasks.id)
        AND (webhooks.template IS NULL OR webhooks.template = tasks.template)
        AND webhooks.event_types LIKE '%"' || NEW.type || '"%';
END"""

# Migration 16: a subscription's secret can be rolled over; the one before keeps signing
# deliveries (beside the new one) until ``previous_secret_until``. A redelivery starts its
# retry window at ``retry_from`` (it overwrote ``created_at``, the event's time, before).
# A schedule's ticks missed while no process ran are recorded (``missed``): SQLite cannot
# change a CHECK, so its table is made again.
_V16 = (
    "ALTER TABLE webhooks ADD COLUMN previous_secret TEXT",
    "ALTER TABLE webhooks ADD COLUMN previous_secret_until TEXT",
    "ALTER TABLE webhook_deliveries ADD COLUMN retry_from TEXT",
    _FIRES.format(table="schedule_fires_16", outcomes="'submitted', 'skipped', 'failed', 'missed'"),
    "INSERT INTO schedule_fires_16 SELECT schedule_id, fire_at, task_id, outcome, error, time "
    "FROM schedule_fires",
    "DROP TABLE schedule_fires",
    "ALTER TABLE schedule_fires_16 RENAME TO schedule_fires",
    "CREATE INDEX ix_schedule_fires_task ON schedule_fires (task_id)",
    "CREATE INDEX ix_schedule_fires_time ON schedule_fires (time)",
)
_V16_POSTGRESQL = (
    *_V16[:3],
    "ALTER TABLE schedule_fires DROP CONSTRAINT ck_outcome_word",
    "ALTER TABLE schedule_fires ADD CONSTRAINT ck_outcome_word "
    "CHECK (outcome IN ('submitted', 'skipped', 'failed', 'missed'))",
)

# PostgreSQL: every submit, claim and end changed one of five counter rows, so concurrent
# transactions (every process's) queued for the same row lock until each other's commit
# (pg_stat_activity: a third of the connections' time in Lock:transactionid at 64 tasks in
# flight). There, the trigger appends each change to a log instead (no row is shared), readers
# add the log to the counters, and the workers fold the log into the counters every few
# seconds (db.counts). SQLite writes one transaction at a time: its triggers keep updating the
# counters, and its log stays empty.
_V9 = """
CREATE TABLE task_count_changes (
    status TEXT NOT NULL,
    delta INTEGER NOT NULL
)"""
_V9_POSTGRESQL = (
    _V9,
    """
CREATE OR REPLACE FUNCTION orchestra_task_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_count_changes (status, delta) VALUES (NEW.status, 1);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_count_changes (status, delta) VALUES (OLD.status, -1);
    ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
        INSERT INTO task_count_changes (status, delta) VALUES (OLD.status, -1), (NEW.status, 1);
    END IF;
    RETURN NULL;
END
$$""",
)

# Each step records the fallback chain's entries its model calls passed over, and why.
_V17 = "ALTER TABLE task_steps ADD COLUMN fallbacks TEXT"

# A batch's tally kept once its every row has finished (db.batches: lists of batches no
# longer count every row of those done), and a revision that each retry of its rows bumps.
_V18 = (
    "ALTER TABLE batches ADD COLUMN tally TEXT",
    "ALTER TABLE batches ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
)

# A keyless batch's upload holds a lease while it runs (db.batches), and names its process: a
# process that dies mid-upload leaves a batch that any reaper closes once it lapses, or a
# process started on the same machine at once (orchestra.owners). Keyless batches left loading
# before this have no upload that renews it: theirs has lapsed already.
_V19 = (
    "ALTER TABLE batches ADD COLUMN upload_expires_at TEXT",
    "ALTER TABLE batches ADD COLUMN upload_owner TEXT",
    "UPDATE batches SET upload_expires_at = created_at "
    "WHERE status = 'loading' AND idempotency_key IS NULL",
    "CREATE INDEX ix_batches_uploads ON batches (upload_expires_at) WHERE status = 'loading'",
)

# The dashboard's recent failures are the latest to fail (by finished_at), found by a seek
# however rare failures are: only failed tasks are in the index, so no other write pays for it.
_V20 = "CREATE INDEX ix_tasks_failed ON tasks (finished_at) WHERE status = 'failed'"


# A settings schedule's enabled as its file declared it: a pause through the API then lasts
# until the file's enabled changes, whichever process or host starts (every start ended it,
# and a supervisor's restart of one crashed process too). NULL for the rows before: their
# next start applies the file's enabled once, as every start did.
_V21 = "ALTER TABLE schedules ADD COLUMN declared_enabled INTEGER"


def _statements(*statements: str, postgresql: tuple[str, ...] | None = None) -> Migration:
    def apply(conn: Connection) -> None:
        dialect = conn.dialect.name
        chosen = postgresql if postgresql is not None and dialect == "postgresql" else statements
        for statement in chosen:
            conn.exec_driver_sql(portable_ddl(statement.strip(), dialect))

    return apply


def _sql(script: str) -> Migration:
    return _statements(*(part for part in script.split(";") if part.strip()))


MIGRATIONS: list[Migration] = [
    _sql(_V1),
    _sql(_V2),
    _sql(_V3),
    _sql(_V4),
    _statements(*_V5, postgresql=_V5_POSTGRESQL),
    _sql(_V6),
    _sql(_V7),
    _sql(_V8),
    _statements(_V9, postgresql=_V9_POSTGRESQL),
    _sql(_V10),
    _sql(_V11),
    _sql(_V12),
    _sql(_V13),
    _sql(_V14),
    _statements(OUTBOX_TRIGGER, postgresql=()),
    _statements(*_V16, postgresql=_V16_POSTGRESQL),
    _statements(_V17),
    _statements(*_V18),
    _statements(*_V19),
    _statements(_V20),
    _statements(_V21),
]
LATEST = len(MIGRATIONS)
