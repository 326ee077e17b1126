"""Who a worker pool is, and whether the owner of a lease is known dead.

A pool's owner name is written on every task it leases: ``host:pid:TAGRANDOM``, where the
tag (8 hex digits) names this kernel's boot and the process's pid namespace, and the rest
is random. A lease's owner is known dead when its tag is this process's (the same machine,
the same boot, the same pid namespace: its pid means what it means here) and its pid is
gone, or is this process's own (pids are unique among live processes of a namespace). A
process restarted after a crash (kill -9, the OOM killer, a segfault) takes such leases
back when it starts, instead of leaving their tasks to wait out ``[workers] lease_seconds``
while newer tasks run (a container restarted in a new pid namespace does too when the kernel
gives the new namespace the old one's number; the old one is gone either way). Anything less
certain (another machine or host name, a pid now someone else's, no /proc) is left to the
lease, which is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path

#: The tag where this process's boot or pid namespace cannot be read (no /proc): it matches
#: nothing.
UNKNOWN = "0" * 8


@functools.cache
def _tag() -> str:
    """8 hex digits naming this kernel's boot and this process's pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return UNKNOWN
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:8]


#: The names this process gave its own pools (a process may run more than one: one per
#: service app): alive, whatever their pid says.
_ISSUED: set[str] = set()


def worker_id() -> str:
    """A name for a process's pool, unique across restarts: ``host:pid:TAGRANDOM``."""
    name = f"{socket.gethostname()}:{os.getpid()}:{_tag()}{secrets.token_hex(3)}"
    _ISSUED.add(name)
    return name


#: This process's own name and the pid it was given in (a forked child names itself again).
_process: tuple[int, str] | None = None


def process_id() -> str:
    """This process's name (as a pool's), for what it holds outside its pools: the batches
    whose uploads it reads."""
    global _process
    if _process is None or _process[0] != os.getpid():
        _process = (os.getpid(), worker_id())
    return _process[1]


def dead_among(names: Iterable[str], me: str) -> list[tuple[str, int]]:
    """Those of ``names`` known dead (:func:`known_dead`), each with its pid."""
    return [(name, pid) for name in names if (pid := known_dead(name, me)) is not None]


def known_dead(owner: str, me: str) -> int | None:
    """The pid of ``owner``'s process when it is known dead (see the module docstring),
    ``me`` being this process's own owner name; None when it may be alive."""
    try:
        host, pid_text, rest = owner.split(":")
        my_host, _, my_rest = me.split(":")
        pid = int(pid_text)
    except ValueError:  # another form (an older version's name): not ours to judge
        return None
    tag = rest[:8]
    if (
        owner == me
        or owner in _ISSUED
        or host != my_host
        or len(rest) != 14
        or tag == UNKNOWN
        or tag != my_rest[:8]
    ):
        return None
    if pid == os.getpid():  # this process's pid, a name it did not give: its predecessor's
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:  # alive, another user's (EPERM)
        return None
    return None
