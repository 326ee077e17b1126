"""Running one task's steps: render each prompt, ask the model, keep the outputs.

The runner knows templates and providers, nothing about SQL or HTTP servers: it reports each
step through a :class:`StepRecorder`, which the worker backs with the store (fenced by the
task's lease).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import msgspec

from orchestra.domain import Step, StepStatus, Task, TaskError, iso_now
from orchestra.errors import StepError, StepTimeout
from orchestra.llm.base import ChatMessage, ChatRequest, Provider
from orchestra.templating.model import LlmStep, Template
from orchestra.templating.render import render_output, render_text


class StepRecorder(Protocol):
    """Where the runner reports steps. Raises ``LeaseLost`` when the task is no longer ours."""

    async def step_started(self, step_id: str, position: int) -> None: ...

    async def step_finished(self, step: Step) -> None: ...


class StepFailed(StepError):
    """A step failed; carries the step id and the error as stored on the task."""

    def __init__(self, step_id: str, cause: StepError) -> None:
        self.step_id = step_id
        self.cause = cause
        self.retryable = cause.retryable
        self.code = cause.code
        super().__init__(f"step {step_id!r} failed: {cause.message}")

    def as_task_error(self) -> TaskError:
        """The error as stored on the task."""
        return TaskError(
            type=self.cause.code,
            message=self.cause.message,
            step=self.step_id,
            retryable=self.retryable,
        )


class Runner:
    """Executes templates against a provider."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def run(self, task: Task, template: Template, recorder: StepRecorder) -> Any:
        """Run every step in order and return the task's result.

        Raises:
            StepFailed: a step (or the output) failed; the step is recorded as failed first.
            LeaseLost: from the recorder, when another attempt took the task over.
        """
        outputs: dict[str, dict[str, Any]] = {}
        scope: dict[str, Any] = {"params": task.params, "steps": outputs}
        for position, spec in enumerate(template.steps):
            await recorder.step_started(spec.id, position)
            started, clock = iso_now(), time.perf_counter()
            try:
                try:
                    # Leaving the timeout cancels the model call, which closes its connection.
                    async with asyncio.timeout(spec.timeout):
                        step = await self._llm_step(task, template, spec, position, scope)
                except TimeoutError:
                    raise StepTimeout(
                        f"step {spec.id!r} took longer than its timeout of {spec.timeout:g}s"
                    ) from None
            except StepError as exc:
                await recorder.step_finished(
                    Step(
                        id=spec.id,
                        position=position,
                        status=StepStatus.FAILED,
                        error=TaskError(
                            type=exc.code,
                            message=exc.message,
                            step=spec.id,
                            retryable=exc.retryable,
                        ),
                        started_at=started,
                        finished_at=iso_now(),
                        duration_ms=round((time.perf_counter() - clock) * 1000, 3),
                    )
                )
                raise StepFailed(spec.id, exc) from exc
            step = _timed(step, started, clock)
            await recorder.step_finished(step)
            outputs[spec.id] = {"output": step.output}
        if template.output is None:
            return outputs[template.steps[-1].id]["output"]
        try:
            return render_output(template.output, scope)
        except StepError as exc:
            raise StepFailed("output", exc) from exc

    async def _llm_step(
        self, task: Task, template: Template, spec: LlmStep, position: int, scope: dict[str, Any]
    ) -> Step:
        model = spec.model or task.model or template.model
        if not model:
            raise StepError(
                "no model to ask: set `model` on the template or the step, or pass one with "
                "the task"
            )
        messages = []
        if spec.system:
            system = render_text(spec.system, scope, what=f"steps.{spec.id}.system")
            messages.append(ChatMessage(role="system", content=system))
        prompt = render_text(spec.prompt, scope, what=f"steps.{spec.id}.prompt")
        messages.append(ChatMessage(role="user", content=prompt))
        result = await self.provider.chat(
            ChatRequest(model=model, messages=tuple(messages), options=dict(spec.options))
        )
        return Step(
            id=spec.id,
            position=position,
            status=StepStatus.SUCCEEDED,
            output=result.text,
            model=f"{self.provider.name}/{result.model}",
            usage=result.usage,
        )


def _timed(step: Step, started: str, clock: float) -> Step:
    return msgspec.structs.replace(
        step,
        started_at=started,
        finished_at=iso_now(),
        duration_ms=round((time.perf_counter() - clock) * 1000, 3),
    )
