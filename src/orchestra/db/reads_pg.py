"""PostgreSQL's one-statement reads: the same JSON documents :mod:`~orchestra.db.reads` has
SQLite build, said with ``json_build_object`` and ``json_agg``. The JSON columns go in as
``json`` (not ``jsonb``), which keeps their text: a number keeps every digit. A double
precision column goes in as PostgreSQL writes it, the shortest text that is the same float."""

from __future__ import annotations

TASK = """
SELECT json_build_object(
    'id', t.id, 'template', t.template, 'template_version', t.template_version,
    'status', t.status, 'params', t.params::json, 'model', t.model, 'priority', t.priority,
    'attempts', t.attempts, 'max_attempts', t.max_attempts, 'created_at', t.created_at,
    'run_at', t.run_at, 'handed_back', t.handed_back, 'timeout_seconds', t.timeout_seconds,
    'cancel_requested', t.cancel_requested <> 0,
    'idempotency_key', t.idempotency_key, 'result', t.result::json, 'error', t.error::json,
    'lease_owner', t.lease_owner, 'lease_expires_at', t.lease_expires_at,
    'started_at', t.started_at, 'finished_at', t.finished_at,
    'steps', coalesce((
        SELECT json_agg(json_build_object(
            'id', s.step_id, 'position', s.position, 'status', s.status,
            'output', s.output::json, 'error', s.error::json, 'model', s.model,
            'usage', s.usage::json, 'started_at', s.started_at, 'finished_at', s.finished_at,
            'duration_ms', s.duration_ms, 'prompt', s.prompt::json,
            'fallbacks', s.fallbacks::json) ORDER BY s.position)
        FROM task_steps AS s WHERE s.task_id = t.id AND s.attempt = t.attempts), '[]'),
    'history', coalesce((
        SELECT json_agg(json_build_object(
            'number', a.number, 'worker', a.worker, 'status', a.status,
            'started_at', a.started_at, 'finished_at', a.finished_at, 'error', a.error::json)
            ORDER BY a.number)
        FROM task_attempts AS a WHERE a.task_id = t.id), '[]')
)::text
FROM tasks AS t WHERE t.id = %s
"""

EVENTS = """
SELECT coalesce(json_agg(json_build_object(
    'seq', e.seq, 'time', e.time, 'type', e.type, 'data', e.data::json) ORDER BY e.seq), '[]')::text
FROM (SELECT seq, time, type, data FROM task_events
      WHERE task_id = %s AND seq > %s ORDER BY seq LIMIT %s) AS e
"""

#: What a summary reads of a task, on both engines: not its params nor its result, however
#: big.
SUMMARY_COLUMNS = (
    "id, template, template_version, status, model, created_at, started_at, finished_at, "
    "attempts, error, run_at"
)


def page_sql(status: bool, template: bool, before: bool) -> str:
    """A page of summaries, newest first, for the filters given (each written only when
    given, so the planner can use its index)."""
    where = [
        *(["status = %s"] if status else []),
        *(["template = %s"] if template else []),
        *(["id < %s"] if before else []),
    ]
    return f"""
SELECT coalesce(json_agg(json_build_object(
    'id', t.id, 'template', t.template, 'template_version', t.template_version,
    'status', t.status, 'model', t.model, 'created_at', t.created_at,
    'started_at', t.started_at, 'finished_at', t.finished_at, 'duration_ms', NULL,
    'attempts', t.attempts, 'error', t.error::json, 'run_at', t.run_at,
    'tokens', (SELECT coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)
               FROM task_steps WHERE task_id = t.id AND attempt = t.attempts))
    ORDER BY t.id DESC), '[]')::text
FROM (SELECT {SUMMARY_COLUMNS} FROM tasks {"WHERE " + " AND ".join(where) if where else ""}
      ORDER BY id DESC LIMIT %s) AS t
"""
