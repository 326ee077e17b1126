"""The service (started by the command line) loads no library it never uses, however many its
environment holds: rich and pygments (which httpx and structlog import when they are
installed) and pydantic (whose Litestar plugin Litestar adds when it is installed). Together
about 11 MB of a service's RSS. Each check runs in a fresh interpreter: this one has them
loaded already."""

from __future__ import annotations

from tests.fixtures.imports import loaded_after

#: Installed beside the service (rich for the CLI's progress bars; the rest by the test
#: tools), used by none of its code.
UNUSED = ("rich", "pygments", "pydantic", "pydantic_core")


def unused_modules_after(statement: str) -> list[str]:
    """The unused libraries a fresh interpreter has loaded after running ``statement``."""
    return sorted({module.split(".")[0] for module in loaded_after(statement, UNUSED)})


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


def test_a_program_that_imports_the_client_keeps_httpx_and_structlog_as_they_are() -> None:
    # Only Orchestra's command line hides rich from them (orchestra.lean_imports): a program
    # using the client keeps httpx's command and structlog's rich tracebacks.
    statement = "import orchestra.client, httpx, structlog\nassert structlog.dev.rich is not None"
    assert {"rich", "pygments"} <= set(unused_modules_after(statement))
