"""The bounded sandbox: escapes and exhaustion tricks fail fast with a clear reason."""

from __future__ import annotations

import time

import pytest

from orchestra.config import LimitSettings
from orchestra.errors import RenderError
from orchestra.templating import sandbox
from orchestra.templating.render import evaluate, render_text

SCOPE = {"params": {"text": "hello", "n": 3, "items": ["a", "b"]}}

TRICKS = [
    ("{{ 'a' * 10**9 }}", "max_render_chars"),
    ("{{ [1] * 10**9 }}", "max_render_chars"),
    ("{{ 9**9999999 }}", "bits"),
    ("{{ params.text|center(10**8) }}", "max_render_chars"),
    ("{{ params.text.center(10**8) }}", "max_render_chars"),
    ("{{ params.text.rjust(10**8) }}", "max_render_chars"),
    ("{{ '{:>100000000}'.format(params.text) }}", "max_render_chars"),
    ("{{ '%100000000s' % params.text }}", "max_render_chars"),
    ("{{ '%*s' % (100000000, 'x') }}", "not allowed"),
    ("{{ '%100000000s'|format(params.text) }}", "max_render_chars"),
    ("{{ ('x' * 100000)|replace('x', 'y' * 1000) }}", "max_render_chars"),
    ("{{ ('x' * 100000).replace('x', 'y' * 1000) }}", "max_render_chars"),
    # Refused before the 100 MB string is built, not at the output cap after.
    ("{{ ('x' * 100000).replace('x', 'y' * 1000, -1) }}", "the replaced text"),
    ("{{ ('x' * 100000)|replace('x', 'y' * 1000, -1) }}", "the replaced text"),
    ("{{ range(100000)|join('x' * 1000) }}", "max_render_chars"),
    ("{{ ('x\n' * 1000)|indent(100000) }}", "max_render_chars"),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "max_render_chars",
    ),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "max_render_chars"),
    (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "render_timeout",
    ),
    (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        "render_timeout",
    ),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ params.__class__.__init__.__globals__ }}", "unsafe"),
    ("{{ cycler.__init__.__globals__.os }}", "unsafe"),
    ("{{ params.items.append(1) }}", "unsafe"),
]


@pytest.fixture(autouse=True)
def short_timeout() -> object:
    sandbox.configure(LimitSettings(render_timeout=0.5))
    yield
    sandbox.configure(LimitSettings())


@pytest.mark.parametrize(("source", "reason"), TRICKS)
def test_each_trick_fails_fast_with_its_reason(source: str, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderError) as caught:
        render_text(source, SCOPE, what="steps.a.prompt")
    assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert reason in message or "undefined" in message, message


def test_ordinary_templates_render_as_before() -> None:
    text = render_text(
        "{% for i in params.items %}{{ loop.index }}. {{ i|upper }}\n{% endfor %}"
        "{{ params.text|center(11) }}|{{ '%5s' % params.n }}|{{ '{:>4}'.format(params.n) }}"
        "|{{ params.items|join(', ') }}|{{ 2**10 }}|{{ 'ab' * 3 }}|{{ params.text ~ '!' }}",
        SCOPE,
        what="t",
    )
    assert text == "1. A\n2. B\n   hello   |    3|   3|a, b|1024|ababab|hello!"
    assert evaluate("params.n * 2", SCOPE, what="x") == 6


#: Single builtin calls that built a huge value in one go, between two deadline checks.
LONG_CALLS = [
    "{{ lipsum(1000000) | length }}",
    "{{ lipsum(5, max=10**7) | length }}",
    "{{ [1] | slice(10**8) | list | length }}",
    "{{ range(10) | batch(10**9, 'x') | list | length }}",
    "{{ ('a' * 10000).translate({97: 'b' * 100000}) | length }}",
    "{{ (1).to_bytes(10**9, 'big') | length }}",
    "{{ 'a'.encode().center(10**9) | length }}",
    "{{ ('a b ' * 1000) | wordwrap(1, wrapstring='x' * 100000) | length }}",
    "{{ ([range(1000) | list] * 2000) | sum(start=[]) | length }}",
]


@pytest.mark.parametrize("source", LONG_CALLS)
def test_a_builtin_that_would_build_a_huge_value_is_refused_before(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderError, match="max_render_chars") as caught:
        render_text(source, SCOPE, what="steps.a.text")
    assert time.monotonic() - started < 0.5, caught.value


def test_filters_and_tests_check_the_deadline() -> None:
    """A run of filters or tests with no call or loop between them reached no check."""
    for source in (
        "{% if params.text | upper %}{% endif %}",
        "{% if params.n is odd %}{% endif %}",
        # Orchestra's own filters too (they were added after Jinja's were wrapped).
        "{% if params.text | lines %}{% endif %}",
        "{% if params.text | chunk(5, 1) %}{% endif %}",
    ):
        with sandbox.inline(0), pytest.raises(sandbox.OutOfSlice):
            render_text(source * 3, SCOPE, what="t")


def test_chunk_refuses_pieces_whose_overlaps_would_pass_the_cap() -> None:
    """chunk(50000, 49999) of 100,000 characters built about 2.5 GB in one call."""
    scope = {"params": {"text": "word " * 20_000}}
    with pytest.raises(RenderError, match="chunk's pieces would be"):
        render_text("{{ params.text | chunk(50000, 49999) | length }}", scope, what="t")
    assert render_text("{{ params.text | chunk(2000, 200) | length }}", scope, what="t") == "56"


def test_sum_still_adds_numbers_lists_and_attributes() -> None:
    scope = {"params": {"rows": [{"n": 1}, {"n": 2}]}}
    text = render_text(
        "{{ [1, 2] | sum }} {{ params.rows | sum(attribute='n') }} "
        "{{ [[1], [2, 3]] | sum(start=[]) }} {{ [{'a': [1]}] | sum(attribute='a', start=[]) }}",
        scope,
        what="t",
    )
    assert text == "3 3 [1, 2, 3] [1]"
