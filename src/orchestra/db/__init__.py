"""Storage: the only package that imports SQLAlchemy.

``engine`` opens the database, ``tables`` describes it, ``schema`` creates and upgrades it,
``store`` holds every query as a named function.
"""

from orchestra.db.engine import Database
from orchestra.db.store import Lease, TaskPage, TaskStore

__all__ = ["Database", "Lease", "TaskPage", "TaskStore"]
