"""/api/v1/templates: list, describe, validate, register, versions, delete, reload."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, QueryParameter, RawBody

from orchestra.api.openapi import errors
from orchestra.api.schemas import (
    ProblemOut,
    TemplateList,
    TemplateOut,
    ValidationOut,
)
from orchestra.api.scope import location
from orchestra.catalog import TemplateCatalog
from orchestra.errors import FieldProblem, InvalidRequest, TemplateError


def _text(body: bytes) -> str:
    if not body.strip():
        raise InvalidRequest(
            "the request body is empty: send the template's YAML text",
            [FieldProblem("body", "empty")],
        )
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "the template must be UTF-8 text", [FieldProblem("body", "is not UTF-8 text")]
        ) from None


class TemplateController(Controller):
    """Task templates."""

    path = "/api/v1/templates"
    tags = ["templates"]

    @get("/", summary="List templates", responses=errors())
    async def list_templates(self, catalog: NamedDependency[TemplateCatalog]) -> TemplateList:
        """Every template offered for new tasks, at its current version."""
        return TemplateList(items=[TemplateOut.of(t) for t in catalog.all()])

    @get("/{name:str}", summary="Get a template", responses=errors(400, 404))
    async def get_template(
        self,
        name: FromPath[str],
        catalog: NamedDependency[TemplateCatalog],
        version: Annotated[
            int | None, QueryParameter(ge=1, description="A version other than the current.")
        ] = None,
    ) -> TemplateOut:
        """A template with its parameters as a JSON Schema: its current version, or any one
        that `versions` lists."""
        return TemplateOut.of(catalog.show(name, version))

    @get("/{name:str}/versions", summary="List a template's versions", responses=errors(404))
    async def versions(
        self, name: FromPath[str], catalog: NamedDependency[TemplateCatalog]
    ) -> TemplateList:
        """Every version of a template, oldest first."""
        return TemplateList(items=[TemplateOut.of(t) for t in catalog.versions(name)])

    @post(
        "/",
        status_code=201,
        summary="Register a template",
        responses={
            200: ResponseSpec(
                TemplateOut,
                description="The body equals the current version",
                generate_examples=False,
            ),
            **errors(400, 409, 413, 422, 507),
        },
    )
    async def register(
        self,
        request: Request[Any, Any, Any],
        body: RawBody,
        catalog: NamedDependency[TemplateCatalog],
    ) -> Response[TemplateOut]:
        """Register YAML (the request body) as the next version of its template.

        Versions are immutable; registering the current body again changes nothing (200).
        409 when a template file uses the name.
        """
        registration = await catalog.register(_text(body))
        template = registration.template
        return Response(
            TemplateOut.of(template),
            status_code=201 if registration.created else 200,
            headers={
                "Location": location(
                    request, f"{self.path}/{template.name}?version={template.version}"
                )
            },
        )

    @delete(
        "/{name:str}", status_code=204, summary="Delete a template", responses=errors(404, 409, 507)
    )
    async def delete_template(
        self, name: FromPath[str], catalog: NamedDependency[TemplateCatalog]
    ) -> None:
        """Stop offering a registered template for new tasks. Tasks already submitted keep
        running with their version. 409 for a template file."""
        await catalog.delete(name)

    @post("/reload", status_code=200, summary="Reload template files", responses=errors(422))
    async def reload(self, catalog: NamedDependency[TemplateCatalog]) -> TemplateList:
        """Read the template folders again (as SIGHUP does). On any problem nothing changes
        and the answer is 422 with every problem."""
        return TemplateList(items=[TemplateOut.of(t) for t in catalog.reload()])

    @post(
        "/validate",
        status_code=200,
        summary="Validate a template",
        opt={"scope": "submit"},
        responses=errors(400, 413),
    )
    async def validate(
        self, body: RawBody, catalog: NamedDependency[TemplateCatalog]
    ) -> ValidationOut:
        """Check YAML text (the request body) as a template; every problem, with positions."""
        try:
            template = await catalog.validate(_text(body))
        except TemplateError as exc:
            return ValidationOut(
                valid=False,
                errors=[ProblemOut.of(p) for p in exc.problems],
            )
        return ValidationOut(valid=True, errors=[], name=template.name)
