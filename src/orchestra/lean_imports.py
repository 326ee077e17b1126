"""Imported first by the command line (``orchestra``, ``python -m orchestra``): httpx and
structlog, imported so that neither imports rich nor pygments.

Both import them at import time when they are installed: httpx for its own command line
(``httpx._main``: rich's progress bars, tables and syntax highlighting, pygments' lexers),
structlog for pretty tracebacks on a terminal. Orchestra installs rich for its CLI's progress
bars, which import it when they need it; the service would otherwise carry about 3 MB of
modules it never uses (benchmarks/RESULTS.md, "Submit and read over HTTP"). In Orchestra's own
processes, then, httpx has no ``httpx`` command and structlog formats tracebacks as the
standard library does. Only the command line does this: a program that imports
``orchestra.client`` keeps httpx and structlog as they would be without Orchestra.
"""

from __future__ import annotations

import sys


def import_without_rich() -> None:
    """Import httpx and structlog with rich and pygments hidden, unless something imported
    them already (then nothing changes)."""
    if "httpx" in sys.modules or "structlog" in sys.modules:
        return
    blocked = [name for name in ("rich", "pygments") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # "import rich": ImportError
    try:
        import httpx  # noqa: F401
        import structlog  # noqa: F401
    finally:
        for name in blocked:
            del sys.modules[name]


import_without_rich()
