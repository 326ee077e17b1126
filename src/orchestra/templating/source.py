"""Template YAML with positions, and the collector of problems found in it.

The YAML is read with ruamel's round-trip loader, which remembers where every key and value
stands; the tree is turned into plain Python while the positions are kept by path, so each
problem points at the offending value (1-based line and column). A key that a merge
(``<<: *base``) brought in is placed at the ``<<``: that is where it comes from here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from datetime import date
from typing import Any, cast

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, CommentedSet, TaggedScalar
from ruamel.yaml.nodes import MappingNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString

from orchestra.domain import MAX_TIMEOUT, model_name_problem, parse_duration
from orchestra.errors import HALF_SURROGATE, SURROGATE

Path_ = tuple[str | int, ...]
#: The tag of YAML's merge key, ``<<``.
MERGE_TAG = "tag:yaml.org,2002:merge"
#: The tag of a string written ``!!str value``.
STR_TAG = "tag:yaml.org,2002:str"
#: YAML's own tags of a mapping and a list (``!!map {…}``, ``!!seq […]``).
MAP_TAG, SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"

#: A parameter's name or a step's id: what a template's expressions can name as it is.
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: What :data:`IDENT` asks, in words (``ü`` is a letter, but not one an identifier takes).
IDENT_RULE = "must be an ASCII letter or _ followed by ASCII letters, digits or _"


class TemplateProblem(msgspec.Struct, frozen=True):
    """One thing wrong with a template, and where (1-based line and column; 0: the problem
    is with the file as a whole, or with a folder)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f" {self.path}:" if self.path else ""
        if not self.line:
            return f"{self.file}:{where} {self.message}"
        return f"{self.file}:{self.line}:{self.column}:{where} {self.message}"


def merge_loop(text: str) -> tuple[int, int] | None:
    """1-based (line, column) of the first merge key (``<<``) that brings in a mapping holding
    it (``x: &x {<<: *x}``), which ruamel cannot build (it fails with an AttributeError);
    None when there is none, or the text cannot be composed."""
    try:
        root = YAML(typ="rt").compose(text)
    except Exception:  # noqa: BLE001 - whatever breaks composing is reported elsewhere
        return None
    seen: set[int] = set()
    stack: list[tuple[Any, tuple[int, ...]]] = [(root, ())]
    while stack:
        node, ancestors = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        inside = (*ancestors, id(node))
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if str(key.tag) == MERGE_TAG or key.value == "<<":
                    merged = value.value if isinstance(value, SequenceNode) else [value]
                    if any(id(m) in inside for m in merged):
                        return key.start_mark.line + 1, key.start_mark.column + 1
                stack.extend([(key, inside), (value, inside)])
        elif isinstance(node, SequenceNode):
            stack.extend((item, inside) for item in node.value)
    return None


