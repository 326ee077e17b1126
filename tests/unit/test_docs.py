"""The documentation's examples are valid: every full template in docs/templates.md loads and
every example task fits its built-in template."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestra.errors import TemplateError
from orchestra.templating import parse_template
from orchestra.templating.params import validate_params
from orchestra.templating.registry import TemplateRegistry
from tests.conftest import BUILTINS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "templates.md").read_text()
BLOCKS = re.findall(r"```(yaml|json)\n(.*?)```", DOC, re.DOTALL)


def test_full_template_examples_load() -> None:
    full = [body for kind, body in BLOCKS if kind == "yaml" and body.startswith("name:")]
    valid = [body for body in full if "My Template" not in body]
    assert valid
    for body in valid:
        parse_template(body, "docs/templates.md")


def test_the_documented_validation_output_is_what_orchestra_prints() -> None:
    [broken] = [body for kind, body in BLOCKS if kind == "yaml" and "My Template" in body]
    shown = re.search(r"\$ orchestra templates validate my.yaml\n(.*?)```", DOC, re.DOTALL)
    assert shown is not None
    with pytest.raises(TemplateError) as info:
        parse_template(broken, "my.yaml")
    assert [str(p) for p in info.value.problems] == shown.group(1).strip().splitlines()


def test_every_builtin_has_a_valid_example_task() -> None:
    registry = TemplateRegistry()
    registry.load()
    examples = [
        json.loads(body) for kind, body in BLOCKS if kind == "json" and '"template"' in body
    ]
    assert {e["template"] for e in examples} == BUILTINS
    for example in examples:
        validate_params(registry.get(example["template"]), example["params"])
