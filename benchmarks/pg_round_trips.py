"""What a transaction's shape costs on PostgreSQL: round trips, the client's CPU and the
server's (issue 18).

    python benchmarks/pg_round_trips.py [--n 3000] [--rounds 3]

One psycopg connection on a throwaway server (tests/fixtures/postgres.py) runs the same
small write — a row, an event row for it, a notification — in five shapes, taking turns in
blocks of 100 transactions:

- ``statements``: BEGIN, two INSERTs, ``SELECT pg_notify($1, $2)``, COMMIT (five round trips:
  Orchestra's transactions before 2026-12-04);
- ``notify+commit``: the same, with ``NOTIFY …; COMMIT`` sent as one simple query (four:
  :func:`orchestra.db.notices.send_and_commit`);
- ``deferred``: as ``notify+commit``, with the second INSERT (whose result nobody reads)
  bound on the client (psycopg's ``ClientCursor.mogrify``) and sent with the NOTIFY and the
  COMMIT (three round trips);
- ``pipelined begin``: as ``notify+commit``, with an explicit BEGIN and the first INSERT sent
  together in psycopg's pipeline mode, on an autocommit connection (three round trips);
- ``one statement``: the INSERTs and the notification as one statement with data-modifying
  CTEs, on an autocommit connection (one round trip).

For each: the median time per transaction, and the CPU per transaction of this process (the
client) and of the server's backend (``/proc/PID/schedstat``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from tests.fixtures.postgres import running_postgres  # noqa: E402

from orchestra.db.postgres_engine import conninfo  # noqa: E402

#: Transactions of one shape in a row before the next shape's turn.
BLOCK = 100


def _run_seconds(pid: int) -> float:
    """The time ``pid`` has run on a CPU, in seconds (``/proc/PID/schedstat``: nanoseconds,
    where ``/proc/PID/stat`` counts 10 ms ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _shapes(
    conn: psycopg.Connection[tuple[object, ...]], auto: psycopg.Connection[tuple[object, ...]]
) -> dict[str, Callable[[], None]]:
    def statements() -> None:
        row = conn.execute("INSERT INTO t (v) VALUES (%s) RETURNING id", ["x"]).fetchone()
        assert row is not None
        conn.execute("INSERT INTO e (t, d) VALUES (%s, %s)", [row[0], "queued"])
        conn.execute("SELECT pg_notify(%s, %s)", ["orchestra_changes", f"abcdef123456 {row[0]}"])
        conn.commit()

    def notify_commit() -> None:
        row = conn.execute("INSERT INTO t (v) VALUES (%s) RETURNING id", ["x"]).fetchone()
        assert row is not None
        conn.execute("INSERT INTO e (t, d) VALUES (%s, %s)", [row[0], "queued"])
        conn.execute(f"NOTIFY orchestra_changes, 'abcdef123456 {row[0]}'; COMMIT", prepare=False)
        conn.commit()  # finds no transaction open: sends nothing

    client = psycopg.ClientCursor(conn)

    def deferred() -> None:
        row = conn.execute("INSERT INTO t (v) VALUES (%s) RETURNING id", ["x"]).fetchone()
        assert row is not None
        later = client.mogrify("INSERT INTO e (t, d) VALUES (%s, %s)", [row[0], "queued"])
        conn.execute(
            f"{later}; NOTIFY orchestra_changes, 'abcdef123456 {row[0]}'; COMMIT",
            prepare=False,
        )
        conn.commit()  # finds no transaction open: sends nothing

    def pipelined_begin() -> None:
        # An explicit BEGIN on an autocommit connection: psycopg's own (implicit) BEGIN waits
        # for its answer before anything else is sent, even in a pipeline.
        with auto.pipeline():
            auto.execute("BEGIN")
            cursor = auto.execute("INSERT INTO t (v) VALUES (%s) RETURNING id", ["x"])
        row = cursor.fetchone()
        assert row is not None
        auto.execute("INSERT INTO e (t, d) VALUES (%s, %s)", [row[0], "queued"])
        auto.execute(f"NOTIFY orchestra_changes, 'abcdef123456 {row[0]}'; COMMIT", prepare=False)

    def one_statement() -> None:
        auto.execute(
            "WITH n AS (INSERT INTO t (v) VALUES (%s) RETURNING id), "
            "ev AS (INSERT INTO e (t, d) SELECT id, %s FROM n), "
            "told AS (SELECT pg_notify(%s, 'abcdef123456 ' || id) FROM n) "
            "SELECT n.id FROM n, told",
            ["x", "queued", "orchestra_changes"],
        ).fetchall()

    return {
        "statements": statements,
        "notify+commit": notify_commit,
        "deferred": deferred,
        "pipelined begin": pipelined_begin,
        "one statement": one_statement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="transactions per shape and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with running_postgres() as pg, pg.database() as url:
        conn = psycopg.connect(conninfo(url))
        auto = psycopg.connect(conninfo(url), autocommit=True)
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE e (id serial PRIMARY KEY, t int, d text)")
        conn.commit()
        backends: dict[int, int] = {}
        for c in (conn, auto):
            pid = c.execute("SELECT pg_backend_pid()").fetchone()
            assert pid is not None
            backends[id(c)] = int(pid[0])
            c.commit()
        shapes = _shapes(conn, auto)
        for run in shapes.values():
            for _ in range(200):  # warm: psycopg prepares a statement on its 5th run
                run()
        print("| shape | round | p50 | client CPU | server CPU |")
        print("|---|---|---|---|---|")
        for round_ in range(1, args.rounds + 1):
            times: dict[str, list[float]] = {name: [] for name in shapes}
            client = dict.fromkeys(shapes, 0.0)
            server = dict.fromkeys(shapes, 0.0)
            # Blocks of BLOCK transactions, the shapes taking turns: the VM's speed drifts
            # within seconds, and every shape sees the same drift.
            for _ in range(args.n // BLOCK):
                for name, run in shapes.items():
                    on_auto = name in ("one statement", "pipelined begin")
                    backend = backends[id(auto if on_auto else conn)]
                    cpu, backend_cpu = time.process_time(), _run_seconds(backend)
                    for _ in range(BLOCK):
                        start = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - start)
                    client[name] += time.process_time() - cpu
                    server[name] += _run_seconds(backend) - backend_cpu
            for name in shapes:
                n = len(times[name])
                print(
                    f"| {name} | {round_} | {statistics.median(times[name]) * 1e6:.0f} µs | "
                    f"{client[name] / n * 1e6:.0f} µs | {server[name] / n * 1e6:.0f} µs |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
