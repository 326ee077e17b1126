"""Rendering prompts and outputs in a sandboxed Jinja environment.

The environment is immutable-sandboxed (no attribute escapes, no mutation of passed-in data)
with StrictUndefined, so a misspelt name fails the step loudly instead of rendering nothing.
Compiled templates are cached by their source text: each distinct prompt compiles once.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestra.errors import HALF_SURROGATE, SURROGATE, RenderError
from orchestra.templating.plain import plain
from orchestra.templating.sandbox import (
    BoundedSandbox,
    budget,
    check_data_size,
    check_size,
    render_capped,
    ticking,
)

# Where a bare expression is expected, these mark text with placeholders or tags instead.
_TEMPLATE_SYNTAX = re.compile(r"\{[{%#]")

# A fenced block, whatever its language tag (```json, ```python, none).
_FENCE = re.compile(r"```[^\n`]*\n?(?P<body>.*?)```", re.DOTALL)
_STARTS = re.compile(r"[\[{]")
#: How many places where a JSON value may start are tried before the text is given up on.
MAX_STARTS = 32
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def _kind(value: Any) -> str:
    """What a value is, in a built-in's error: "none", "a list", "an int"."""
    if value is None:
        return "none"
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _text_for(name: str, value: Any) -> str:
    """``value``, which the built-in filter ``name`` takes as text only (a list or none
    written as text would be split or matched as its Python form, quietly)."""
    if not isinstance(value, str):
        raise RenderError(
            f"{name} takes text, got {_kind(value)} (write `| string` first to use its text, "
            "or `| join` a list)"
        )
    return value


def choose(answer: Any, options: Any) -> Any:
    """Map a model's free-text answer onto one of ``options`` (case-insensitive).

    An exact match wins; otherwise the option that appears first in the answer as a whole
    word, the longest one when several start there ("C++" over "C", "bug report" over
    "bug"). The option is returned as given (``5``, not ``"5"``). Fails when the answer names
    none of them, so a task never returns an invented label.
    """
    if not isinstance(answer, str | int | float) or isinstance(answer, bool):
        raise RenderError(f"choose takes an answer that is text or a number, got {_kind(answer)}")
    text = str(answer).strip()
    if isinstance(options, str | bytes | Mapping) or not isinstance(options, Iterable):
        raise RenderError(f"choose takes a list of options, got {_kind(options)}")
    options = list(options)
    if not options:
        raise RenderError("choose was given no options (an empty list): there is nothing to choose")
    labels = [str(o) for o in options]
    for option, label in zip(options, labels, strict=True):
        if text.strip(" .!\"'`*").lower() == label.lower():
            return option
    found = []
    for index, label in enumerate(labels):
        match = re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text, re.IGNORECASE)
        if match:
            found.append((match.start(), -len(label), index))
    if not found:
        raise RenderError(
            f"the model answered {text[:200]!r}, which is none of: {', '.join(labels)}"
        )
    return options[min(found)[2]]


def from_json(text: Any) -> Any:
    """Parse JSON from a model's reply, tolerating a fenced ```json block around it."""
    try:
        return parse_json_text(text)
    except ValueError as exc:
        raise RenderError(f"the model's reply is not JSON ({exc}): {str(text)[:200]!r}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number, which JSON does not have")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number, which JSON does not have")
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)


class _NotHere(Exception):
    """No JSON value starts at this place (its first character is already wrong)."""


def _decode_at(raw: str, start: int, *, alone: bool = True) -> tuple[Any, int]:
    """The JSON value starting at ``start``, and where it ends; words after it are fine,
    another JSON value straight after it is not, when it must be ``alone`` (without a schema:
    which of the two would be the answer?).

    Raises:
        _NotHere: the text at ``start`` is not the beginning of a JSON value.
        ValueError: it is, but the value is broken, too deep or followed by another.
    """
    try:
        value, end = _DECODER.raw_decode(raw, start)
    except json.JSONDecodeError as exc:
        after = raw[start + 1 :]
        if exc.pos <= start + 1 + len(after) - len(after.lstrip()):
            raise _NotHere(exc.msg) from None  # "[see below]": words in brackets
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None
    rest = raw[end:].lstrip()
    if alone and rest[:1] in ("{", "["):
        try:
            _DECODER.raw_decode(rest)
        except (ValueError, RecursionError):
            return value, end
        raise ValueError(
            f"the text holds more than one JSON value (another starts at char "
            f"{len(raw) - len(rest)}); give one"
        )
    return value, end


