"""What the API sends and receives: the structs of its request and response bodies.

Light on purpose: these modules import msgspec, the standard library and other light modules
(``domain``, ``errors``, ``event_types``, ``schedules``, ``webhooks``, ``llm.base``) and
nothing of the server (no SQLAlchemy, Litestar, Jinja, ruamel), so that
:mod:`orchestra.client` and the CLI start fast. The server's modules import the structs from
here (``orchestra.api.schemas`` and the controllers re-export them); a constructor from a
server type (``TaskOut.of(task)``) names that type under ``TYPE_CHECKING`` only.

A struct's class name is its component's name in the OpenAPI document: two structs must not
share one (Litestar would name them after their modules, ``schemas_AttemptOut``), hence
``TaskAttemptOut`` and ``DeliveryAttemptOut``.
"""
