"""What an API-contract review found: answers and an OpenAPI document that said less than, or
other than, what the service does (HEAD, operation ids, response schemas, a body's BOM, the
error body under /schema)."""

from __future__ import annotations

from tests.conftest import Service


async def _document(service: Service) -> dict:
    answer = await service.client.get("/schema/openapi.json")
    assert answer.status_code == 200
    document: dict = answer.json()
    return document


async def test_the_models_check_says_what_it_checks(service: Service) -> None:
    """``GET /api/v1/models?check=now`` checks the providers only (the database is /health's)."""
    document = await _document(service)
    models = document["paths"]["/api/v1/models"]["get"]["parameters"]
    check = next(p for p in models if p["name"] == "check")
    assert "provider" in check["description"] and "database" not in check["description"]
    health = document["paths"]["/health"]["get"]["parameters"]
    assert "database" in next(p for p in health if p["name"] == "check")["description"]
