"""The embedded model's process holds no listening socket of the service.

Were it to inherit one, it would keep the port bound after the service died (until it noticed
and exited itself, seconds later), and a service started again at once could not listen. The
service's loop is uvloop where it is installed (uvicorn picks it up), and uvloop ignores
``close_fds``: a child gets every descriptor marked inheritable. So each case runs on both
loops, with the socket bound as the service binds it, and a real child started as the model
process is (one that never loads a model: it reads its stdin until the service closes it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestra.listening import bind_socket
from orchestra.llm import model_wire as wire
from orchestra.llm.model_process import ModelProcess
from tests.fixtures.servers import wait_until

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="reads a process's descriptors from /proc"
)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if importlib.util.find_spec("uvloop") is not None:
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop

#: A model process that never loads: it waits for the end of its stdin.
IDLE_CHILD = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]


def sockets_of(pid: int) -> set[str]:
    """The sockets a process holds, as /proc names them ("socket:[1234]")."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            held.add(target)
    return held


async def model_child_sockets() -> set[str]:
    """The sockets of a model process, started as the embedded provider starts it."""
    process = ModelProcess("embedded", wire.Load("none.gguf", 0, 0), command=IDLE_CHILD)
    starting = asyncio.create_task(process.preload())
    try:
        await wait_until(lambda: process.info().pid is not None)
        pid = process.info().pid
        assert pid is not None
        return sockets_of(pid)
    finally:
        await process.stop()
        await asyncio.gather(starting, return_exceptions=True)


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "supervised"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_the_model_process_holds_no_listening_socket_of_the_service(
    loop: str, shared: bool
) -> None:
    sock = bind_socket("127.0.0.1", 0, shared=shared)
    sock.listen()
    try:
        listening = os.readlink(f"/proc/self/fd/{sock.fileno()}")
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            held = runner.run(model_child_sockets())
    finally:
        sock.close()
    assert listening not in held
