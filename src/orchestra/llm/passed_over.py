"""Which entries of a fallback chain a step's model calls passed over, and why.

The runner opens a note for each step (:func:`noting`); the router adds to it whenever a call
is answered by an entry other than the chain's first (:func:`note`): the entries before it,
each with why it did not answer (the call's own failure, or what made it unavailable); and
when every entry of a chain failed, each of them with its failure. The note is a context
variable, so the concurrent calls of a ``map`` step add to their step's.

Likewise the entry that answered each call (:func:`answering`, :func:`answered`): the cache of
model answers keeps an answer only under the key of the entry that gave it. And the entry a
step asked last, answered or not (:func:`asking`, :func:`asked`): a failed step is timed under
it (:func:`orchestra.metrics.step_finished`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import TypeVar

from orchestra.domain import Fallback
from orchestra.errors import ProviderError

#: The most entries one step records: a map step's items pass over the same few entries.
MOST = 10

T = TypeVar("T")
#: A chain's entry (the router's ``Route``), named in a note as ``str(entry)``.
E = TypeVar("E", bound=Hashable)

_noted: ContextVar[list[Fallback] | None] = ContextVar("orchestra_passed_over", default=None)
_answered: ContextVar[list[str] | None] = ContextVar("orchestra_answered_by", default=None)
_asked: ContextVar[list[str] | None] = ContextVar("orchestra_asked_last", default=None)


@contextmanager
def _collecting(var: ContextVar[list[T] | None]) -> Iterator[list[T]]:
    """A fresh list in ``var`` while inside (the model calls made here add to it)."""
    found: list[T] = []
    token = var.set(found)
    try:
        yield found
    finally:
        var.reset(token)


def noting() -> AbstractContextManager[list[Fallback]]:
    """Collect, while inside, the entries passed over by the model calls made here."""
    return _collecting(_noted)


def note(passed: Iterable[Fallback]) -> None:
    """Add entries passed over to the current note (none open: nothing to do); an entry
    already noted for the same reason, and any past :data:`MOST`, are left out."""
    noted = _noted.get()
    if noted is None:
        return
    for fallback in passed:
        if len(noted) < MOST and fallback not in noted:
            noted.append(fallback)


def answering() -> AbstractContextManager[list[str]]:
    """Collect, while inside, the entries (``provider/model``) that answered the model calls
    made here."""
    return _collecting(_answered)


def answered(route: str) -> None:
    """The entry ``route`` answered a call (none open: nothing to do)."""
    routes = _answered.get()
    if routes is not None:
        routes.append(route)


def asking() -> AbstractContextManager[list[str]]:
    """Keep, while inside, the last entry (``provider/model``) a model call made here asked:
    the list holds it alone, or nothing when none was asked."""
    return _collecting(_asked)


def asked(route: str) -> None:
    """The entry ``route`` is being asked (none open: nothing to do)."""
    routes = _asked.get()
    if routes is not None:
        routes[:] = [route]


def before(
    chain: list[E],
    answered: E,
    unavailable: Mapping[E, str],
    failures: Iterable[tuple[E, ProviderError]],
) -> list[Fallback]:
    """The entries of ``chain`` before ``answered``, each with why it did not answer: the
    call's own error, else why it was not available when the call began."""
    failed = {entry: error.message for entry, error in failures}
    return [
        Fallback(route=str(entry), reason=failed.get(entry) or unavailable[entry])
        for entry in chain[: chain.index(answered)]
    ]


def note_failed(chain: list[E], failures: list[tuple[E, ProviderError]]) -> None:
    """Note the entries of ``chain`` whose calls failed, in its order, each with its error,
    for a call that fails: what its step passed over (nothing for a model of one entry,
    whose error says it all)."""
    if len(chain) < 2 or not failures:
        return
    failed = {entry: error.message for entry, error in failures}
    note(Fallback(route=str(entry), reason=failed[entry]) for entry in chain if entry in failed)
