"""What a Jinja template or expression refers to, found statically from its syntax tree.

Used at load time to reject a template that names an unknown parameter, an unknown step or a
step that runs later, before any task runs it; and one that uses a filter or test that does
not exist, or another template (``include``, ``extends``, ``import``): Jinja checks a filter
inside ``{% if %}`` only when it runs, and templates have no other templates to load.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from jinja2 import meta, nodes

from orchestra.templating.render import environment, lone_expression


class References(msgspec.Struct, frozen=True):
    """Top-level names a source uses, and the ``params.X`` / ``steps.Y`` it reads."""

    names: frozenset[str]
    params: frozenset[str]
    steps: frozenset[str]
    #: The first line (1-based, in the source) of each name, ``params.X`` and ``steps.Y``.
    lines: dict[str, int] = msgspec.field(default_factory=dict)
    #: (line, message) for each unknown filter or test and each use of another template.
    problems: tuple[tuple[int, str], ...] = ()


_OTHER_TEMPLATES: dict[type[nodes.Node], str] = {
    nodes.Include: "include",
    nodes.Extends: "extends",
    nodes.Import: "import",
    nodes.FromImport: "import",
}


def _problems(tree: nodes.Template, env: Any) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    kinds: tuple[type[nodes.Node], ...] = (nodes.Filter, nodes.Test, *_OTHER_TEMPLATES)
    node: nodes.Node
    for node in tree.find_all(kinds):
        if isinstance(node, nodes.Filter) and node.name not in env.filters:
            out.append((node.lineno, f"No filter named {node.name!r}."))
        elif isinstance(node, nodes.Filter) and node.name in _NAMES_ANOTHER:
            named = _named(node)
            kind, known = ("filter", env.filters) if node.name == "map" else ("test", env.tests)
            if named is not None and named not in known:
                out.append((node.lineno, f"No {kind} named {named!r} (in {node.name})."))
        elif isinstance(node, nodes.Test) and node.name not in env.tests:
            out.append((node.lineno, f"No test named {node.name!r}."))
        elif type(node) in _OTHER_TEMPLATES:
            tag = _OTHER_TEMPLATES[type(node)]
            out.append(
                (node.lineno, f"{{% {tag} %}} is not available: a template cannot load others")
            )
    return sorted(out)


#: Filters whose argument names another filter (``map('upper')``) or a test
#: (``select('odd')``, ``selectattr('x', 'odd')``): Jinja looks it up only as it runs.
_NAMES_ANOTHER = {"map": 0, "select": 0, "reject": 0, "selectattr": 1, "rejectattr": 1}


def _named(node: nodes.Filter) -> str | None:
    """The filter or test name ``node``'s argument gives as written (None: none, or not
    written out: a variable)."""
    at = _NAMES_ANOTHER[node.name]
    if node.name == "map" and any(k.key == "attribute" for k in node.kwargs):
        return None  # map(attribute='x'): an attribute, not a filter
    if len(node.args) <= at:
        return None
    arg = node.args[at]
    return arg.value if isinstance(arg, nodes.Const) and isinstance(arg.value, str) else None


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
    lines: dict[str, int] = {}
    problems = _problems(tree, env)
    # steps.a.get('output'), steps.a.items(): a mapping's methods, called, not a field.
    called = {id(call.node) for call in tree.find_all(nodes.Call)}
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        if isinstance(node, nodes.Name):
            if node.name in names:
                lines.setdefault(node.name, node.lineno)
            continue
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        target = node.node
        if isinstance(target, nodes.Name) and target.name in found:
            key = _key(node)
            if key is not None:
                found[target.name].add(key)
                lines.setdefault(f"{target.name}.{key}", node.lineno)
        elif (
            _names_a_step(target)
            and id(node) not in called
            and (field := _key(node)) not in (None, STEP_FIELD)
        ):
            assert isinstance(target, nodes.Getattr | nodes.Getitem)
            problems.append(
                (
                    node.lineno,
                    f"steps.{_key(target)}.{field}: a step's only field is "
                    f"'{STEP_FIELD}' (steps.{_key(target)}.{STEP_FIELD})",
                )
            )
    return References(
        names=names,
        params=frozenset(found["params"]),
        steps=frozenset(found["steps"]),
        lines=lines,
        problems=tuple(sorted(problems)),
    )


#: What ``steps.<id>`` holds of a step that ran: its output, nothing else.
STEP_FIELD = "output"


def _names_a_step(node: nodes.Node) -> bool:
    """Whether ``node`` is ``steps.<id>`` (or ``steps['<id>']``)."""
    return (
        isinstance(node, nodes.Getattr | nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and node.node.name == "steps"
        and _key(node) is not None
    )
