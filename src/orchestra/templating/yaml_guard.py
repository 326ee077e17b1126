"""Limits on template YAML, checked before any object is built.

ruamel.yaml sets no bound on alias expansion: a 300-byte "billion laughs" document (anchors
that alias the anchor before them nine times over) expands to hundreds of megabytes once
turned into plain data, and took the process down. So the text's size is checked first, then
its parse events are scanned (cheap, nothing built): every alias counts as the whole node it
points at, and the count or the nesting going over its limit stops the scan at that point,
with the line and column where it happened.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    ScalarEvent,
)

from orchestra.errors import FieldProblem, PayloadTooLarge, TemplateError
from orchestra.templating.source import TemplateProblem


def check_size(text: str, max_bytes: int) -> None:
    """Refuse a template text over ``max_bytes`` before reading any of it.

    Raises:
        PayloadTooLarge: naming the limit.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        reason = f"is {size} bytes; the limit is {max_bytes} ([limits] max_template_bytes)"
        raise PayloadTooLarge(f"the template {reason}", [FieldProblem("body", reason)])


def check_shape(text: str, file: str, *, max_nodes: int, max_depth: int) -> None:
    """Scan the YAML's events: nodes (aliases expanded) and nesting within the limits.

    Syntax errors are left for the loader, which reports them with their position.

    Raises:
        TemplateError: one problem naming the limit, at the node that went over it.
    """
    open_: list[list[Any]] = []  # [anchor, nodes so far] per open collection
    sizes: dict[str, int] = {}  # anchor -> nodes of what it names, expanded
    total = 0

    def over(event: Any, message: str) -> TemplateError:
        mark = event.start_mark
        return TemplateError([TemplateProblem(file, mark.line + 1, mark.column + 1, "", message)])

    def add(event: Any, nodes: int, new: bool = True) -> None:
        """Count ``nodes`` into the open collection; ``new``: not counted in the total yet."""
        nonlocal total
        if open_:
            open_[-1][1] += nodes
        if not new:
            return
        total += nodes
        if total > max_nodes:
            raise over(
                event,
                f"the YAML holds more than {max_nodes} nodes once its aliases are expanded "
                "([limits] yaml_max_nodes)",
            )

    try:
        for event in YAML(typ="rt").parse(text):
            if isinstance(event, ScalarEvent):
                if event.anchor:
                    sizes[event.anchor] = 1
                add(event, 1)
            elif isinstance(event, AliasEvent):
                add(event, sizes.get(event.anchor, 1))
            elif isinstance(event, CollectionStartEvent):
                add(event, 1)
                open_.append([event.anchor, 1])
                if len(open_) > max_depth:
                    raise over(
                        event,
                        f"the YAML nests deeper than {max_depth} levels ([limits] yaml_max_depth)",
                    )
            elif isinstance(event, CollectionEndEvent) and open_:
                anchor, nodes = open_.pop()
                if anchor:
                    sizes[anchor] = nodes
                add(event, nodes - 1, new=False)  # itself was counted at its start
    except TemplateError:
        raise
    except Exception:  # noqa: S110 - a syntax error: the loader reports it with its position
        return