def lone_surrogate(value: Any) -> str | None:
    """The escape (``\\ud800``) of the first lone UTF-16 surrogate in ``value``'s strings
    (keys too), or None: no text can hold one, so a value with it could never be stored or
    sent to a model."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = SURROGATE.search(item)
            if found:
                return f"\\u{ord(found.group()):04x}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json_text(text: Any, fits: Callable[[Any], bool] | None = None) -> Any:
    """JSON out of text, as :func:`_parse_json_text` finds it; one whose strings hold a
    lone surrogate escape (``"\\ud800"``, which Python's decoder lets through) is refused.
    With ``fits`` (a schema's check), the first value found that fits is the answer
    ("Note [1]: the answer is {...}" gives the object), else the first value found.

    Raises:
        ValueError: no JSON value, a broken one, or one holding a lone surrogate.
    """
    value = _parse_json_text(text, fits)
    lone = lone_surrogate(value) if isinstance(value, str | dict | list) else None
    if lone is not None:
        raise ValueError(f"a string in it holds {lone}, {HALF_SURROGATE}")
    return value


def _parse_json_text(text: Any, fits: Callable[[Any], bool] | None = None) -> Any:
    """JSON out of text that may wrap it in a fenced block (of any language) or in words.

    The value is looked for at each ``{`` and ``[`` in turn (at most :data:`MAX_STARTS` of
    them): "The answer [see below] is {...}" finds the object. A value that starts well but
    is broken stops the search, so that an object inside a broken one is not taken for the
    answer. Failing those, the whole text may be one value (``42``, ``"yes"``).

    Raises:
        ValueError: there is no JSON value in the text, it is broken, nests too deeply, holds
            NaN or Infinity, or is followed straight away by a second value.
    """
    raw = str(text)
    fenced = _FENCE.search(raw)
    if fenced:
        raw = fenced.group("body")
    raw = raw.strip()
    first: str | None = None
    found: list[Any] = []  # the values that do not fit, the first of them
    past = 0  # the end of the last value found: a value inside it is not an answer
    for n, match in enumerate(_STARTS.finditer(raw)):
        if n == MAX_STARTS:
            break
        if match.start() < past:
            continue
        try:
            value, past = _decode_at(raw, match.start(), alone=fits is None)
        except _NotHere as exc:
            first = first or f"{exc}: line 1 column {match.start() + 1} (char {match.start()})"
            continue
        except ValueError:
            if found:
                break  # broken after one that did not fit: that one, for the schema to judge
            raise
        if fits is None or fits(value):
            return value
        found = found or [value]
    if found:
        return found[0]
    try:
        return _DECODER.decode(raw)  # one value and nothing else
    except json.JSONDecodeError as exc:
        raise ValueError(first or str(exc)) from None
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None


def chunk(text: Any, size: int = 2000, overlap: int = 200) -> list[str]:
    """Split text into pieces of at most ``size`` characters, each starting ``overlap``
    characters before the previous one ended, preferring to cut at a paragraph, line or
    sentence end so that no piece stops mid-word when it can be helped."""
    raw = _text_for("chunk", text)
    for name, number in (("size", size), ("overlap", overlap)):
        if not isinstance(number, int) or isinstance(number, bool):
            raise RenderError(f"chunk's {name} must be a whole number, got {_kind(number)}")
    if size < 1 or not 0 <= overlap < size:
        raise RenderError(f"chunk needs size >= 1 and 0 <= overlap < size, got {size}, {overlap}")
    # The pieces repeat their overlaps: about len * size / (size - overlap) characters in all.
    check_size(len(raw) * size // (size - overlap), "chunk's pieces")
    pieces, start = [], 0
    while start < len(raw):
        end = min(start + size, len(raw))
        if end < len(raw):
            window = raw[start:end]
            cut = max(window.rfind(sep) for sep in ("\n\n", "\n", ". ", " "))
            if cut > size // 2:
                end = start + cut + 1
        pieces.append(raw[start:end].strip())
        if end >= len(raw):
            break
        start = max(end - overlap, start + 1)
    return [p for p in pieces if p]


def lines(text: Any) -> list[str]:
    """Split a reply into its non-empty lines, without list bullets or numbering."""
    out = []
    for line in _text_for("lines", text).splitlines():
        item = _BULLET.sub("", line).strip()
        if item:
            out.append(item)
    return out


def _measured(value: Any) -> Any:
    """Each ``{{ }}``'s value, refused before it is written when its text would be over the
    cap (a list of one long string repeated is cheap to make, not to write)."""
    if isinstance(value, list | tuple | dict | set | frozenset):
        check_data_size(value, "a value's text")
    return value


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja environment every template renders in."""
    env = BoundedSandbox(
        autoescape=False,
        keep_trailing_newline=False,
        finalize=_measured,
    )
    ours = {"choose": choose, "from_json": from_json, "lines": lines, "chunk": chunk}
    env.filters.update({name: ticking(fn) for name, fn in ours.items()})  # as Jinja's own
    return env


@functools.lru_cache(maxsize=2048)
def compile_text(source: str) -> jinja2.Template:
    """Compile a Jinja template string once (cached by its text).

    Raises:
        jinja2.TemplateSyntaxError: invalid syntax, or an unknown filter or test.
    """
    template = environment().from_string(source)
    # Jinja keeps a template's globals as a ChainMap over the environment's, and copies them
    # into a new dict at every render: flattened once here (the environment's globals never
    # change after it is built), a short prompt renders in half the time (13 -> 6 us).
    template.globals = dict(template.globals)
    return template


class NotAnExpression(jinja2.TemplateSyntaxError):
    """Text with placeholders or tags where one expression belongs."""

    def __init__(self, lineno: int) -> None:
        super().__init__(
            "this field takes an expression (e.g. steps.a.output | tojson), with or without "
            "{{ }} around it, not text with placeholders, several {{ }} or {% %} tags",
            lineno,
        )


def lone_expression(source: str) -> str | None:
    """The expression inside ``source`` when it is one ``{{ expression }}`` and nothing else.

    Whitespace around the braces is allowed; braces inside the expression (a nested mapping,
    a string holding ``}}``) are read as Jinja reads them. Returns None for anything else:
    text around the placeholder, several placeholders, tags, comments or broken syntax.
    """
    try:
        tokens = [(kind, value) for _, kind, value in environment().lex(source)]
    except jinja2.TemplateSyntaxError:
        return None
    while tokens and tokens[0][0] == "data" and not tokens[0][1].strip():
        tokens.pop(0)
    while tokens and tokens[-1][0] == "data" and not tokens[-1][1].strip():
        tokens.pop()
    if len(tokens) < 2 or tokens[0][0] != "variable_begin" or tokens[-1][0] != "variable_end":
        return None
    inside = tokens[1:-1]
    if any(kind in ("variable_end", "data") for kind, _ in inside):
        return None  # "{{ a }}{{ b }}" or "{{ a }} b {{ c }}"
    return "".join(value for _, value in inside).strip()


class _Expression:
    """A compiled ``{{ expression }}`` whose value is kept as it is."""

    def __init__(self, expr: str) -> None:
        self.expr = expr.strip()
        self.fn = environment().compile_expression(self.expr, undefined_to_none=False)

    def __call__(self, scope: Mapping[str, Any]) -> Any:
        value = self.fn(**scope)
        if isinstance(value, jinja2.Undefined):
            value._fail_with_undefined_error()
        return value


@functools.lru_cache(maxsize=2048)
def compile_expression(source: str) -> _Expression:
    """Compile an expression (``when``, ``over``, ``input``, ``format``) once, cached by its
    text. It may be bare (``steps.a.output``) or one ``{{ }}`` (``{{ steps.a.output }}``).

    Raises:
        NotAnExpression: the text is a template (text with placeholders, tags), not one
            expression.
        jinja2.TemplateSyntaxError: the text is not a valid Jinja expression.
    """
    inside = lone_expression(source)
    if inside is not None:
        return _Expression(inside)
    try:
        return _Expression(source)
    except jinja2.TemplateSyntaxError as exc:
        # Checked only once the expression fails: "'{{' in x" is a fine bare expression.
        if _TEMPLATE_SYNTAX.search(source):
            raise NotAnExpression(exc.lineno) from exc
        raise


def evaluate(source: str, scope: Mapping[str, Any], *, what: str) -> Any:
    """Evaluate a bare expression and return its value.

    Raises:
        RenderError: naming ``what`` was evaluated and why it failed.
    """
    try:
        with budget():
            return plain(compile_expression(source)(scope))
    except RenderError as exc:
        raise RenderError(f"cannot evaluate {what}: {exc.message}") from exc
    except Exception as exc:
        raise RenderError(f"cannot evaluate {what}: {_explain(exc, scope)}") from exc


@functools.lru_cache(maxsize=1024)
def compile_output(source: str) -> _Expression | jinja2.Template:
    """Compile an ``output`` string: a bare expression keeps its value, else it renders text.

    Raises:
        jinja2.TemplateSyntaxError: the text is not valid Jinja.
    """
    inside = lone_expression(source)
    if inside is not None:
        return _Expression(inside)
    return compile_text(source)


#: Jinja's word for a missing key of a mapping (``params``, a step's output object).
_NO_KEY = re.compile(r"^'dict object' has no attribute '(?P<name>[A-Za-z_][A-Za-z0-9_]*)'$")


def _explain(exc: Exception, scope: Mapping[str, Any]) -> str:
    if isinstance(exc, jinja2.UndefinedError):
        missing = _NO_KEY.match(exc.message or "")
        params = scope.get("params")
        owner = getattr(exc, "owner", None)
        if missing and params is not None and owner is params:
            # Most often an optional parameter left out that has no default.
            name = missing["name"]
            return (
                f"undefined value: {exc.message} (if {name} is a parameter: one that is "
                f"optional, has no default and was left out is not set; give it a default, "
                f"or write params.{name} | default('') or test params.{name} is defined)"
            )
        return f"undefined value: {exc.message}"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"Jinja syntax error on line {exc.lineno}: {exc.message}"
    if isinstance(exc, MemoryError):
        return "it ran out of memory ([limits] render_memory_mb)"
    return f"{type(exc).__name__}: {exc}"


def render_text(source: str, scope: Mapping[str, Any], *, what: str) -> str:
    """Render a Jinja template string.

    Raises:
        RenderError: naming ``what`` was being rendered and why it failed.
    """
    try:
        text = render_capped(compile_text(source), scope)
    except RenderError:
        raise
    except Exception as exc:  # any error a template can raise is the template's fault
        raise RenderError(f"cannot render {what}: {_explain(exc, scope)}") from exc
    lone = SURROGATE.search(text)
    if lone is not None:  # '\ud800' in a Jinja string, '%c' % 55296: no model can be sent it
        raise RenderError(
            f"cannot render {what}: the text holds \\u{ord(lone.group()):04x} at character "
            f"{lone.start() + 1}, {HALF_SURROGATE}"
        )
    return text


def render_output(
    spec: str | dict[str, str], scope: Mapping[str, Any], where: str = "output"
) -> Any:
    """Evaluate a template's ``output``: a string, or a mapping of names to strings.

    Raises:
        RenderError: naming the output field (``output.NAME`` in a mapping) and why it
            failed.
    """
    if isinstance(spec, dict):
        return {name: render_output(text, scope, f"{where}.{name}") for name, text in spec.items()}
    try:
        compiled = compile_output(spec)
        if isinstance(compiled, _Expression):
            with budget():
                return plain(compiled(scope))
        return render_capped(compiled, scope)
    except RenderError as exc:
        raise RenderError(f"cannot render {where}: {exc.message}") from exc
    except Exception as exc:
        raise RenderError(f"cannot render {where}: {_explain(exc, scope)}") from exc
