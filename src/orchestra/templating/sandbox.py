"""The Jinja sandbox, bounded: a template can neither escape nor exhaust the process.

Jinja's ImmutableSandboxedEnvironment blocks attribute escapes (``''.__class__.__mro__``)
and changing passed-in data, but not resource exhaustion: ``'a' * 10**9``, ``9**9999999``,
``|center(10**8)``, ``'{:>100000000}'.format(x)`` or nested loops each take the process's
memory or CPU in one expression. The mechanism here, chosen so that ordinary templates pay
almost nothing:

* **Size checks before the work**, on every operation that can make a large value from small
  ones: the ``*``, ``**``, ``+`` and ``%`` operators, the string methods and filters that
  pad or repeat (``center``, ``ljust``, ``rjust``, ``zfill``, ``indent``, ``replace``,
  ``join``, ``format``), format specs' widths. A result longer than ``max_render_chars``
  (or an integer power over 100,000 bits) is refused before it is computed.
* **``~`` (concatenation)** is checked after each join, so a loop that doubles a string stops
  at the limit instead of at the machine's memory.
* **Builtins that take a size** are checked before they run too: ``lipsum``'s words,
  ``slice``'s count, ``batch``'s padding, ``wordwrap``'s wrap string, ``sum`` over lists
  (made linear: it was quadratic), ``translate``'s table, ``int.to_bytes``, and the padding
  methods of bytes. ``tojson``, ``string``, ``pprint`` and the value of every ``{{ }}`` are
  measured first, with a walk that stops at the cap: a list that holds one large value many
  times is refused instead of written out.
* **A deadline.** Every call, filter, test and loop iteration (loops are wrapped when a
  template is compiled) checks the render's deadline (``render_timeout``), so no loop nesting
  or macro recursion runs longer than that. ``range`` is the sandbox's own, capped at 100,000
  items.
* **The output** is counted as it is produced and cut off at ``max_render_chars``.

**A slice on the event loop.** Inside ``inline(seconds)`` the deadline is the end of the
slice instead, and passing it raises ``OutOfSlice`` (a BaseException, so that no template
error handler swallows it): ``orchestra.templating.isolation`` then runs the render again in a
render process, where the full ``render_timeout`` applies.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from jinja2 import StrictUndefined, Undefined, nodes, pass_environment, pass_eval_context
from jinja2.exceptions import UndefinedError
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum, missing
from jinja2.visitor import NodeTransformer

from orchestra.config import LimitSettings
from orchestra.errors import RenderError

#: Largest integer a power may make, in bits.
MAX_POWER_BITS = 100_000
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_WIDENING = {"center", "ljust", "rjust", "zfill"}
#: The longest word ``lipsum`` uses, and the space after it.
_LIPSUM_WORD = 13


class OutOfSlice(BaseException):
    """A render outran the slice it was given inside ``inline``."""


class _Budget:
    def __init__(self, limits: LimitSettings) -> None:
        now = time.monotonic()
        self.deadline = now + limits.render_timeout
        self.timeout = limits.render_timeout
        self.max_chars = limits.max_render_chars
        slice_ends = _slice_ends.get()
        self.inline = False
        if slice_ends is not None and slice_ends < self.deadline:
            self.deadline, self.inline = slice_ends, True


_limits = LimitSettings()
_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)
_slice_ends: contextvars.ContextVar[float | None] = contextvars.ContextVar("slice", default=None)


def configure(limits: LimitSettings) -> None:
    """Set the limits renders are held to (the service does this at startup)."""
    global _limits
    _limits = limits


@contextmanager
def budget() -> Iterator[_Budget]:
    """A fresh deadline and size cap for one render."""
    current = _Budget(_limits)
    token = _budget.set(current)
    try:
        yield current
    finally:
        _budget.reset(token)


@contextmanager
def inline(seconds: float) -> Iterator[None]:
    """Renders inside get ``seconds`` (less if their own deadline comes first); past that
    they raise ``OutOfSlice``."""
    token = _slice_ends.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _slice_ends.reset(token)


def max_value_size() -> int:
    """The largest value, as JSON bytes, an expression may give (``[limits]
    max_result_bytes``: no result may be larger)."""
    return _limits.max_result_bytes


def _current() -> _Budget:
    return _budget.get() or _Budget(_limits)


def tick() -> None:
    """Fail the render if it has run past its deadline."""
    b = _budget.get()
    if b is not None and time.monotonic() > b.deadline:
        if b.inline:
            raise OutOfSlice
        raise RenderError(f"rendering took longer than {b.timeout:g}s ([limits] render_timeout)")


def check_size(size: int, what: str) -> None:
    """Refuse to make a value of ``size`` characters or items over the cap."""
    cap = _current().max_chars
    if size > cap:
        raise RenderError(
            f"{what} would be {size} long; the limit is {cap} ([limits] max_render_chars)"
        )


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple) else None


def _check_percent(fmt: str, args: Any) -> None:
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for number in (width, precision):
            if number == "*":
                raise RenderError("'*' widths in % formats are not allowed")
            if number:
                check_size(int(number), "a % format width")
    check_size(len(fmt) + len(str(args)), "a % format")


def _check_format_spec(fmt: str) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if not spec:
            continue
        if "{" in spec:
            raise RenderError("nested fields in format specs are not allowed")
        for number in re.findall(r"\d+", spec):
            check_size(int(number), "a format width")


def check_replace(text: str, old: str, new: str, count: Any = None) -> None:
    """Refuse a ``replace`` whose result would be over the cap."""
    hits = (len(text) + 1) if not old else text.count(old)
    if count is not None and int(count) >= 0:  # a negative count replaces every one
        hits = min(hits, int(count))
    check_size(len(text) + hits * max(0, len(new) - len(old)), "the replaced text")


def check_join(items: list[Any], separator: str) -> None:
    """Refuse a ``join`` whose result would be over the cap."""
    size = sum(len(str(i)) for i in items) + len(separator) * max(0, len(items) - 1)
    check_size(size, "the joined text")


#: What the size walk looks into: text, and containers; any other item counts as the one
#: character its container already counted for it.
_WALKED = (str, bytes, Mapping, list, tuple, set, frozenset, Undefined)


def check_data_size(value: Any, what: str) -> None:
    """Refuse a value whose text (``str``, ``tojson``) would be over the cap, before it is
    made: the walk counts each item and each character of text, and stops at the cap, so a
    list holding one large string a thousand times costs no more to check than the cap."""
    cap = _current().max_chars
    size, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str | bytes):
            size += len(item) + 2
        elif isinstance(item, Mapping):
            size += 2 + 2 * len(item)  # a separator and at least a character each
            stack.extend(k for k in item.keys() if isinstance(k, _WALKED))
            stack.extend(v for v in item.values() if isinstance(v, _WALKED))
        elif isinstance(item, list | tuple | set | frozenset):
            size += 2 + 2 * len(item)
            if size <= cap:  # what is past the cap is not looked at
                stack.extend(i for i in item if isinstance(i, _WALKED))
        elif isinstance(item, Undefined):  # a missing name inside a list wrote "Undefined"
            item._fail_with_undefined_error()
        else:
            size += 1
        if size > cap:
            raise RenderError(f"{what} would be over {cap} characters ([limits] max_render_chars)")


def check_translate(text: str, table: Any) -> None:
    """Refuse a ``str.translate`` whose result would be over the cap."""
    longest = 1
    if isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    check_size(len(text) * max(1, longest), "the translated text")


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    """Jinja's ``lipsum``, refused when its words could be over the cap."""
    check_size(int(n) * int(max) * _LIPSUM_WORD, "lipsum's text")
    return str(generate_lorem_ipsum(n=n, html=html, min=min, max=max))


