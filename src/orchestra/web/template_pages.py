"""Templates: the list, one template (parameters, run form, source, versions), the editor."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, get_args

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from orchestra import logs
from orchestra.api.errors import status_of
from orchestra.api.scope import runtime_of
from orchestra.catalog import TemplateCatalog
from orchestra.errors import (
    FieldProblem,
    InvalidParams,
    InvalidRequest,
    OrchestraError,
    PayloadTooLarge,
    StorageError,
    TemplateError,
)
from orchestra.tasks import Priority, SubmitTask
from orchestra.templating.model import Template as TaskTemplate
from orchestra.templating.params import validate_params
from orchestra.web.forms import as_typed, fields, params_from_form, whole
from orchestra.web.render import links, page

log = logs.get("orchestra.web")

#: What a new template starts as in the editor.
SKELETON = """\
name: my-template
description: What this template does.
model: default
parameters:
  text:
    type: string
    required: true
steps:
  - id: answer
    prompt: |
      {{ params.text }}
"""


#: The run form's options, each sent as ``opt.<name>``: a dot is never part of a parameter's
#: name, so a parameter may be called ``model`` or ``priority`` too.
OPTIONS = ("model", "priority")
_PRIORITY: msgspec.Meta = get_args(Priority)[1]  # the API's bounds
_BAD_PRIORITY = f"must be a whole number from {_PRIORITY.ge} to {_PRIORITY.le}"


def _every_problem(
    template: TaskTemplate, params: dict[str, Any], unreadable: list[FieldProblem], limits: Any
) -> list[FieldProblem]:
    """The problems of a run form's parameters: the JSON fields that do not parse, then what
    validation finds in the others."""
    bad = {p.field for p in unreadable}
    try:
        validate_params(template, params, limits)
    except InvalidParams as exc:
        return [*unreadable, *(p for p in exc.fields if p.field not in bad)]
    return list(unreadable)


def _multi(form: Any) -> dict[str, list[str]]:
    return {key: [str(v) for v in form.getall(key)] for key in form}


def _priority(text: str) -> int | None:
    """The priority option as typed (blank: 0), or None when it is not one the API takes."""
    try:
        return msgspec.convert(int(text or 0), Priority)
    except (ValueError, msgspec.ValidationError):
        return None


def _run_form(
    template: TaskTemplate,
    values: dict[str, Any] | None = None,
    problems: list[FieldProblem] | None = None,
    options: dict[str, str] | None = None,
    option_errors: dict[str, list[str]] | None = None,
    form_error: str = "",
) -> dict[str, Any]:
    return {
        "fields": fields(template.params_schema(), values, problems),
        "options": options or {},
        "option_errors": option_errors or {},
        "form_error": form_error,
    }


def _problems(exc: TemplateError) -> list[dict[str, Any]]:
    return [
        {"line": p.line, "column": p.column, "path": p.path, "message": p.message}
        for p in exc.problems
    ]


def _shown(exc: OrchestraError, catalog: TemplateCatalog) -> str:
    """What the editor says about a refusal: the error's message without server file paths
    (a clash names the template file's path; a storage error the database's)."""
    if isinstance(exc, StorageError):
        log.warning("ui.storage_failed", code=exc.code, error=exc.message)
        return (type(exc).__doc__ or "").strip()  # the class's default message
    if status_of(exc) >= 500:
        log.error("ui.register_failed", code=exc.code, error=exc.message)
        return "internal error"
    message = exc.message
    for template in catalog.all():
        if template.origin != "api" and template.source in message:
            message = message.replace(template.source, PurePath(template.source).name)
    return message


def _editor(
    request: Request[Any, Any, Any],
    text: str,
    name: str | None = None,
    *,
    status_code: int = 200,
    problems: list[dict[str, Any]] | None = None,
    error: str = "",
) -> Template:
    """The editor holding ``text``, with the problems found or why it was refused."""
    return page(
        request,
        "editor.html",
        status_code=status_code,
        section="templates",
        text=text,
        name=name,
        problems=problems,
        error=error,
    )


class TemplatePages(Controller):
    """Task templates."""

    path = "/templates"

    @get("/", name="ui.templates")
    async def templates(self, request: Request[Any, Any, Any]) -> Template:
        """Every template offered for new tasks."""
        catalog = runtime_of(request.scope).catalog
        return page(request, "templates.html", section="templates", templates=catalog.all())

    @get("/new")
    async def new(self, request: Request[Any, Any, Any]) -> Template:
        """The editor, for a new template."""
        return _editor(request, SKELETON)

    @post("/validate", opt={"scope": "submit"}, status_code=200)
    async def validate(self, request: Request[Any, Any, Any]) -> Template:
        """The editor's problems for the YAML typed so far (a fragment), each at its line and
        column."""
        form = await request.form()
        text = str(form.get("yaml", ""))
        catalog = runtime_of(request.scope).catalog
        problems: list[dict[str, Any]] = []
        name = None
        try:
            name = (await catalog.validate(text, "<editor>")).name
        except TemplateError as exc:
            problems = _problems(exc)
        except PayloadTooLarge as exc:
            problems = [{"line": None, "column": None, "path": "", "message": exc.message}]
        return page(
            request,
            "_problems.html",
            problems=problems,
            valid=not problems,
            name=name,
            lines=max(1, text.count("\n") + 1),
        )

    @post("/", opt={"scope": "admin"}, status_code=303)
    async def register(self, request: Request[Any, Any, Any]) -> Redirect | Template:
        """Register the editor's YAML as the next version of its template."""
        form = await request.form()
        text = str(form.get("yaml", ""))
        catalog = runtime_of(request.scope).catalog
        # Refused, the editor stays the edit of the template it was opened on (if any).
        editing = str(form.get("editing", ""))
        name = editing if any(t.name == editing for t in catalog.all()) else None
        try:
            if not text.strip():
                raise InvalidRequest("the template is empty")
            registered = (await catalog.register(text)).template
        except TemplateError as exc:
            problems = _problems(exc)
            return _editor(request, text, name, status_code=status_of(exc), problems=problems)
        except OrchestraError as exc:  # empty, too large, a file's name, storage
            error = _shown(exc, catalog)
            return _editor(request, text, name, status_code=status_of(exc), error=error)
        return Redirect(
            links(request).ui(f"/templates/{registered.name}", version=registered.version),
            status_code=303,
        )

    @get("/{name:str}", name="ui.template")
    async def template(
        self,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        version: FromQuery[int | None] = None,
    ) -> Template:
        """A template: description, parameters, run form, source and versions. ``from`` (a
        task id) fills the form with that task's parameters."""
        runtime = runtime_of(request.scope)
        template = runtime.catalog.show(name, version)
        values = None
        options: dict[str, str] = {}
        source = request.query_params.get("from")
        if source:
            task = await runtime.tasks.get(whole(source, "from"))
            values = task.params
            options = {"model": task.model or "", "priority": str(task.asked_priority)}
        return page(
            request,
            "template.html",
            section="templates",
            template=template,
            versions=runtime.catalog.versions(name),
            **_run_form(template, values, options=options),
        )

    @get("/{name:str}/edit")
    async def edit(self, request: Request[Any, Any, Any], name: FromPath[str]) -> Template:
        """The editor, with the template's current YAML."""
        template = runtime_of(request.scope).catalog.get(name)
        return _editor(request, template.text, name)

    @get("/{name:str}/run")
    async def run_page(self, request: Request[Any, Any, Any], name: FromPath[str]) -> Redirect:
        """No page of its own (a reload, or Back, after the form was sent): the template's."""
        return Redirect(links(request).ui(f"/templates/{name}"), status_code=303)

    @post("/{name:str}/run", opt={"scope": "submit"}, status_code=303)
    async def run(
        self, request: Request[Any, Any, Any], name: FromPath[str]
    ) -> Redirect | Template:
        """Submit a task from the run form; its problems appear beside their fields (422)."""
        runtime = runtime_of(request.scope)
        template = runtime.catalog.get(name)
        form = _multi(await request.form())
        params, unreadable = params_from_form(template.params_schema(), form)
        options = {k: (form.get(f"opt.{k}") or [""])[-1].strip() for k in OPTIONS}
        priority = _priority(options["priority"])
        problems: list[FieldProblem] = []
        option_errors = {} if priority is not None else {"priority": [_BAD_PRIORITY]}
        if priority is None or unreadable:
            # Nothing is submitted, but every problem is named at once.
            problems = _every_problem(template, params, unreadable, runtime.tasks.limits)
            said = (
                [f"{len(problems)} invalid parameter(s) for template {name!r}"] if problems else []
            )
            message = "; ".join(said + ([f"priority {_BAD_PRIORITY}"] if option_errors else []))
        else:
            try:
                submitted = await runtime.tasks.submit(
                    SubmitTask(
                        template=name,
                        params=params,
                        model=options["model"] or None,
                        priority=priority,
                    )
                )
            except InvalidRequest as exc:
                problems, message = exc.fields, exc.message
            else:
                return Redirect(links(request).ui(f"/tasks/{submitted.task.id}"), status_code=303)
        return page(
            request,
            "template.html",
            status_code=422,
            section="templates",
            template=template,
            versions=runtime.catalog.versions(name),
            **_run_form(
                template,
                {**params, **as_typed(template.params_schema(), form)},
                problems,
                options,
                option_errors,
                message,
            ),
        )
