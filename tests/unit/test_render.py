from __future__ import annotations

import pytest

from orchestra.errors import RenderError
from orchestra.templating.render import choose, from_json, lines, render_output, render_text


def test_single_expression_output_keeps_its_value() -> None:
    scope = {"steps": {"a": {"output": [1, 2]}}, "params": {}}
    assert render_output("{{ steps.a.output }}", scope) == [1, 2]
    assert render_output(" {{ steps.a.output | length }} ", scope) == 2
    assert render_output("n={{ steps.a.output | length }}", scope) == "n=2"
    assert render_output({"x": "{{ steps.a.output[0] }}"}, scope) == {"x": 1}


def test_undefined_names_fail_loudly() -> None:
    with pytest.raises(RenderError, match="undefined value"):
        render_text("{{ params.missing }}", {"params": {}}, what="steps.a.prompt")
    with pytest.raises(RenderError, match="undefined value"):
        render_output("{{ steps.nope.output }}", {"steps": {}})


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(RenderError, match="SecurityError|unsafe|undefined"):
        render_text("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}, what="prompt")


def test_choose_maps_free_text_to_a_label() -> None:
    labels = ["billing", "bug", "feature request"]
    assert choose("Bug", labels) == "bug"
    assert choose("  billing. ", labels) == "billing"
    assert choose("I think this is a feature request.", labels) == "feature request"
    assert choose("bug, or maybe billing", labels) == "bug"
    with pytest.raises(RenderError, match="none of: billing, bug, feature request"):
        choose("no idea", labels)


def test_from_json_tolerates_fences_and_chatter() -> None:
    assert from_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert from_json('Sure! Here it is: {"a": [1, 2]} Hope that helps.') == {"a": [1, 2]}
    with pytest.raises(RenderError, match="not JSON"):
        from_json("no json here")


def test_lines_drops_bullets_and_numbers() -> None:
    assert lines("- one\n* two\n\n3. three\n4) four") == ["one", "two", "three", "four"]


def test_mapping_keys_win_over_dict_methods() -> None:
    scope = {"params": {"items": [1, 2], "keys": "k"}}
    assert render_output("{{ params.items }}", scope) == [1, 2]
    assert render_text("{{ params.keys }}", scope, what="t") == "k"
    assert render_output("{{ params.get('items') }}", scope) == [1, 2]  # methods still work
