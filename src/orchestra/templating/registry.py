"""The templates a service knows: the built-ins, then the folders from the settings.

A name may be defined once: a clash between two files is reported with both paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from orchestra.errors import TemplateError, TemplateNotFound
from orchestra.templating.loader import load_template
from orchestra.templating.model import Template
from orchestra.templating.source import TemplateProblem

SUFFIXES = (".yaml", ".yml")


def builtin_dir() -> Path:
    """The built-in templates: inside the installed package, or the repository's templates/."""
    packaged = Path(str(resources.files("orchestra"))) / "builtin_templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "templates"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())


class TemplateRegistry:
    """Templates by name. Load once at startup; reload replaces the whole set atomically."""

    def __init__(self, dirs: Iterable[str | Path] = (), *, builtins: bool = True) -> None:
        self.dirs = ([builtin_dir()] if builtins else []) + [Path(d) for d in dirs]
        self._templates: dict[str, Template] = {}

    def load(self) -> list[Template]:
        """Read every folder; on success, replace the known templates.

        Raises:
            TemplateError: carrying every problem of every file (and name clashes).
        """
        found: dict[str, Template] = {}
        problems: list[TemplateProblem] = []
        for folder in self.dirs:
            if not folder.is_dir():
                problems.append(
                    TemplateProblem(str(folder), 1, 1, "", "template folder does not exist")
                )
                continue
            for file in _files(folder):
                try:
                    template = load_template(file)
                except TemplateError as exc:
                    problems.extend(exc.problems)
                    continue
                if template.name in found:
                    other = found[template.name].source
                    problems.append(
                        TemplateProblem(
                            str(file),
                            1,
                            1,
                            "name",
                            f"template name {template.name!r} is already defined in {other}",
                        )
                    )
                    continue
                found[template.name] = template
        if problems:
            raise TemplateError(problems)
        self._templates = found
        return list(found.values())

    def get(self, name: str) -> Template:
        """The template called ``name``.

        Raises:
            TemplateNotFound: no such template.
        """
        try:
            return self._templates[name]
        except KeyError:
            raise TemplateNotFound(f"no template named {name!r}") from None

    def all(self) -> list[Template]:
        """Every known template, by name."""
        return [self._templates[n] for n in sorted(self._templates)]
