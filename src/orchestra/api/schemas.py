"""The API's request and response bodies, as the controllers use them.

The response structs live in :mod:`orchestra.wire.schemas` (light, so the client can decode
into them without loading the server) and are re-exported here; the request bodies come from
their services.
"""

from __future__ import annotations

import msgspec

from orchestra.schedules import ScheduleChanges, ScheduleSpec
from orchestra.webhooks import NewWebhook, WebhookChanges
from orchestra.wire.schemas import AttemptOut as AttemptOut
from orchestra.wire.schemas import CrashOut as CrashOut
from orchestra.wire.schemas import ErrorBody as ErrorBody
from orchestra.wire.schemas import ErrorOut as ErrorOut
from orchestra.wire.schemas import FieldOut as FieldOut
from orchestra.wire.schemas import HealthOut as HealthOut
from orchestra.wire.schemas import MessageOut as MessageOut
from orchestra.wire.schemas import ModelOut as ModelOut
from orchestra.wire.schemas import ModelsOut as ModelsOut
from orchestra.wire.schemas import ProblemOut as ProblemOut
from orchestra.wire.schemas import ProcessOut as ProcessOut
from orchestra.wire.schemas import ProviderOut as ProviderOut
from orchestra.wire.schemas import StepOut as StepOut
from orchestra.wire.schemas import StepSummary as StepSummary
from orchestra.wire.schemas import TaskList as TaskList
from orchestra.wire.schemas import TaskOut as TaskOut
from orchestra.wire.schemas import TaskSummaryOut as TaskSummaryOut
from orchestra.wire.schemas import TemplateList as TemplateList
from orchestra.wire.schemas import TemplateOut as TemplateOut
from orchestra.wire.schemas import ValidationOut as ValidationOut
from orchestra.wire.tasks import SubmitTask

#: The JSON request bodies; the OpenAPI document describes them with msgspec's own schema.
REQUEST_BODIES: tuple[type[msgspec.Struct], ...] = (
    SubmitTask,
    ScheduleSpec,
    ScheduleChanges,
    NewWebhook,
    WebhookChanges,
)
