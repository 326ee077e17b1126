"""Template YAML with positions, and the collector of problems found in it.

The YAML is read with ruamel's round-trip loader, which remembers where every key and value
stands; the tree is turned into plain Python while the positions are kept by path, so each
problem points at the offending value (1-based line and column). A key that a merge
(``<<: *base``) brought in is placed at the ``<<``: that is where it comes from here.
"""

from __future__ import annotations

import difflib
from datetime import date
from typing import Any

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString

from orchestra.domain import parse_duration

Path_ = tuple[str | int, ...]


class TemplateProblem(msgspec.Struct, frozen=True):
    """One thing wrong with a template, and where (1-based line and column)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f" {self.path}:" if self.path else ""
        return f"{self.file}:{self.line}:{self.column}:{where} {self.message}"


def format_path(path: Path_) -> str:
    """("steps", 2, "prompt") -> "steps[2].prompt"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Source:
    """The YAML text, its plain data, and the position of every value by path."""

    def __init__(self, text: str, file: str) -> None:
        self.text = text
        self.file = file
        self.lines = text.splitlines()
        self.positions: dict[Path_, tuple[int, int]] = {(): (0, 0)}
        self.key_positions: dict[Path_, tuple[int, int]] = {}
        self.block_scalars: set[Path_] = set()
        self.folded: set[Path_] = set()
        self.data = self._plain(YAML(typ="rt").load(text), ())

    def _merge_position(self, node: CommentedMap) -> tuple[int, int]:
        """Where the mapping's ``<<`` stands (0-based), or the mapping's start if not found."""
        line, col = node.lc.line, node.lc.col
        for number in range(line, len(self.lines)):
            found = self.lines[number].find("<<", col if number == line else 0)
            if found >= 0:
                return number, found
        return line, col

    def _plain(self, node: Any, path: Path_) -> Any:
        if isinstance(node, CommentedMap):
            out: dict[Any, Any] = {}
            merged: tuple[int, int] | None = None
            for key in node:
                if key in node.lc.data:
                    self.positions[(*path, key)] = node.lc.value(key)
                    self.key_positions[(*path, key)] = node.lc.key(key)
                else:  # brought in by a merge key
                    merged = merged or self._merge_position(node)
                    self.positions[(*path, key)] = self.key_positions[(*path, key)] = merged
                out[key] = self._plain(node[key], (*path, key))
            return out
        if isinstance(node, CommentedSeq):
            items = []
            for index, item in enumerate(node):
                self.positions[(*path, index)] = node.lc.item(index)
                items.append(self._plain(item, (*path, index)))
            return items
        if isinstance(node, LiteralScalarString | FoldedScalarString):
            self.block_scalars.add(path)
            if isinstance(node, FoldedScalarString):
                self.folded.add(path)
            return str(node)
        if isinstance(node, ScalarBoolean):
            return bool(node)
        if isinstance(node, str):
            return str(node)
        if isinstance(node, bool):
            return node
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if isinstance(node, date):
            # YAML reads 2024-01-01 (and 2024-01-01 10:30:00) as a date (a time); JSON, which
            # parameters and outputs are, has neither: as text, as the author wrote it.
            return str(node)
        return node

    def where(self, path: Path_) -> tuple[int, int]:
        """1-based (line, column) of the value at ``path``, or of its nearest known parent."""
        while path not in self.positions:
            path = path[:-1]
        line, col = self.positions[path]
        return line + 1, col + 1

    def where_key(self, path: Path_) -> tuple[int, int]:
        """1-based (line, column) of the key that holds the value at ``path``."""
        if path in self.key_positions:
            line, col = self.key_positions[path]
            return line + 1, col + 1
        return self.where(path)

    def where_in_value(self, path: Path_, lineno: int) -> tuple[int, int]:
        """Position of line ``lineno`` (1-based) inside the string value at ``path``."""
        line, col = self.where(path)
        if path in self.block_scalars:
            # A block scalar's text starts on the line after its | or > indicator.
            row = self._folded_row(line, lineno) if path in self.folded else lineno - 1
            line = line + 1 + row
            text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
            return line, len(text) - len(text.lstrip()) + 1
        if lineno > 1:
            return line + lineno - 1, 1
        return line, col

    def _folded_row(self, line: int, lineno: int) -> int:
        """The row (0-based, after the indicator on ``line``, 1-based) of a ``>`` block where
        the text's line ``lineno`` starts. Folding joins rows with a space: only empty rows
        (one line break each) and more-indented rows (which keep theirs) break lines."""
        rows = self.lines[line:]
        first = next((r for r in rows if r.strip()), "")
        indent = len(first) - len(first.lstrip())
        breaks, blanks = 0, 0
        previous: bool | None = None  # whether the last text row was more indented
        for row_number, row in enumerate(rows):
            if not row.strip():
                blanks += 1
                continue
            if len(row) - len(row.lstrip()) < indent:
                break  # the block ended
            more = row[indent : indent + 1] in (" ", "\t")
            if previous is None:
                breaks += blanks
            else:
                breaks += blanks + (1 if more or previous else 0)
            if breaks >= lineno - 1:
                return row_number
            previous, blanks = more, 0
        return lineno - 1


class Checker:
    """Collects problems while walking the template."""

    def __init__(self, source: Source) -> None:
        self.src = source
        self.problems: list[TemplateProblem] = []

    def add(self, path: Path_, message: str, at: tuple[int, int] | None = None) -> None:
        line, col = at or self.src.where(path)
        self.problems.append(TemplateProblem(self.src.file, line, col, format_path(path), message))

    def mapping(self, value: Any, path: Path_, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"{what} must be a mapping, got {describe(value)}")
        return None

    def keys(self, data: dict[str, Any], path: Path_, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self.add(
                    (*path, key),
                    f"unknown field {key!r}{suggestion} (allowed: {', '.join(allowed)})",
                    at=self.src.where_key((*path, key)),
                )

    def string(self, data: dict[str, Any], path: Path_, key: str, required: bool = False) -> Any:
        value = data.get(key)
        if value is None:
            if required:
                self.add(path, f"{key!r} is required")
            return None
        if not isinstance(value, str):
            self.add((*path, key), f"{key!r} must be a string, got {describe(value)}")
            return None
        return value

    def duration(self, data: dict[str, Any], path: Path_, key: str) -> float | None:
        if key not in data:
            return None
        try:
            seconds = parse_duration(data[key])
        except ValueError as exc:
            self.add((*path, key), f"{key}: {exc}")
            return None
        if seconds <= 0:
            self.add((*path, key), f"{key} must be more than 0")
            return None
        return seconds


def describe(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)
