"""References (``$ref``) in the JSON Schemas that templates and callers give: local, resolvable
and finite, checked before any value is validated.

jsonschema follows a ``$ref`` wherever it points: to a URL (which it would fetch, and which
failed the task as an internal error), to a place that does not exist (the same), or round a
loop that never reaches the value (``{"$ref": "#"}``: RecursionError, a 500 on every submit).
So here a reference may point only inside its own schema, as ``#`` or a JSON pointer
(``#/$defs/item``); it must lead to a schema; and following references and the keywords that
apply to the same value (``allOf``, ``anyOf``, ``oneOf``, ``not``, ``if``/``then``/``else``,
``dependentSchemas``) must not come back round without going into the value (through
``properties``, ``items`` and the like), where the value's own depth ends the recursion. A
recursive schema for a tree is fine; one that refers to itself in place is not.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from orchestra.templating.regex import subschemas
from orchestra.templating.source import Path_

#: Keywords whose schemas apply to the same value as the schema holding them.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
#: Keywords that refer in ways this module does not follow.
_REFUSED = ("$dynamicRef", "$recursiveRef")


def _resolve(root: Any, ref: str) -> tuple[Any, Path_] | None:
    """The schema a local reference points at, and its path; None when there is none."""
    if ref == "#":
        return root, ()
    node: Any = root
    path: Path_ = ()
    for raw in ref[2:].split("/"):
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node, path = node[part], (*path, part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node, path = node[int(part)], (*path, int(part))
        else:
            return None
    return node, path


def _in_place(schema: dict[str, Any]) -> list[Any]:
    """The schemas that apply to the same value as ``schema``, besides its ``$ref``."""
    out = [schema[k] for k in _IN_PLACE_ONE if isinstance(schema.get(k), dict)]
    for key in _IN_PLACE_LIST:
        if isinstance(schema.get(key), list):
            out += [s for s in schema[key] if isinstance(s, dict)]
    if isinstance(schema.get("dependentSchemas"), dict):
        out += [s for s in schema["dependentSchemas"].values() if isinstance(s, dict)]
    return out


def ref_problems(schema: Any, path: Path_ = ()) -> list[tuple[Path_, str]]:
    """Each ``$ref`` in ``schema`` that cannot be used: (its path, why), in the order found."""
    if not isinstance(schema, dict):
        return []
    problems: list[tuple[Path_, str]] = []
    targets: dict[int, Any] = {}  # id of a schema holding a usable $ref -> what it points at
    where: dict[int, Path_] = {}
    stack: list[tuple[Any, Path_]] = [(schema, path)]
    while stack:
        node, at = stack.pop()
        if not isinstance(node, dict) or id(node) in where:
            continue
        where[id(node)] = at
        for key in _REFUSED:
            if key in node:
                problems.append(((*at, key), f"{key} is not supported; use $ref"))
        if at != path and "$id" in node:
            problems.append(((*at, "$id"), "$id is allowed only at the top of a schema"))
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
                problems.append(
                    (
                        (*at, "$ref"),
                        f"$ref {ref!r}: only references inside the schema (# or #/...) are "
                        "supported",
                    )
                )
            else:
                found = _resolve(schema, ref)
                if found is None or not isinstance(found[0], dict | bool):
                    problems.append(((*at, "$ref"), f"$ref {ref!r} does not resolve to a schema"))
                elif isinstance(found[0], dict):
                    targets[id(node)] = found[0]
                    # What it points at is checked too, keyword or not: a $ref to
                    # "#/x-extra" reached a remote $ref the walk of keywords never saw.
                    stack.append((found[0], (*path, *found[1])))
        stack.extend(reversed(list(subschemas(node, at))))
    if not problems:
        problems += _loops(schema, targets, where)
    return problems


def _loops(root: Any, targets: dict[int, Any], where: dict[int, Path_]) -> list[tuple[Path_, str]]:
    """A problem at each ``$ref`` that leads back round to its own schema in place."""
    problems: list[tuple[Path_, str]] = []
    for start_id in targets:
        seen: set[int] = set()
        stack = [targets[start_id]]
        while stack:
            node = stack.pop()
            if id(node) == start_id:
                problems.append(
                    (
                        (*where.get(start_id, ()), "$ref"),
                        "this $ref refers back to itself without going into the value (it "
                        "would loop forever)",
                    )
                )
                break
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack += _in_place(node)
            if id(node) in targets:
                stack.append(targets[id(node)])
    return problems
