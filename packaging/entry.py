"""The single binary's entry point (PyInstaller's script; see packaging/orchestra.spec).

A frozen program has no ``python -m``: the children it starts are copies of itself, told
what to be by their arguments. So, before the CLI:

- ``multiprocessing.freeze_support()`` turns a copy started by multiprocessing (the render
  processes' fork server, spawned service processes, the resource tracker) into that child;
- :data:`orchestra.llm.model_handle.MODEL_CHILD_ARG` turns a copy into the embedded
  model's process (``python -m orchestra.llm.model_child`` when not frozen).
"""

from __future__ import annotations

import multiprocessing
import sys


def run() -> None:
    """Be the child the arguments ask for, else the ``orchestra`` command."""
    multiprocessing.freeze_support()
    from orchestra.llm.model_handle import MODEL_CHILD_ARG

    if sys.argv[1:2] == [MODEL_CHILD_ARG]:
        del sys.argv[1]
        from orchestra.llm.model_child import main as model_child

        model_child()
        return
    from orchestra.cli import main

    main(prog_name="orchestra")


if __name__ == "__main__":
    run()
