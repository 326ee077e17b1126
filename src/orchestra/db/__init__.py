"""Storage: the only package that imports SQLAlchemy.

``engine`` opens the database, ``tables`` describes it, ``schema`` creates and upgrades it,
``store`` holds every query as a named function, ``statements`` the hot path's SQL compiled
once, ``bulk`` cancel and retry for one task or many, ``overview`` the dashboard's reads.
"""

from orchestra.db.engine import Database
from orchestra.db.store import TaskStore
from orchestra.domain import Lease  # still importable from here, where callers find it

__all__ = ["Database", "Lease", "TaskStore"]
