"""The templates a service knows: files (the built-ins, then the folders from the settings)
and templates registered through the API, side by side.

A name belongs to one place: a clash between two files, or between a file and a registered
template, is reported with both sources. Registered templates keep every version, so a task
always runs the exact version it was submitted with; file templates keep their current
version, every version this process has seen, and the versions that unfinished tasks were
queued with (stored in the database as they were queued; the catalog adds them at start).
A stored version that this release's checks refuse (an older release stored it) is known as
refused, with the reason: its tasks fail saying why, and it is not offered.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import msgspec

from orchestra.config import LimitSettings
from orchestra.errors import TemplateError, TemplateNotFound
from orchestra.templating.loader import load_template, name_problem
from orchestra.templating.model import Template
from orchestra.templating.source import TemplateProblem

SUFFIXES = (".yaml", ".yml")


def builtin_dir() -> Path:
    """The built-in templates, read as package data: ``orchestra/builtin_templates`` in a
    wheel and in the single binary. A source checkout (an editable install) has no copy in the
    package: there they are the repository's templates/, beside the package's src/ folder."""
    package = resources.files("orchestra")
    packaged = package / "builtin_templates"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(str(package)).parents[1] / "templates"


def template_files(folder: Path) -> list[Path]:
    """The template files in ``folder`` (``*.yaml``, ``*.yml``), as a service reads them."""
    return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())


def held_by(name: str, origin: str, source: str) -> str:
    """What holds a template's name, in words: a built-in template (shipped in the package) or
    the file ``source``."""
    if origin == "builtin":
        return f"template {name!r} is built in (shipped with Orchestra)"
    return f"template {name!r} is defined by the file {source}"


def defined_twice(name: str, where: str) -> str:
    """A template name given a second time, in words (``where``: the first)."""
    return f"template name {name!r} is already defined in {where}"


def builtin_names() -> dict[str, Path]:
    """The built-in templates' names and files, without parsing them (each built-in file is
    named after its template)."""
    return {file.stem: file for file in template_files(builtin_dir())}


class TemplateRegistry:
    """Templates by name (and version)."""

    def __init__(
        self,
        dirs: Iterable[str | Path] = (),
        *,
        builtins: bool = True,
        limits: LimitSettings | None = None,
    ) -> None:
        self.builtin = builtin_dir() if builtins else None
        self.limits = limits
        self.dirs = ([self.builtin] if self.builtin else []) + [Path(d) for d in dirs]
        self._files: dict[str, Template] = {}
        self._seen: dict[tuple[str, int], Template] = {}
        self._api: dict[str, dict[int, Template]] = {}
        self._deleted: set[str] = set()
        # Stored versions this release refuses: name -> version -> the checks' message.
        self._refused: dict[str, dict[int, str]] = {}

    # -- files --------------------------------------------------------------------------------

    def load(self) -> list[Template]:
        """Read every folder; on success, replace the file templates (a reload).

        Raises:
            TemplateError: carrying every problem of every file, and every name clash.
        """
        found: dict[str, Template] = {}
        problems: list[TemplateProblem] = []
        for folder in self.dirs:
            if not folder.is_dir():
                why = "no such folder (named in [templates] dirs)"
                problems.append(TemplateProblem(str(folder), 0, 0, "templates.dirs", why))
                continue
            origin = "builtin" if folder == self.builtin else "file"
            for file in template_files(folder):
                try:
                    template = msgspec.structs.replace(
                        load_template(file, self.limits), origin=origin
                    )
                except TemplateError as exc:
                    problems.extend(exc.problems)
                    continue
                clash = found.get(template.name)
                if clash is not None or template.name in self._api:
                    other = clash.source if clash else "a template registered through the API"
                    problems.append(
                        name_problem(
                            template,
                            defined_twice(template.name, other),
                        )
                    )
                    continue
                found[template.name] = template
        if problems:
            raise TemplateError(problems)
        self._files = found
        for template in found.values():
            self._seen[(template.name, template.version)] = template
        return list(found.values())

    def is_file(self, name: str) -> Template | None:
        """The file template called ``name``, if there is one."""
        return self._files.get(name)

    def add_pinned(self, template: Template) -> None:
        """Know a file template version that a queued task pinned (stored when it was queued).

        A version this process knows already stays: the current file's body wins.
        """
        self._seen.setdefault((template.name, template.version), template)

    def knows(self, name: str, version: int) -> bool:
        """Whether :meth:`for_task` finds this version."""
        return version in self._api.get(name, {}) or (name, version) in self._seen

    # -- registered ---------------------------------------------------------------------------

    def add_registered(self, template: Template, *, deleted: bool = False) -> None:
        """Know a registered version (at startup, or after a registration)."""
        if template.name in self._files:
            raise TemplateError(
                [
                    TemplateProblem(
                        self._files[template.name].source,
                        1,
                        1,
                        "name",
                        f"template name {template.name!r} is also registered through the API "
                        f"(version {template.version}); rename the file or delete the "
                        "registered template",
                    )
                ]
            )
        self._api.setdefault(template.name, {})[template.version] = template
        self._refused.get(template.name, {}).pop(template.version, None)
        if deleted:
            self._deleted.add(template.name)
        else:
            self._deleted.discard(template.name)

    def add_refused(self, name: str, version: int, reason: str, *, deleted: bool = False) -> None:
        """Know a stored version that this release's checks refuse (``reason``: their message):
        not offered, and :meth:`for_task` says why its tasks cannot run."""
        self._refused.setdefault(name, {})[version] = reason
        if deleted:
            self._deleted.add(name)

    def refused(self, name: str, version: int) -> str | None:
        """Why a stored version is refused (:meth:`add_refused`); None when it is not."""
        return self._refused.get(name, {}).get(version)

    def has_refused(self, name: str) -> bool:
        """Whether a stored version of ``name`` is refused."""
        return bool(self._refused.get(name))

    def is_deleted(self, name: str) -> bool:
        """Whether the registered template ``name`` was deleted (no new tasks)."""
        return name in self._deleted

    def delete_registered(self, name: str) -> None:
        """Stop offering ``name`` for new tasks; its versions stay for tasks that use them."""
        self._deleted.add(name)

    # -- lookups ------------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> Template:
        """A template for a new task: the current version, or the version asked for.

        Raises:
            TemplateNotFound: no such template, or no such version.
        """
        if name in self._files:
            template = self._files[name]
            if version is not None and version != template.version:
                raise TemplateNotFound(
                    f"template {name!r} is a file at version {template.version}; version "
                    f"{version} is not available"
                )
            return template
        versions = self._api.get(name)
        if not versions or name in self._deleted:
            raise self._not_found(name)
        chosen = max(versions) if version is None else version
        if self.refused(name, chosen) is not None and chosen not in versions:
            raise TemplateNotFound(self._refusal(name, chosen))
        if chosen not in versions:
            raise TemplateNotFound(
                f"template {name!r} has no version {version} (versions: "
                f"{', '.join(map(str, sorted(versions)))})"
            )
        return versions[chosen]

    def for_task(self, name: str, version: int) -> Template:
        """The exact version a task was submitted with, even if deleted or replaced since.

        Raises:
            TemplateNotFound: that version is gone (a file that changed before a restart, when
                no unfinished task was queued with the old version).
        """
        template = self._api.get(name, {}).get(version) or self._seen.get((name, version))
        if template is not None:
            return template
        if self.refused(name, version) is not None:
            raise TemplateNotFound(self._refusal(name, version))
        raise TemplateNotFound(f"template {name!r} version {version} is no longer available")

    def _refusal(self, name: str, version: int) -> str:
        return (
            f"template {name!r} version {version} is stored but no longer valid: "
            f"{self.refused(name, version)}"
        )

    def _not_found(self, name: str) -> TemplateNotFound:
        """No template ``name`` offered; said with the reason when each of its stored versions
        is refused (an older release stored them), and how to be rid of them."""
        refused = self._refused.get(name)
        if name in self._deleted or not refused or self._api.get(name):
            return TemplateNotFound(f"no template named {name!r}")
        latest = max(refused)
        return TemplateNotFound(
            f"{self._refusal(name, latest)}; register a valid version, or delete the "
            f"template (DELETE /api/v1/templates/{name})"
        )

    def versions(self, name: str) -> list[Template]:
        """Every version of ``name`` known here, oldest first.

        Raises:
            TemplateNotFound: no such template.
        """
        if name in self._files:
            return sorted(
                (t for (n, _), t in self._seen.items() if n == name), key=lambda t: t.version
            )
        if name not in self._api or name in self._deleted:
            raise self._not_found(name)
        return [self._api[name][v] for v in sorted(self._api[name])]

    def all(self) -> list[Template]:
        """The current version of every template offered for new tasks, by name."""
        current = dict(self._files)
        for name, versions in self._api.items():
            if name not in self._deleted:
                current[name] = versions[max(versions)]
        return [current[n] for n in sorted(current)]
