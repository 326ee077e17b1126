"""Whether a lease's owner is known dead (orchestra.owners): only a process of this machine's
boot and pid namespace whose pid is gone, or is this process's own."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from orchestra import owners


def test_an_owner_name_is_host_pid_tag_and_random() -> None:
    host, pid, rest = owners.worker_id().split(":")
    assert int(pid) == os.getpid() and len(rest) == 14
    assert owners.worker_id() != owners.worker_id()


def test_only_an_owner_of_this_machine_and_namespace_whose_pid_is_gone_is_known_dead() -> None:
    me = owners.worker_id()
    host, _, rest = me.split(":")
    tag = rest[:8]
    # Past the highest pid the kernel gives: no process has it.
    gone = SimpleNamespace(pid=int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)
    assert owners.known_dead(f"{host}:{gone.pid}:{tag}abcdef", me) == gone.pid
    # This process's own pid under a name it did not give: a predecessor with the same pid.
    assert owners.known_dead(f"{host}:{os.getpid()}:{tag}abcdef", me) == os.getpid()
    alive = os.getppid()
    assert owners.known_dead(f"{host}:{alive}:{tag}abcdef", me) is None
    assert owners.known_dead(me, me) is None
    # Another pool of this process (a second service app in it): alive, pid and all.
    assert owners.known_dead(owners.worker_id(), me) is None
    # Another machine, boot or pid namespace, an older name, or no /proc: left to the lease.
    assert owners.known_dead(f"elsewhere:{gone.pid}:{tag}abcdef", me) is None
    other = "f" * 8 if tag != "f" * 8 else "e" * 8
    assert owners.known_dead(f"{host}:{gone.pid}:{other}abcdef", me) is None
    assert owners.known_dead(f"{host}:{gone.pid}:abcdef", me) is None
    unknown = f"{host}:{os.getpid()}:{owners.UNKNOWN}abcdef"
    assert owners.known_dead(f"{host}:{gone.pid}:{owners.UNKNOWN}abcdef", unknown) is None
    assert owners.known_dead("not an owner name", me) is None
