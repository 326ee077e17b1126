"""How much one claim of a worker pool may take: free slots, per-model limits and the reserve.

A pool of ``concurrency`` slots keeps ``reserve`` of them (one when it has two or more) that
batch rows (:func:`~orchestra.domain.in_batch_lane`) may not take. Rows fill the other slots;
a single task submitted meanwhile is claimed into the reserved one at once, instead of
waiting for a row to end. Single tasks may take any slot, the reserved one included.

Each claim is shaped so that it cannot overfill the lane: when rows already run in every slot
they may have, the claim takes single tasks only (``min_priority`` :data:`PRIORITY_MIN`);
otherwise it takes at most the slots left to rows, whatever it finds (single tasks come
first in the claim's order), and the dispatcher, finding its claim full, claims again with
what is then left. A model with a concurrency limit of its own caps the claim the same way:
a claim could be all one model, so it is never larger than the smallest remaining capacity
among limited models, and a model with none left is skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import msgspec

from orchestra.domain import PRIORITY_MIN, Task, in_batch_lane


def reserve_for(concurrency: int) -> int:
    """The slots batch rows may not take: one when there are two or more, else none (a pool
    of one would otherwise never run a batch)."""
    return 1 if concurrency >= 2 else 0


class Claim(msgspec.Struct, frozen=True):
    """What the next claim may take: ``limit`` tasks (0: claim nothing), of priority
    ``min_priority`` or more (None: any; :data:`PRIORITY_MIN`: single tasks only, all that
    is free is reserved), none for a model in ``skip_models``."""

    limit: int
    min_priority: int | None
    skip_models: frozenset[str]


class Capacity:
    """A pool's slots: ``concurrency`` in all, ``reserve`` of them kept from batch rows, and
    each model's own limit (``model_limits``)."""

    def __init__(self, concurrency: int, model_limits: Mapping[str, int]) -> None:
        self.concurrency = concurrency
        self.reserve = reserve_for(concurrency)
        self.model_limits = dict(model_limits)

    def next_claim(self, running: Iterable[Task]) -> Claim:
        """The next claim, given the tasks running now."""
        tasks = list(running)
        limit = self.concurrency - len(tasks)
        lane_room = self.concurrency - self.reserve - sum(in_batch_lane(t.priority) for t in tasks)
        floor: int | None = None
        if lane_room <= 0:
            floor = PRIORITY_MIN  # only the reserve is free: single tasks only
        else:
            limit = min(limit, lane_room)
        full: set[str] = set()
        if self.model_limits:
            counts = Counter(t.model for t in tasks)
            for model, cap in self.model_limits.items():
                remaining = cap - counts[model]
                if remaining <= 0:
                    full.add(model)
                else:
                    limit = min(limit, remaining)
        return Claim(limit=max(limit, 0), min_priority=floor, skip_models=frozenset(full))
