"""AI Task Orchestra: run AI tasks from YAML templates against local model servers."""

import sys

__version__ = "0.1.0"


def _import_without_rich() -> None:
    """Import httpx and structlog so that neither imports rich nor pygments.

    Both import them at import time when they are installed: httpx for its command line client
    (``httpx._main``: rich's progress bars, tables and syntax highlighting, and pygments'
    lexers), structlog for pretty tracebacks on a terminal. Orchestra installs rich for its own
    CLI's progress bars, which import it when they need it; the service and the Python client
    would otherwise carry about 12 MB of modules they never use (benchmarks/RESULTS.md, peak
    RSS). Without them, httpx has no ``httpx`` command (not Orchestra's to offer) and structlog
    formats tracebacks as the standard library does.
    """
    blocked = [name for name in ("rich", "pygments") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # "import rich": ImportError
    try:
        import httpx  # noqa: F401
        import structlog  # noqa: F401
    finally:
        for name in blocked:
            del sys.modules[name]


_import_without_rich()
