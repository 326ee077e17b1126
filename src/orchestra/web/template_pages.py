"""Templates: the list, one template (parameters, run form, source, versions), the editor."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from orchestra.errors import InvalidRequest, TemplateError
from orchestra.tasks import Submission
from orchestra.templating.loader import parse_template
from orchestra.templating.model import Template as TaskTemplate
from orchestra.web.forms import fields, params_from_form
from orchestra.web.render import links, page

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


def _multi(form: Any) -> dict[str, list[str]]:
    return {key: [str(v) for v in form.getall(key)] for key in form}


def _run_form(
    template: TaskTemplate,
    values: dict[str, Any] | None = None,
    problems: list[Any] | None = None,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "fields": fields(template.params_schema(), values, problems),
        "options": options or {},
        "form_error": "",
    }


def _problems(exc: TemplateError) -> list[dict[str, Any]]:
    return [
        {"line": p.line, "column": p.column, "path": p.path, "message": p.message}
        for p in exc.problems
    ]


class TemplatePages(Controller):
    """Task templates."""

    path = "/templates"

    @get("/", name="ui.templates")
    async def templates(self, request: Request[Any, Any, Any]) -> Template:
        """Every template offered for new tasks."""
        catalog = request.app.state.runtime.catalog
        return page(request, "templates.html", section="templates", templates=catalog.all())

    @get("/new")
    async def new(self, request: Request[Any, Any, Any]) -> Template:
        """The editor, for a new template."""
        return page(request, "editor.html", section="templates", text=SKELETON, name=None)

    @post("/validate", opt={"scope": "submit"}, status_code=200)
    async def validate(self, request: Request[Any, Any, Any]) -> Template:
        """The editor's problems for the YAML typed so far (a fragment), each at its line and
        column."""
        form = await request.form()
        text = str(form.get("yaml", ""))
        limits = request.app.state.runtime.catalog.limits
        problems: list[dict[str, Any]] = []
        name = None
        try:
            name = parse_template(text, "<editor>", limits).name
        except TemplateError as exc:
            problems = _problems(exc)
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
        catalog = request.app.state.runtime.catalog
        try:
            if not text.strip():
                raise InvalidRequest("the template is empty")
            registered = (await catalog.register(text)).template
        except TemplateError as exc:
            return page(
                request,
                "editor.html",
                status_code=422,
                section="templates",
                text=text,
                name=None,
                problems=_problems(exc),
            )
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
        runtime = request.app.state.runtime
        template = runtime.catalog.get(name, version)
        values = None
        options: dict[str, str] = {}
        source = request.query_params.get("from")
        if source and source.isdigit():
            task = await runtime.tasks.get(int(source))
            values = task.params
            options = {"model": task.model or "", "priority": str(task.priority)}
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
        template = request.app.state.runtime.catalog.get(name)
        return page(request, "editor.html", section="templates", text=template.text, name=name)

    @post("/{name:str}/run", opt={"scope": "submit"}, status_code=303)
    async def run(
        self, request: Request[Any, Any, Any], name: FromPath[str]
    ) -> Redirect | Template:
        """Submit a task from the run form; its problems appear beside their fields (422)."""
        runtime = request.app.state.runtime
        template = runtime.catalog.get(name)
        form = _multi(await request.form())
        params = params_from_form(template.params_schema(), form)
        options = {k: (form.get(k) or [""])[-1].strip() for k in ("model", "priority")}
        try:
            priority = int(options["priority"] or 0)
        except ValueError:
            priority = 0
        try:
            submitted = await runtime.tasks.submit(
                Submission(
                    template=name,
                    params=params,
                    model=options["model"] or None,
                    priority=priority,
                )
            )
        except InvalidRequest as exc:
            context = _run_form(template, params, exc.fields, options)
            context["form_error"] = exc.message
            return page(
                request,
                "template.html",
                status_code=422,
                section="templates",
                template=template,
                versions=runtime.catalog.versions(name),
                **context,
            )
        return Redirect(links(request).ui(f"/tasks/{submitted.task.id}"), status_code=303)
