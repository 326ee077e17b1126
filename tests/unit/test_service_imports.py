"""The service loads no library it never uses, however many its environment holds: rich and
pygments (which httpx and structlog import when they are installed) and pydantic (whose
Litestar plugin Litestar adds when it is installed). Together about 11 MB of a service's
RSS. Each check runs in a fresh interpreter: this one has them loaded already."""

from __future__ import annotations

import json
import subprocess
import sys

#: Installed beside the service (rich for the CLI's progress bars; the rest by the test
#: tools), used by none of its code.
UNUSED = ("rich", "pygments", "pydantic", "pydantic_core")


def unused_modules_after(statement: str) -> list[str]:
    """The unused libraries a fresh interpreter has loaded after running ``statement``."""
    probe = (
        f"{statement}\nimport json, sys\n"
        f"unused = {set(UNUSED)!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & unused)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_the_service_built_with_its_api_loads_none_of_them() -> None:
    statement = (
        "import orchestra.cli\n"
        "from orchestra.api.app import create_app\n"
        "from orchestra.config import Settings\n"
        "app = create_app(Settings())\n"
        "assert app.http.routes"
    )
    assert unused_modules_after(statement) == []


def test_the_probe_sees_them_where_they_are_imported() -> None:
    # The check above can fail: without orchestra's care, httpx alone loads rich and pygments,
    # and a plain Litestar app loads pydantic.
    loaded = unused_modules_after("import httpx, litestar\nlitestar.Litestar()")
    assert {"rich", "pygments", "pydantic"} <= set(loaded)
