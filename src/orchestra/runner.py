"""Running one task's steps in order: skip by ``when``, time out, record, render the output.

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
from orchestra.kinds import Context, Outcome, execute
from orchestra.llm.base import Provider
from orchestra.templating.isolation import Renderer
from orchestra.templating.model import StepSpec, Template
from orchestra.templating.render import evaluate, render_output


class StepRecorder(Protocol):
    """Where the runner reports steps. Raises ``LeaseLost`` when the task is no longer ours."""

    async def step_started(self, step_id: str, position: int) -> None: ...

    async def step_finished(self, step: Step) -> None: ...

    def step_text(self, step_id: str, text: str) -> None:
        """A piece of a step's answer as it streams (recorded soon, in order)."""
        ...


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

    def __init__(self, provider: Provider, render: Renderer) -> None:
        self.provider = provider
        self.render = render

    async def run(self, task: Task, template: Template, recorder: StepRecorder) -> Any:
        """Run every step in order and return the task's result.

        Raises:
            StepFailed: a step (or the output) failed; the step is recorded as failed first.
            LeaseLost: from the recorder, when another attempt took the task over.
        """
        outputs: dict[str, dict[str, Any]] = {}
        scope: dict[str, Any] = {"params": task.params, "steps": outputs}
        prompts: dict[str, list[dict[str, str]]] = {}  # kept with the step, failed or not
        ctx = Context(
            task=task,
            template=template,
            provider=self.provider,
            render=self.render,
            on_text=recorder.step_text,
            on_prompt=prompts.__setitem__,
        )
        for position, spec in enumerate(template.steps):
            await recorder.step_started(spec.id, position)
            started, clock = iso_now(), time.perf_counter()
            try:
                outcome = await self._step(spec, scope, ctx)
            except StepError as exc:
                error = TaskError(
                    type=exc.code, message=exc.message, step=spec.id, retryable=exc.retryable
                )
                await recorder.step_finished(
                    _timed(
                        Step(
                            id=spec.id,
                            position=position,
                            status=StepStatus.FAILED,
                            error=error,
                            prompt=prompts.get(spec.id),
                        ),
                        started,
                        clock,
                    )
                )
                raise StepFailed(spec.id, exc) from exc
            if outcome is None:
                step = Step(id=spec.id, position=position, status=StepStatus.SKIPPED)
            else:
                step = Step(
                    id=spec.id,
                    position=position,
                    status=StepStatus.SUCCEEDED,
                    output=outcome.output,
                    model=outcome.model,
                    usage=outcome.usage,
                    prompt=prompts.get(spec.id),
                )
            await recorder.step_finished(_timed(step, started, clock))
            outputs[spec.id] = {"output": step.output}
        if template.output is None:
            return outputs[template.steps[-1].id]["output"]
        try:
            return await ctx.render(render_output, template.output, scope)
        except StepError as exc:
            raise StepFailed("output", exc) from exc

    @staticmethod
    async def _step(spec: StepSpec, scope: dict[str, Any], ctx: Context) -> Outcome | None:
        """Run one step; None when its ``when`` is false (skipped)."""
        if spec.when and not await ctx.render(
            evaluate, spec.when, scope, what=f"steps.{spec.id}.when"
        ):
            return None
        try:
            # Leaving the timeout cancels what the step runs, closing any model connection.
            async with asyncio.timeout(spec.timeout):
                return await execute(spec, scope, ctx)
        except TimeoutError:
            raise StepTimeout(
                f"step {spec.id!r} took longer than its timeout of {spec.timeout:g}s"
            ) from None


def _timed(step: Step, started: str, clock: float) -> Step:
    return msgspec.structs.replace(
        step,
        started_at=started,
        finished_at=iso_now(),
        duration_ms=round((time.perf_counter() - clock) * 1000, 3),
    )
