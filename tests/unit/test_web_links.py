"""The dashboard's path prefixes: a plain path, nothing a value could smuggle in."""

from __future__ import annotations

import pytest

from orchestra.errors import ConfigError
from orchestra.web.links import clean_prefix


@pytest.mark.parametrize("value", ["/orchestra\n", "orchestra", "/a b", "/x/../y?z"])
def test_a_prefix_that_is_not_a_plain_path_is_refused(value: str) -> None:
    """``$`` matched before a final newline: "/orchestra\\n" was taken, and written into
    every link."""
    with pytest.raises(ConfigError, match="is not a path such as /orchestra"):
        clean_prefix(value, "server.root_path")


def test_a_plain_prefix_loses_its_final_slash() -> None:
    assert clean_prefix("/tools/orchestra/", "server.root_path") == "/tools/orchestra"
    assert clean_prefix("", "server.root_path") == ""
