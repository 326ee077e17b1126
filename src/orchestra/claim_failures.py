"""The queue's claims refused by the database (locked, unavailable, full): how long a worker
pool pauses before it claims again, and how the outage is logged."""

from __future__ import annotations

from typing import Any

from orchestra import logs
from orchestra.errors import StorageError

#: Longest pause between claims while the database refuses writes, seconds.
CLAIM_BACKOFF_CAP = 10.0
#: Seconds the queue's claims may fail before their lines are errors: no task starts
#: meanwhile, which an operator alerting on errors must hear of.
CLAIM_ERROR_AFTER = 60.0


class ClaimFailures:
    """Refused claims in a row: the pause before the next doubles from the poll interval up
    to :data:`CLAIM_BACKOFF_CAP`; ``pool.claim_failed`` is logged once, then every minute (at
    error level past :data:`CLAIM_ERROR_AFTER`), and ``pool.claim_recovered`` at its end."""

    def __init__(self, logger: Any, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.count = 0
        self._outage = logs.Outage(logger, "pool.claim_failed", error_after=CLAIM_ERROR_AFTER)

    def failed(self, exc: StorageError) -> float:
        """One more claim refused: the seconds to pause before the next."""
        self.count += 1
        self._outage.failed(exc, code=exc.code)
        doublings = min(self.count - 1, 16)  # past the cap long before; no overflow
        return min(CLAIM_BACKOFF_CAP, self.poll_interval * float(2**doublings))

    def claimed(self, took: int) -> None:
        """A claim worked and took ``took`` tasks. Only one that took some ends the outage:
        an empty claim wrote nothing, so it shows nothing about whether writes work."""
        if took:
            self._outage.succeeded()
        self.count = 0
