"""Whether a worker pool can claim, for ``/health``.

A claim that fails with something other than the database's refusal (a bug, a schema that a
newer Orchestra changed under this process) is logged and tried again at the next poll, and a
claiming loop that fails is started again after a pause; meanwhile the process claims
nothing. The database's own refusals show in ``/health``'s ``database`` already; these did not
show at all, and a process that ran no task said ``ok``.
"""

from __future__ import annotations

from orchestra.domain import iso_now


class PoolHealth:
    """What keeps a pool from claiming, from its first failure until a claim succeeds."""

    def __init__(self) -> None:
        self._why: str | None = None
        self._since = ""

    def failed(self, what: str, error: BaseException) -> None:
        """``what`` failed with ``error``; the time of the first failure in a row is kept."""
        if self._why is None:
            self._since = iso_now()
        self._why = f"{what} ({type(error).__name__}: {error})"

    def claimed(self) -> None:
        """A claim succeeded (found something or not): the pool claims again."""
        self._why = None

    @property
    def ok(self) -> bool:
        """No failure since the last claim that succeeded."""
        return self._why is None

    @property
    def detail(self) -> str:
        """``ok``, or ``error: claims fail (RuntimeError: …) since 2026-…``."""
        return "ok" if self._why is None else f"error: {self._why} since {self._since}"
