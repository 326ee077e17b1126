"""Service functions for templates: list, describe, validate, register, delete, reload, pin.

Controllers call only these. Registered templates are stored by ``db.templates`` and known to
the :class:`TemplateRegistry` that tasks and workers look templates up in; a process learns
what other processes on the same database registered or deleted by
:meth:`TemplateCatalog.refresh` (every few seconds, and at once when a task names a version it
has not seen). So are the file template versions that tasks are queued with
(:meth:`TemplateCatalog.pin`), so a queued task still runs its version after the file changed
and the service restarted.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import msgspec

from orchestra import logs
from orchestra.config import LimitSettings
from orchestra.db.templates import StoredFileVersion, StoredTemplate, TemplateStore
from orchestra.errors import (
    ConflictError,
    PayloadTooLarge,
    RenderError,
    StorageError,
    TemplateError,
    TemplateNotFound,
)
from orchestra.templating.isolation import Renderer
from orchestra.templating.loader import name_problem, parse_template
from orchestra.templating.model import Template
from orchestra.templating.registry import TemplateRegistry, held_by
from orchestra.templating.source import TemplateProblem

log = logs.get("orchestra.templates")


class Registration(msgspec.Struct, frozen=True):
    """A registered template, and whether this request created the version."""

    template: Template
    created: bool


#: Parses YAML text as a template: (text, source, limits) -> Template, raising TemplateError.
Parse = Callable[[str, str, LimitSettings], Awaitable[Template]]


#: How often a process reads the templates other processes registered or deleted, in seconds
#: (a task or a submit that names one not seen yet reads them at once).
REFRESH_SECONDS = 2.0

#: The longest a template may take to parse in a render process, in seconds. Parsing costs
#: about 30 ms per KB on a slow core, so the largest template allowed takes ~8 s.
PARSE_SECONDS = 60.0


async def parse_here(text: str, source: str, limits: LimitSettings) -> Template:
    """:func:`parse_template` on the calling thread (for startup, tools and tests)."""
    return parse_template(text, source, limits)


async def parse_elsewhere(
    renderer: Renderer, text: str, source: str, limits: LimitSettings
) -> Template:
    """:func:`parse_template` in one of ``renderer``'s processes, off the event loop.

    Raises:
        TemplateError: the template's problems, or that it could not be parsed in time.
    """
    try:
        return await renderer.offload(PARSE_SECONDS, parse_template, text, source, limits)
    except RenderError as exc:
        problem = TemplateProblem(source, 1, 1, "", f"the template could not be checked: {exc}")
        raise TemplateError([problem]) from None


def _key(template: Template) -> tuple[str, int]:
    return template.name, template.version


class TemplateCatalog:
    """What the API can do with templates.

    Templates sent over the API are parsed with ``parse``: the service gives one that runs in
    a render process, since parsing YAML costs ~14 ms per KB of Python that would otherwise
    hold the event loop (a 240 KB template held it for over 3 s).
    """

    def __init__(
        self,
        registry: TemplateRegistry,
        store: TemplateStore,
        limits: LimitSettings | None = None,
        *,
        parse: Parse = parse_here,
    ) -> None:
        self.registry = registry
        self.store = store
        self.limits = limits or LimitSettings()
        self._parse = parse
        # The file template versions stored by this process, by (name, version): the Template
        # object stored, so a submit costs a lookup, and a reloaded file is stored once more.
        self._pinned: dict[tuple[str, int], Template] = {}
        # The stored bodies this release refused, by (name, version): not parsed (nor
        # logged) again at each refresh, unless the row changes.
        self._refused_bodies: dict[tuple[str, int], str] = {}

    async def validate(self, text: str, source: str = "<request>") -> Template:
        """YAML text checked as a template (not registered), and its name as one this service
        can register: not a built-in template's, nor a template file's.

        Raises:
            TemplateError: every problem, with positions.
        """
        template = await self._parse(text, source, self.limits)
        held = self.registry.is_file(template.name)
        if held is not None:  # registering it would be a 409
            raise TemplateError([name_problem(template, f"{_held_by(held)}; name yours otherwise")])
        return template

    async def start(self) -> None:
        """Know every registered version, and the file template versions that unfinished tasks
        pinned (done once, after the files are loaded and before the workers start).

        Raises:
            TemplateError: a registered template clashes with a template file.
        """
        for row in await self.store.all_versions():
            source = f"<registered {row.name} v{row.version}>"
            deleted = row.deleted_at is not None
            template = self._stored("registered", row.name, row.version, row.body, source, deleted)
            if template is not None:
                self._add_registered(row, template)
        for stored in await self.store.pinned_file_versions():
            if self.registry.knows(stored.name, stored.version):
                continue  # the current file, or a body stored later
            if self.registry.refused(stored.name, stored.version) is not None:
                continue  # a later body of this version is refused: said once
            source = f"<stored {stored.name} v{stored.version}>"
            template = self._stored("stored", stored.name, stored.version, stored.body, source)
            if template is None:
                continue
            origin = "builtin" if stored.origin == "builtin" else "file"
            self.registry.add_pinned(msgspec.structs.replace(template, origin=origin))
        # The files as they are now, stored before any task is queued with them: a submit
        # then writes nothing more until a reload changes a file.
        await self._keep([t for t in self.registry.all() if t.origin != "api"])

    async def refresh(self) -> None:
        """Learn what other processes on the database registered or deleted since: a
        registered version this process has not seen (parsed in a render process), and the
        deletion of a template whose latest version was deleted. Cheap when nothing changed:
        one read of the registered versions.

        A version this release's checks refuse (an older release stored it) is logged once,
        and parsed again only when its stored body changes."""
        latest: dict[str, StoredTemplate] = {}
        for row in await self.store.all_versions():
            latest[row.name] = row
            if self.registry.knows(row.name, row.version):
                continue
            if self._refused_bodies.get((row.name, row.version)) == row.body:
                continue
            source = f"<registered {row.name} v{row.version}>"
            try:
                template = await self._parse(row.body, source, self.limits)
            except (TemplateError, PayloadTooLarge) as exc:
                deleted = row.deleted_at is not None
                self._refuse("registered", row.name, row.version, row.body, exc, deleted)
                continue
            self._add_registered(row, template)
            log.info("templates.learned", name=row.name, version=row.version)
        for name, row in latest.items():
            if row.deleted_at is not None and not self.registry.is_deleted(name):
                self.registry.delete_registered(name)

    def _add_registered(self, row: StoredTemplate, template: Template) -> None:
        """Know a stored registered version (``template``, its body parsed)."""
        self._refused_bodies.pop((row.name, row.version), None)
        self.registry.add_registered(
            msgspec.structs.replace(
                template,
                version=row.version,
                origin="api",
                source=f"api:{row.name}@{row.version}",
            ),
            deleted=row.deleted_at is not None,
        )

    async def follow(self, interval: float = REFRESH_SECONDS) -> None:
        """:meth:`refresh` every ``interval`` seconds, until cancelled (a failed read is
        logged and tried again next time)."""
        # Said once per outage (a read fails every second while the database is away) and
        # once when it works again.
        outage = logs.Outage(log, "templates.refresh_failed", every=float("inf"))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except StorageError as exc:
                outage.failed(exc)
                continue
            outage.succeeded()

    def _stored(
        self, kind: str, name: str, version: int, body: str, source: str, deleted: bool = False
    ) -> Template | None:
        """A template body kept in the database, parsed; None (and refused:
        :meth:`_refuse`) when this version of Orchestra no longer accepts it (an older one,
        or one with larger limits, stored it): one such body must not stop the service from
        starting."""
        try:
            return parse_template(body, source, self.limits)
        except (TemplateError, PayloadTooLarge) as exc:
            self._refuse(kind, name, version, body, exc, deleted)
        return None

    def _refuse(
        self,
        kind: str,
        name: str,
        version: int,
        body: str,
        exc: TemplateError | PayloadTooLarge,
        deleted: bool,
    ) -> None:
        """Log a stored version this release refuses, once (at error; at info when it was
        deleted: nothing is left to do), and know it refused: its tasks fail saying why."""
        if isinstance(exc, TemplateError):
            problems = [str(p) for p in exc.problems] or [exc.message]
        else:
            problems = [exc.message]
        self._refused_bodies[(name, version)] = body
        self.registry.add_refused(name, version, "; ".join(problems), deleted=deleted)
        said = {"deleted": True} if deleted else {}
        (log.info if deleted else log.error)(
            f"templates.{kind}_invalid", name=name, version=version, problems=problems, **said
        )

    async def pin(self, template: Template) -> None:
        """Store the file template version a task is being queued with, unless this process
        stored it already (registered templates are stored already: nothing to do).

        Call it before the task is queued: a queued task then finds its version after the
        file changed and the service restarted.
        """
        if template.origin != "api" and self._pinned.get(_key(template)) is not template:
            await self._keep([template])

    async def _keep(self, files: list[Template]) -> None:
        """Store these file template versions, and remember them stored."""
        await self.store.keep_file_versions(
            [
                StoredFileVersion(
                    name=t.name,
                    version=t.version,
                    body=t.text,
                    body_hash=hashlib.sha256(t.text.encode()).hexdigest(),
                    origin=t.origin,
                )
                for t in files
            ]
        )
        self._pinned.update((_key(t), t) for t in files)

    def get(self, name: str, version: int | None = None) -> Template:
        """The current version of a template, or the version asked for."""
        return self.registry.get(name, version)

    def show(self, name: str, version: int | None = None) -> Template:
        """A template to show: its current version, or any version :meth:`versions` lists
        (a file's earlier ones too, which new tasks cannot ask for).

        Raises:
            TemplateNotFound: no such template, or no such version.
        """
        if version is not None:
            for template in self.registry.versions(name):
                if template.version == version:
                    return template
        return self.registry.get(name, version)

    def versions(self, name: str) -> list[Template]:
        """Every version of a template, oldest first."""
        return self.registry.versions(name)

    def all(self) -> list[Template]:
        """Every template offered for new tasks."""
        return self.registry.all()

    async def register(self, text: str) -> Registration:
        """Validate YAML and store it as the next version of its template.

        The same body as the current version registers nothing and returns that version.
        The ``version`` written in the YAML is ignored: the service numbers versions.

        Raises:
            TemplateError: the YAML is not a valid template (every problem, with positions).
            ConflictError: a template file already uses the name.
        """
        parsed = await self._parse(text, "<request>", self.limits)
        file = self.registry.is_file(parsed.name)
        if file is not None:
            raise ConflictError(f"{_held_by(file)}; register it under another name")
        digest = hashlib.sha256(text.encode()).hexdigest()
        stored = await self.store.register(parsed.name, text, digest)
        template = msgspec.structs.replace(
            parsed,
            version=stored.version,
            origin="api",
            source=f"api:{parsed.name}@{stored.version}",
        )
        if stored.created:
            self.registry.add_registered(template)
            log.info("templates.registered", name=template.name, version=template.version)
        return Registration(
            template=self.registry.get(template.name, stored.version), created=stored.created
        )

    async def delete(self, name: str) -> None:
        """Stop offering a registered template for new tasks; its tasks keep running.

        A template whose stored versions this release refuses (an older one stored them) is
        deleted too, so that it is no longer logged as an error at each start.

        Raises:
            ConflictError: the template is a file (remove the file instead).
            TemplateNotFound: no registered template has this name.
        """
        file = self.registry.is_file(name)
        if file is not None:
            advice = (
                "it cannot be deleted"
                if file.origin == "builtin"
                else "remove the file and reload instead"
            )
            raise ConflictError(f"{_held_by(file)}; {advice}")
        if not self.registry.has_refused(name):
            self.registry.get(name)  # raises TemplateNotFound when unknown or deleted already
        if not await self.store.delete(name):
            raise TemplateNotFound(f"no template named {name!r}")
        self.registry.delete_registered(name)
        log.info("templates.deleted", name=name)

    def reload(self) -> list[Template]:
        """Read the template files again; the old set stays when the new one is invalid.

        Raises:
            TemplateError: every problem found (nothing was changed).
        """
        loaded = self.registry.load()
        log.info("templates.reloaded", files=len(loaded))
        return self.all()


def _held_by(file: Template) -> str:
    return held_by(file.name, file.origin, file.source)
