"""Labels whose values come from callers (templates, models, schedules), bounded: the first
values are kept, later ones are counted together (:mod:`orchestra.metrics`), so a caller
naming a new model in every request cannot grow a scrape without end."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from pathlib import Path


class BoundedLabel:
    """A label's values as they are until ``limit`` are known, then ``other``.

    With several processes the values are counted for the whole host: each one a process
    lets through is written, under a lock, to a file of the shared directory
    (``labels_<name>.jsonl``, one JSON string a line), which every process of the host, a
    restarted one too, reads before it lets a value of its own through. A process reads it
    only for a value it has not seen: at most ``limit`` times, then never again once the
    file is full.
    """

    def __init__(self, name: str, limit: int, other: str, folder: Callable[[], str | None]) -> None:
        self.name = name
        self.limit = limit
        self.other = other
        #: The host's shared directory now (None: this process is alone).
        self.folder = folder
        self.seen: set[str] = set()
        #: Every value the host may report is known: any other is ``other``.
        self.full = False

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if self.full:
            return self.other
        folder = self.folder()
        if folder:
            try:
                return self._shared(Path(folder) / f"labels_{self.name}.jsonl", value)
            except OSError:  # the directory is gone (the supervisor stopping): as one process
                pass
        if len(self.seen) >= self.limit:
            self.full = True
            return self.other
        self.seen.add(value)
        return value

    def _shared(self, path: Path, value: str) -> str:
        """``value`` or ``other``, as the host's shared file of this label has room."""
        with path.open("a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
            file.seek(0)
            text = file.read()
            known = set(_lines(text))
            if value not in known and len(known) < self.limit:
                cut = text and not text.endswith("\n")  # a line cut short: end it first
                file.write(("\n" if cut else "") + json.dumps(value) + "\n")
                file.flush()
                known.add(value)
        self.seen |= known
        self.full = len(known) >= self.limit
        return value if value in known else self.other


def _lines(text: str) -> Iterator[str]:
    """The values of a shared label file, one JSON string a line; a line cut short (a
    process killed as it wrote) is left out."""
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, str):
                yield value