def _escaped(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def format_path(path: Path_) -> str:
    """("steps", 2, "prompt") -> "steps[2].prompt"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return _escaped(out) if SURROGATE.search(out) else out


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
        #: Values a merge key brought in, placed at the ``<<``.
        self.merged: set[Path_] = set()
        #: Problems found while reading the values (lone surrogates), by path.
        self.problems: list[tuple[Path_, str]] = []
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
            self._tag_of(node, path)
            for written in node:
                # A key with a tag (``!!str id: a``) is its text (a problem if another tag).
                key = self._tagged(written, path) if isinstance(written, TaggedScalar) else written
                if node.lc.data is None:  # an !!omap: ruamel keeps no positions by key
                    here = (node.lc.line, node.lc.col)
                    self.positions[(*path, key)] = self.key_positions[(*path, key)] = here
                elif written in node.lc.data:
                    self.positions[(*path, key)] = node.lc.value(written)
                    self.key_positions[(*path, key)] = node.lc.key(written)
                else:  # brought in by a merge key
                    self.merged.add((*path, key))
                    merged = merged or self._merge_position(node)
                    self.positions[(*path, key)] = self.key_positions[(*path, key)] = merged
                value = self._plain(node[written], (*path, key))
                if isinstance(key, str):
                    key = self._text(key, (*path, _escaped(key)), of="key")
                out[key] = value
            return out
        if isinstance(node, CommentedSeq):
            self._tag_of(node, path)
            items = []
            for index, item in enumerate(node):
                self.positions[(*path, index)] = node.lc.item(index)
                items.append(self._plain(item, (*path, index)))
            return items
        if isinstance(node, TaggedScalar):
            return self._tagged(node, path)
        if isinstance(node, CommentedSet):
            self.problems.append((path, "a set (!!set) is not a value a template takes"))
            return [self._plain(key, path) for key in node]  # checked on as the list it is
        if isinstance(node, bytes):
            self.problems.append((path, "binary data (!!binary) is not a value a template takes"))
            return node.decode("utf-8", "replace")
        if isinstance(node, LiteralScalarString | FoldedScalarString):
            self.block_scalars.add(path)
            if isinstance(node, FoldedScalarString):
                self.folded.add(path)
            return self._text(str(node), path)
        if isinstance(node, ScalarBoolean):
            return bool(node)
        if isinstance(node, str):
            return self._text(str(node), path)
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

    def _tag_of(self, node: CommentedMap | CommentedSeq, path: Path_) -> None:
        """A problem for a mapping or a list with a tag of its own (``!shout {…}``), which
        would be taken as if it had none; YAML's own for its kind (``!!map``) is as none."""
        tag = getattr(getattr(node, "tag", None), "value", None)
        if tag is not None and tag not in (MAP_TAG, SEQ_TAG):
            short = str(tag).replace("tag:yaml.org,2002:", "!!")
            self.problems.append((path, f"the tag {short} is not one a template takes"))

    def _tagged(self, node: TaggedScalar, path: Path_) -> str:
        """A scalar with an explicit tag: ``!!str`` (standard YAML) is its text, a block one
        placed as any block scalar; any other tag is a problem named by the tag (the text
        checked on as if untagged)."""
        tag = str(node.tag.value)
        if tag != STR_TAG:
            short = tag.replace("tag:yaml.org,2002:", "!!")
            self.problems.append((path, f"the tag {short} is not one a template takes"))
        if node.style in ("|", ">"):
            self.block_scalars.add(path)
            if node.style == ">":
                self.folded.add(path)
        return self._text(str(node.value), path)

    def _text(self, text: str, path: Path_, of: str = "text") -> str:
        """A string of the YAML, with each surrogate pair its escapes wrote (``"\\ud83d\\ude00"``,
        as JSON writes 😀) made the character it stands for; a lone surrogate left (which no
        text can hold: encoding it fails, so a task could never store or send it) is noted
        in :attr:`problems`."""
        if not SURROGATE.search(text):
            return text
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        lone = SURROGATE.search(text)
        if lone is not None:
            self.problems.append(
                (
                    path,
                    f"the {of} holds \\u{ord(lone.group()):04x} at character {lone.start() + 1}, "
                    f"{HALF_SURROGATE} (write the character itself, or both halves)",
                )
            )
            # The template is refused; the text is kept escaped, so that no message or path
            # quoting it holds what cannot be encoded.
            return _escaped(text)
        return text

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
        if lineno > 1 and path not in self.merged:
            return self._flow_line(line, col, lineno) or (line, col)
        return line, col

    def _flow_line(self, line: int, col: int, lineno: int) -> tuple[int, int] | None:
        """1-based (line, column) where line ``lineno`` of a flow scalar's text (plain,
        '…' or "…") that starts at ``line``, ``col`` begins; None when it was not found.

        The text's line breaks come from ``\\n`` (and the other escapes of a line break) in a
        double-quoted scalar, and from blank lines, which folding keeps: a single line break
        between two rows of the source folds into a space. Jinja counts ``\\r\\n`` once."""
        row, at = line - 1, col - 1
        if row >= len(self.lines):
            return None
        text = self.lines[row]
        quote = text[at] if at < len(text) and text[at] in "\"'" else ""
        at += 1 if quote else 0
        breaks, after_cr = 0, False  # line breaks the text has so far

        def produce(char: str) -> bool:
            """Count one character of the text; True when line ``lineno`` starts after it."""
            nonlocal breaks, after_cr
            if char == "\r" or (char == "\n" and not after_cr):
                breaks += 1
            after_cr = char == "\r"
            return breaks >= lineno - 1 and char in "\r\n"

        while row < len(self.lines):
            text = self.lines[row]
            continued = False  # the row ends in an escaped line break (no folding)
            while at < len(text):
                char = text[at]
                if quote == "'" and char == "'":
                    if text[at + 1 : at + 2] != "'":
                        return None  # the scalar ended first
                    at += 2
                    produce("'")
                    continue
                if quote == '"' and char == '"':
                    return None
                if quote == '"' and char == "\\":
                    code = text[at + 1 : at + 2]
                    if not code:
                        continued = True
                        break
                    size = {"x": 2, "u": 4, "U": 8}.get(code, 0)
                    digits = text[at + 2 : at + 2 + size]
                    if size:
                        try:
                            made = chr(int(digits, 16))
                        except ValueError:
                            made = "?"
                    else:
                        made = {"n": "\n", "r": "\r", "L": "\u2028", "P": "\u2029"}.get(code, code)
                    at += 2 + size
                    if produce(made):
                        return row + 1, at + 1
                    continue
                at += 1
                produce(char)
            # The row ended: the next row that is not blank goes on with the text.
            row, at, blanks = row + 1, 0, 0
            while row < len(self.lines) and not self.lines[row].strip():
                blanks += 1
                if breaks + blanks >= lineno:
                    return row + 1, 1  # an empty line of the text
                row += 1
            if row >= len(self.lines):
                return None
            rest = self.lines[row]
            at = len(rest) - len(rest.lstrip())
            for _ in range(blanks):
                produce("\n")
            if blanks == 0 and not continued:
                produce(" ")
            if breaks >= lineno - 1:
                return row + 1, at + 1
        return None

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
        for path, message in source.problems:
            self.add(path, message)

    def add(self, path: Path_, message: str, at: tuple[int, int] | None = None) -> None:
        line, col = at or self.src.where(path)
        self.problems.append(TemplateProblem(self.src.file, line, col, format_path(path), message))

    def mapping(self, value: Any, path: Path_, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"{what} must be a mapping, got {describe(value)}")
        return None

    def keys(
        self,
        data: dict[str, Any],
        path: Path_,
        allowed: tuple[str, ...],
        hints: Mapping[str, str] | None = None,
    ) -> None:
        """Report each key of ``data`` not in ``allowed``, with the hint ``hints`` has for it
        (another dialect's spelling, say) or else the allowed key closest to it."""
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                if hints is not None and str(key) in hints:
                    suggestion = f": {hints[str(key)]}"
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

    def model(self, data: dict[str, Any], path: Path_) -> str | None:
        """The model named at ``data["model"]`` (None: none), reported when it names none
        (:func:`~orchestra.domain.model_name_problem`)."""
        name = self.string(data, path, "model")
        why = None if name is None else model_name_problem(name)
        if why is not None:
            hint = " (a task's model field chooses one per task)" if "rendered" in why else ""
            self.add((*path, "model"), f"model {why}{hint}")
            return None
        return cast("str | None", name)

    def duration(
        self, data: dict[str, Any], path: Path_, key: str, maximum: float = MAX_TIMEOUT
    ) -> float | None:
        """The duration at ``data[key]`` in seconds, more than 0 and at most ``maximum``;
        None (with the problem reported) when it is not one, or when it is absent."""
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
        if seconds > maximum:
            self.add(
                (*path, key),
                f"{key} must be at most {_in_words(maximum)}, got {data[key]!r}",
            )
            return None
        return seconds


def _in_words(seconds: float) -> str:
    """86400 -> "24h (86400 seconds)"."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit} ({seconds:g} seconds)"
    return f"{seconds:g} seconds"


def describe(value: Any) -> str:
    """A value's kind in words (by isinstance: ruamel's ints and floats are subclasses)."""
    if value is None:
        return "nothing"
    for kind, words in (
        (bool, "a boolean"),  # before int: a bool is one
        (dict, "a mapping"),
        (list, "a list"),
        (str, "a string"),
        (int, "an integer"),
        (float, "a number"),
    ):
        if isinstance(value, kind):
            return words
    return type(value).__name__