def capped(value: Any) -> Any:
    """``~`` joins, checked after each (the filter the loader wraps them in)."""
    if isinstance(value, str):
        check_size(len(value), "a joined string")
    return value


def counted(iterable: Any) -> Iterator[Any]:
    """A loop's items, with the deadline checked before each."""
    for item in iterable:
        tick()
        yield item


class _Bound(NodeTransformer):
    """Wrap every loop's iterable in ``counted`` and every ``~`` in ``capped``."""

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 - Jinja's visitor names
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_counted", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802
        self.generic_visit(node)
        return nodes.Filter(node, "_capped", [], [], None, None, lineno=node.lineno)


def ticking(fn: Any) -> Callable[..., Any]:
    """``fn`` checking the deadline before it runs (Jinja's pass_context marks are kept)."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        tick()
        return fn(*args, **kwargs)

    return checked


def _sum(base: Callable[..., Any]) -> Callable[..., Any]:
    """``sum`` over lists or tuples in linear time and within the cap (Python's adds each
    item to a new copy of the total: 30,000 lists took minutes)."""

    @pass_environment
    def sum_(env: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
        if not isinstance(start, list | tuple):
            return base(env, iterable, attribute, start)
        if attribute is not None:
            iterable = map(make_attrgetter(env, attribute), iterable)
        total = list(start)
        for item in iterable:
            tick()
            if type(item) is not type(start):
                raise RenderError(
                    f"sum cannot add a {type(item).__name__} to a {type(start).__name__}"
                )
            check_size(len(total) + len(item), "the sum")
            total.extend(item)
        return total if isinstance(start, list) else tuple(total)

    return sum_


def _safe_filters(env: ImmutableSandboxedEnvironment) -> None:
    base = dict(env.filters)

    def center(value: Any, width: int = 80) -> str:
        check_size(int(width), "center's width")
        return str(base["center"](value, width))

    def indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> str:
        pad = len(width) if isinstance(width, str) else int(width)
        text = str(value)
        check_size(len(text) + pad * (text.count("\n") + 1), "the indented text")
        return str(base["indent"](value, width, *args, **kwargs))

    @pass_eval_context
    def replace(ctx: Any, value: Any, old: Any, new: Any, count: Any = None) -> Any:
        check_replace(str(value), str(old), str(new), count)
        return base["replace"](ctx, value, old, new, count)

    @pass_eval_context
    def join(ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        items = list(value)
        check_join(items, str(d))
        return base["join"](ctx, items, d, attribute)

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_percent(str(value), args or kwargs)
        return str(base["format"](value, *args, **kwargs))

    # Each wrapper takes what Jinja's own filter is marked to take (jinja2.utils._PassArg):
    # ``slice`` the evaluation context, ``wordwrap`` the environment.
    @pass_eval_context
    def slice_(ctx: Any, value: Any, slices: Any, fill_with: Any = None) -> Any:
        check_size(int(slices), "slice's count")
        return base["slice"](ctx, value, slices, fill_with)

    def batch(value: Any, linecount: Any, fill_with: Any = None) -> Any:
        if fill_with is not None:
            check_size(int(linecount), "batch's size")
        return base["batch"](value, linecount, fill_with)

    @pass_environment
    def wordwrap(env_: Any, s: Any, width: Any = 79, *args: Any, **kwargs: Any) -> Any:
        wrap = kwargs.get("wrapstring", args[1] if len(args) > 1 else None)
        text = str(s)
        lines = len(text) // max(1, int(width)) + text.count("\n") + 1
        check_size(len(text) + lines * len(str(wrap or "\n")), "the wrapped text")
        return base["wordwrap"](env_, s, width, *args, **kwargs)

    @pass_eval_context  # as Jinja's own is marked
    def tojson(ctx: Any, value: Any, indent: int | None = None) -> str:
        # Jinja's own is made for HTML pages: it escapes ' < > & and every non-ASCII letter
        # (\u0027, \u00e9) and sorts the keys. A prompt gets the JSON as written, in order.
        if indent is not None and (
            not isinstance(indent, int) or isinstance(indent, bool) or not 0 <= indent <= 16
        ):  # json.dumps indents in Python, checking no deadline: 10**6 took 353 MB
            raise RenderError(
                f"tojson's indent must be a whole number from 0 to 16, not {indent!r}"
            )
        from orchestra.templating.plain import plain  # (it reads this module's limits)

        # A lazy sequence (map, select, range, a dict's keys) as the list it gives, its size
        # checked as a list's is (a generator counted as one character).
        data = plain(value)
        check_data_size(data, "tojson's text")
        return json.dumps(data, ensure_ascii=False, indent=indent)

    def measured(name: str) -> Callable[..., Any]:
        original = base[name]
        # A filter marked ``pass_eval_context`` is given the context first (the wrapper keeps
        # the mark): the value is the argument after it.
        at = 1 if getattr(original, "jinja_pass_arg", None) is not None else 0

        def filter_(*args: Any, **kwargs: Any) -> Any:
            check_data_size(args[at], f"{name}'s text")
            return original(*args, **kwargs)

        return functools.update_wrapper(filter_, original)

    env.filters.update(
        center=center,
        indent=indent,
        replace=replace,
        join=join,
        format=format_,
        slice=slice_,
        batch=batch,
        wordwrap=wordwrap,
        sum=_sum(base["sum"]),
        tojson=tojson,
        string=measured("string"),
        pprint=measured("pprint"),
    )
    # Every filter and test checks the deadline, so a chain of them stops at it.
    env.filters.update({name: ticking(fn) for name, fn in env.filters.items()})
    env.tests.update({name: ticking(fn) for name, fn in env.tests.items()})
    env.filters.update(_counted=counted, _capped=capped)
    env.globals["lipsum"] = lipsum


class MissingValue(UndefinedError):
    """An undefined value used, with the mapping (or object) it was looked up on: ``owner``
    (None for a name, ``params.age``'s is ``params``), so its explanation can tell a
    parameter left out from a key an answer lacks."""

    def __init__(self, message: str | None, owner: Any) -> None:
        super().__init__(message)
        self.owner = owner

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent back from a render process without its owner (which need not pickle).
        return (MissingValue, (self.message, None))


class Missing(StrictUndefined):
    """StrictUndefined whose error is a :class:`MissingValue` naming where it was looked up."""

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = missing,
        name: str | None = None,
        exc: type[Exception] = UndefinedError,
    ) -> None:
        super().__init__(hint, obj, name, exc)  # type: ignore[arg-type]
        if exc is not UndefinedError:  # the sandbox's SecurityError for an unsafe attribute
            return
        owner = None if obj is missing else obj

        def make(message: str | None) -> MissingValue:
            return MissingValue(message, owner)

        # Jinja raises ``self._undefined_exception(message)`` for every use of the value.
        self._undefined_exception = make  # type: ignore[assignment]


class _MethodOrUndefined(Missing):
    """A mapping's key left out whose name is one of the mapping's methods: undefined, and
    callable as the method it stands beside."""

    __slots__ = ("method",)
    method: Callable[..., Any]
    # Read by the sandbox and by Jinja before a call (an undefined's attributes fail).
    unsafe_callable = alters_data = False
    jinja_pass_arg = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.method(*args, **kwargs)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the bounds above; a name undefined fails where it is used
    (StrictUndefined); a mapping's keys win over its methods (``params.items`` is the
    parameter called ``items`` when there is one)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(undefined=Missing, **options)
        _safe_filters(self)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        bound: nodes.Template = _Bound().visit(tree)
        return bound

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, dict) and isinstance(argument, str) and argument not in obj:
            # A key left out is undefined; Jinja would try the mapping's attribute next
            # (``params['items']``, ``map(attribute='items')``: its method).
            return self.undefined(obj=obj, name=argument)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if not isinstance(obj, dict):
            return super().getattr(obj, attribute)
        if attribute in obj:
            return obj[attribute]  # a mapping's keys win over its methods
        found = super().getattr(obj, attribute)
        if callable(found) and not isinstance(found, Undefined):
            # A key left out that a method shares its name with (an optional ``items``):
            # undefined, as any key left out (``| default``, ``is defined``), yet called
            # it is the method still (``params.items()``).
            missing = _MethodOrUndefined(obj=obj, name=attribute)
            missing.method = found
            return missing
        return found

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                size = _length(seq)
                if size is not None and isinstance(n, int):
                    check_size(size * n, "a repeated value")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if left.bit_length() * right > MAX_POWER_BITS:
                    raise RenderError(f"a power over {MAX_POWER_BITS} bits is not computed")
        elif operator == "+":
            a, b = _length(left), _length(right)
            if a is not None and b is not None:
                check_size(a + b, "a joined value")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        tick()
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str | bytes | bytearray) and args:
            text = owner if isinstance(owner, str) else str(owner)  # bytes: an upper bound
            if name in _WIDENING and isinstance(args[0], int):
                check_size(args[0], f"{name}'s width")
            elif name == "expandtabs" and isinstance(args[0], int):
                check_size(len(owner) * max(1, args[0]), "the expanded text")
            elif name == "replace" and len(args) >= 2:
                check_replace(text, str(args[0]), str(args[1]), args[2] if len(args) > 2 else None)
            elif name == "join":
                items = list(args[0])
                check_join(items, text)
                args = (items, *args[1:])
            elif name == "translate" and isinstance(owner, str):
                check_translate(text, args[0])
        elif isinstance(owner, int) and name == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            if isinstance(length, int):
                check_size(length, "to_bytes's length")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and isinstance(getattr(value, "__self__", None), str):
            _check_format_spec(value.__self__)  # "{:>100000000}".format(x): refused here
        return wrapped


def render_capped(template: Any, scope: Any) -> str:
    """Render with a fresh budget, the output cut off at the size cap."""
    with budget() as b:
        parts: list[str] = []
        size = 0
        for piece in template.generate(scope):
            size += len(piece)
            if size > b.max_chars:
                raise RenderError(
                    f"the rendered text is longer than {b.max_chars} characters "
                    "([limits] max_render_chars)"
                )
            parts.append(piece)
        return "".join(parts)
