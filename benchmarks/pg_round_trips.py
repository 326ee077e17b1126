"""What a transaction's shape costs on PostgreSQL: round trips, the client's CPU and the
server's (issue 18).

    python benchmarks/pg_round_trips.py [--n 3000] [--rounds 3]

One psycopg connection on a throwaway server (tests/fixtures/postgres.py) runs the same
small write — a row, an event row for it, a notification — in four shapes, interleaved:

- ``statements``: BEGIN, two INSERTs, ``SELECT pg_notify($1, $2)``, COMMIT (five round trips:
  Orchestra's transactions before 2026-12-04);
- ``notify+commit``: the same, with ``NOTIFY …; COMMIT`` sent as one simple query (four:
  :func:`orchestra.db.notices.send_and_commit`);
- ``pipelined begin``: as ``notify+commit``, with an explicit BEGIN and the first INSERT sent
  together in psycopg's pipeline mode, on an autocommit connection (three round trips);
- ``one statement``: the INSERTs and the notification as one statement with data-modifying
  CTEs, on an autocommit connection (one round trip).

For each: the median time per transaction, and the CPU per transaction of this process (the
client) and of the server's backend (from /proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from tests.fixtures.postgres import running_postgres  # noqa: E402

from orchestra.db.postgres_engine import conninfo  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        print("| shape | round | p50 | client CPU | server CPU |")
        print("|---|---|---|---|---|")
        for round_ in range(1, args.rounds + 1):
            for name, run in shapes.items():
                on_auto = name in ("one statement", "pipelined begin")
                backend = backends[id(auto if on_auto else conn)]
                for _ in range(200):  # warm: psycopg prepares a statement on its 5th run
                    run()
                client, server = time.process_time(), _cpu_seconds(backend)
                times = []
                for _ in range(args.n):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                client = (time.process_time() - client) / args.n
                server = (_cpu_seconds(backend) - server) / args.n
                print(
                    f"| {name} | {round_} | {statistics.median(times) * 1e6:.0f} µs | "
                    f"{client * 1e6:.0f} µs | {server * 1e6:.0f} µs |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
