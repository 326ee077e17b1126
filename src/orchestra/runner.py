"""Running one task's steps in order: skip by ``when``, time out, record, render the output.

The runner knows templates and providers, nothing about SQL or HTTP servers: it reports each
step through a :class:`StepRecorder`, which the worker backs with the store (fenced by the
task's lease).

What it reports is bounded by ``[limits]``: a step whose output (or streamed answer) is over
``max_step_output_bytes`` fails, and the result is held to ``max_result_bytes``; neither is
recorded then, only the error naming the limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import msgspec

from orchestra import metrics
from orchestra.config import LimitSettings
from orchestra.domain import Step, StepStatus, Task, TaskError, Usage, iso_now, total_usage
from orchestra.errors import ProviderUnavailable, StepError
from orchestra.kinds import Context, run_step
from orchestra.llm import passed_over
from orchestra.llm.base import Provider
from orchestra.llm.cache import AnswerCache
from orchestra.sizes import check_size, clip_message, too_large
from orchestra.templating.isolation import Renderer
from orchestra.templating.model import StepSpec, Template
from orchestra.templating.render import render_output


class StepRecorder(Protocol):
    """Where the runner reports steps. Raises ``LeaseLost`` when the task is no longer ours.

    A report need not be written when it is made: the worker's recorder writes the step that
    ends the attempt together with the task's end, and the claim has started the first step.
    """

    async def step_started(self, step_id: str, position: int) -> None: ...

    async def step_finished(self, step: Step) -> None: ...

    def step_text(self, step_id: str, text: str) -> None:
        """A piece of a step's answer as it streams (recorded soon, in order)."""
        ...

    def step_cut(self, step: Step) -> None:
        """A step cut short from outside (the task's timeout, a cancel, the service stopping),
        with what it had (its prompt, usage, fallbacks): written with the attempt's end, which
        gives it its error."""
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
        return _task_error(self.cause, self.step_id)


def _task_error(exc: StepError, step_id: str) -> TaskError:
    """A step's error as stored: its message clipped (listings show it)."""
    return TaskError(
        type=exc.code,
        message=clip_message(exc.message),
        step=step_id,
        retryable=exc.retryable,
        retry_after=(exc.retry_after or None) if isinstance(exc, ProviderUnavailable) else None,
    )


class _BoundedText:
    """Hands an llm step's streamed answer on to the recorder up to ``[limits]
    max_step_output_bytes`` (UTF-8) per step. The piece that passes it raises, which stops the
    model call where the provider lets it; nothing after it is recorded."""

    def __init__(self, recorder: StepRecorder, limit: int) -> None:
        self.recorder = recorder
        self.limit = limit
        self.sent: dict[str, int] = {}

    def __call__(self, step_id: str, text: str) -> None:
        sent = self.sent.get(step_id, 0)
        if sent > self.limit:
            return  # already failed: a provider that carries on past the error is ignored
        sent = self.sent[step_id] = sent + len(text.encode())
        if sent > self.limit:
            raise too_large(
                "the step's streamed answer",
                sent,
                self.limit,
                "max_step_output_bytes",
                more=" or more",
            )
        self.recorder.step_text(step_id, text)


class Runner:
    """Executes templates against a provider."""

    def __init__(
        self,
        provider: Provider,
        render: Renderer,
        limits: LimitSettings | None = None,
        cache: AnswerCache | None = None,
    ) -> None:
        """``limits``: the service's ``[limits]`` (the defaults when None); ``cache``: the
        cache of model answers (None: every call asks the model)."""
        self.provider = provider
        self.render = render
        self.limits = limits or LimitSettings()
        self.cache = cache
        #: For templates registered over the API: every render in a render process.
        self.render_untrusted = render.untrusted()

    async def run(
        self,
        task: Task,
        template: Template,
        recorder: StepRecorder,
    ) -> Any:
        """Run every step in order and return the task's result.

        Raises:
            StepFailed: a step (or the output) failed; the step is recorded as failed first.
                Also a step whose output is over ``max_step_output_bytes`` (its output is not
                recorded), and a result over ``max_result_bytes`` (step ``output``).
            LeaseLost: from the recorder, when another attempt took the task over.
        """
        limits = self.limits
        outputs: dict[str, dict[str, Any]] = {}
        scope: dict[str, Any] = {"params": task.params, "steps": outputs}
        prompts: dict[str, list[dict[str, str]]] = {}  # kept with the step, failed or not
        answers: list[tuple[str, Usage]] = []  # the running step's, kept if it fails
        ctx = Context(
            task=task,
            template=template,
            provider=self.provider,
            render=self.render if template.origin != "api" else self.render_untrusted,
            on_text=_BoundedText(recorder, limits.max_step_output_bytes),
            on_prompt=prompts.__setitem__,
            limits=limits,
            cache=self.cache,
            on_answer=lambda model, usage: answers.append((model, usage)),
        )
        for position, spec in enumerate(template.steps):
            answers.clear()
            await recorder.step_started(spec.id, position)
            started, clock = iso_now(), time.perf_counter()
            try:
                with passed_over.noting() as fallbacks, passed_over.asking() as asked:
                    outcome = await run_step(
                        spec,
                        scope,
                        ctx,
                        where=f"steps.{spec.id}",
                        late=_late,
                    )
                if outcome is not None:
                    check_size(
                        outcome.output,
                        limits.max_step_output_bytes,
                        "the step's output",
                        "max_step_output_bytes",
                    )
            except asyncio.CancelledError:
                # The task's timeout, a cancel or the service stopping cut the step short: it
                # is timed and kept all the same (the worker records how the task ended).
                seconds = time.perf_counter() - clock
                metrics.step_interrupted(spec.kind, seconds, asked[-1] if asked else None)
                cut = Step(
                    id=spec.id,
                    position=position,
                    status=StepStatus.FAILED,
                    model=answers[-1][0] if answers else None,
                    usage=total_usage(usage for _, usage in answers),
                    prompt=prompts.get(spec.id),
                    fallbacks=tuple(fallbacks) or None,
                )
                recorder.step_cut(_timed(cut, started, clock))
                raise
            except StepError as exc:
                error = _task_error(exc, spec.id)
                failed = _timed(
                    Step(
                        id=spec.id,
                        position=position,
                        status=StepStatus.FAILED,
                        error=error,
                        model=answers[-1][0] if answers else None,
                        usage=total_usage(usage for _, usage in answers),
                        prompt=prompts.get(spec.id),
                        fallbacks=tuple(fallbacks) or None,
                    ),
                    started,
                    clock,
                )
                metrics.step_finished(spec.kind, failed, asked[-1] if asked else None)
                await recorder.step_finished(failed)
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
                    fallbacks=tuple(fallbacks) or None,
                )
            step = _timed(step, started, clock)
            metrics.step_finished(spec.kind, step)
            await recorder.step_finished(step)
            outputs[spec.id] = {"output": step.output}
        try:
            if template.output is None:
                result = outputs[template.steps[-1].id]["output"]
            else:
                result = await ctx.render(render_output, template.output, scope)
            check_size(result, limits.max_result_bytes, "the task's result", "max_result_bytes")
        except StepError as exc:
            raise StepFailed("output", exc) from exc
        return result


def _late(spec: StepSpec) -> str:
    return f"step {spec.id!r} took longer than its timeout of {spec.timeout:g}s"


def _timed(step: Step, started: str, clock: float) -> Step:
    return msgspec.structs.replace(
        step,
        started_at=started,
        finished_at=iso_now(),
        duration_ms=round((time.perf_counter() - clock) * 1000, 3),
    )
