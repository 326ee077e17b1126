"""Storage: the only package that imports SQLAlchemy.

``engine`` opens the database, ``tables`` describes it, ``schema`` creates and upgrades it.
``store``'s :class:`TaskStore` is every operation on tasks, named; their SQL sits by topic:
``queue`` (enqueue), ``attempts`` (claim, leases, steps, an attempt's end), ``bulk`` (cancel
and retry, one task or many), ``retention``, ``events``, ``reads`` and ``overview`` (the
dashboard's reads). ``guards`` builds the status guards from the domain's transitions.
"""

from orchestra.db.engine import Database
from orchestra.db.store import TaskStore
from orchestra.domain import Lease  # still importable from here, where callers find it

__all__ = ["Database", "Lease", "TaskStore"]
