"""How many event streams each API key holds open: at most ``[auth] max_streams_per_key``.

An event stream holds its connection for as long as its client keeps it. A client that opens
streams in a loop and never closes them (a bug, not an attack: a key is needed) would hold
every connection the server has (``[server] max_connections``), and no one else would be
served. Counted per key in each process; requests without a key are not counted.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestra.errors import TooManyStreams

#: Seconds a client refused a stream is told to wait (a stream of its own may end by then).
RETRY_AFTER = 5


class StreamSlots:
    """The open streams of each key, against the most one key may hold (0: no limit)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._open: dict[str, int] = {}

    def take(self, key_id: str | None) -> Callable[[], None]:
        """A place for a new stream of ``key_id``; returns what gives it back (safe to call
        more than once).

        Raises:
            TooManyStreams: the key holds its most streams already.
        """
        if key_id is None or self.most <= 0:
            return _nothing
        held = self._open.get(key_id, 0)
        if held >= self.most:
            raise TooManyStreams(
                f"this API key holds {held} event streams open, the most it may "
                "([auth] max_streams_per_key): close one, or follow several tasks on one "
                "stream (GET /api/v1/events)"
            )
        self._open[key_id] = held + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            left = self._open[key_id] - 1
            if left:
                self._open[key_id] = left
            else:
                del self._open[key_id]

        return give_back


def _nothing() -> None:
    return None
