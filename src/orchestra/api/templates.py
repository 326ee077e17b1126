"""/api/v1/templates: list, describe, validate."""

from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, RawBody

from orchestra.api.schemas import ProblemOut, TemplateList, TemplateOut, ValidationOut
from orchestra.errors import InvalidRequest, TemplateError
from orchestra.templating.loader import parse_template
from orchestra.templating.registry import TemplateRegistry


class TemplateController(Controller):
    """Task templates."""

    path = "/api/v1/templates"
    tags = ["templates"]

    @get("/", summary="List templates")
    async def list_templates(self, registry: NamedDependency[TemplateRegistry]) -> TemplateList:
        """Every template the service can run."""
        return TemplateList(items=[TemplateOut.of(t) for t in registry.all()])

    @get("/{name:str}", summary="Get a template")
    async def get_template(
        self, name: FromPath[str], registry: NamedDependency[TemplateRegistry]
    ) -> TemplateOut:
        """A template with its parameters as a JSON Schema."""
        return TemplateOut.of(registry.get(name))

    @post("/validate", status_code=200, summary="Validate a template")
    async def validate(self, body: RawBody) -> ValidationOut:
        """Check YAML text (the request body) as a template; every problem, with positions."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("the template must be UTF-8 text") from None
        try:
            template = parse_template(text, "<request>")
        except TemplateError as exc:
            return ValidationOut(
                valid=False,
                errors=[ProblemOut(p.line, p.column, p.path, p.message) for p in exc.problems],
            )
        return ValidationOut(valid=True, errors=[], name=template.name)
