"""What the API sends and receives: the structs of its request and response bodies.

Light on purpose: these modules import msgspec, the standard library and other light modules
(``domain``, ``errors``, ``event_types``, ``schedules``, ``webhooks``, ``llm.base``) and
nothing of the server (no SQLAlchemy, Litestar, Jinja, ruamel), so that
:mod:`orchestra.client` and the CLI start fast. The server's modules import the structs from
here (``orchestra.api.schemas`` and the controllers re-export them); a constructor from a
server type (``TaskOut.of(task)``) names that type under ``TYPE_CHECKING`` only.

The last part of each module's name (``schemas``, ``webhooks``, …) is part of the OpenAPI
document: Litestar names two components of the same class name after their modules
(``schemas_AttemptOut``, ``webhooks_AttemptOut``).
"""
