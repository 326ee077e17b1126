"""What a Jinja template or expression refers to, found statically from its syntax tree.

Used at load time to reject a template that names an unknown parameter, an unknown step or a
step that runs later, before any task runs it.
"""

from __future__ import annotations

import functools

import msgspec
from jinja2 import meta, nodes

from orchestra.templating.render import environment, lone_expression


class References(msgspec.Struct, frozen=True):
    """Top-level names a source uses, and the ``params.X`` / ``steps.Y`` it reads."""

    names: frozenset[str]
    params: frozenset[str]
    steps: frozenset[str]


def _key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None  # params[some_variable]: cannot be known statically


@functools.lru_cache(maxsize=2048)
def references(source: str, *, expression: bool = False) -> References:
    """The references of a template (or, with ``expression``, of an expression, bare or in
    one ``{{ }}``).

    Raises:
        jinja2.TemplateSyntaxError: the source is not valid Jinja.
    """
    env = environment()
    if expression:
        source = f"{{{{ ({lone_expression(source) or source}) }}}}"
    tree = env.parse(source)
    names = frozenset(meta.find_undeclared_variables(tree) - set(env.globals))
    found: dict[str, set[str]] = {"params": set(), "steps": set()}
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        target = node.node
        if isinstance(target, nodes.Name) and target.name in found:
            key = _key(node)
            if key is not None:
                found[target.name].add(key)
    return References(
        names=names, params=frozenset(found["params"]), steps=frozenset(found["steps"])
    )
