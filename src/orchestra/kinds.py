"""One executor per step kind: what a step does, given the scope of rendered values.

Each returns an :class:`Outcome` (the output, the model that answered, what it cost) or raises
a ``StepError``. Nothing here knows about SQL or HTTP servers; the runner records the results.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import msgspec
from referencing.exceptions import Unresolvable

from orchestra.config import DEFAULT_MODEL, LimitSettings
from orchestra.domain import Task, Usage, total_usage
from orchestra.errors import InvalidOutput, RenderError, StepError, StepTimeout
from orchestra.llm.base import ChatMessage, ChatRequest, ChatResult, Provider
from orchestra.llm.cache import AnswerCache
from orchestra.sizes import json_size, too_large
from orchestra.templating.isolation import Renderer
from orchestra.templating.model import (
    EmbedStep,
    LlmStep,
    MapStep,
    ParseJsonStep,
    RenderStep,
    StepSpec,
    Template,
)
from orchestra.templating.params import schema_reason
from orchestra.templating.regex import check_schema, schema_problems, validator
from orchestra.templating.render import evaluate, parse_json_text, render_text
from orchestra.templating.schema_refs import ref_problems
from orchestra.templating.source import format_path

Scope = dict[str, Any]


class Outcome(msgspec.Struct, frozen=True):
    """What a step produced."""

    output: Any
    model: str | None = None
    usage: Usage | None = None


class Context(msgspec.Struct, frozen=True):
    """What every executor may need besides the step and its scope."""

    task: Task
    template: Template
    provider: Provider
    #: Runs renders without holding the event loop up (see ``templating.isolation``).
    render: Renderer
    #: Receives (step id, text) while an llm step's answer streams; None: do not stream.
    on_text: Callable[[str, str], None] | None = None
    #: Receives (step id, messages) when an llm step's prompt is rendered, before the call.
    on_prompt: Callable[[str, list[dict[str, str]]], None] | None = None
    #: The service's [limits] (a map's items and output are held to them).
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    #: The cache of model answers; None: every call asks the model.
    cache: AnswerCache | None = None
    #: Receives ("provider/model", usage) for every answer a model gave (a repair's, a map
    #: item's too), so that a step that fails afterwards still records who answered and what
    #: it cost.
    on_answer: Callable[[str, Usage], None] | None = None


def _model(ctx: Context, override: str | None) -> str:
    """The model a step asks: its own, the task's, the template's, else the logical name
    ``default`` (the router says so when [models] has no such chain)."""
    return override or ctx.task.model or ctx.template.model or DEFAULT_MODEL


def _unusable(schema: dict[str, Any]) -> str | None:
    """Why no value could be checked against ``schema`` (a regex RE2 cannot take, a remote,
    unresolvable or looping $ref), or None. Schemas in templates were checked when loaded;
    one from a ``format`` expression or a parameter is checked here."""
    found = [(path, why) for path, why, _ in schema_problems(schema)] or ref_problems(schema)
    if not found:
        return None
    path, why = found[0]
    return f"{format_path(path) or '(top)'}: {why}"


def _schema_problems(value: Any, schema: dict[str, Any]) -> list[str]:
    why = _unusable(schema)
    if why:
        raise StepError(f"the JSON Schema cannot be used: {why}")
    try:
        errors = sorted(validator(schema).iter_errors(value), key=_error_path)
    except RecursionError:  # a recursive schema, and a value nested deeper than Python goes
        return ["(top level): the value nests too deeply to be checked against the schema"]
    except Unresolvable as exc:  # schema_refs refuses these first; nothing is fetched
        raise StepError(f"the JSON Schema cannot be used: $ref {exc}") from None
    return [
        f"{format_path(tuple(err.absolute_path)) or '(top level)'}: {schema_reason(err)}"
        for err in errors
    ]


def _error_path(err: jsonschema.ValidationError) -> list[Any]:
    return list(err.absolute_path)


#: How much of an invalid structured reply its step's error quotes, in characters.
REPLY_SHOWN = 300


def _fits(schema: dict[str, Any] | None) -> Callable[[Any], bool] | None:
    """Whether a value fits ``schema``, to find the one in a reply that does (None: no
    schema, the first value is the answer)."""
    if schema is None:
        return None
    return lambda value: not _schema_problems(value, schema)


def _check_json(text: str, schema: dict[str, Any] | None) -> tuple[Any, list[str]]:
    try:
        value = parse_json_text(text, _fits(schema))
    except ValueError as exc:
        return None, [f"the reply is not JSON ({exc})"]
    return value, ([] if schema is None else _schema_problems(value, schema))


async def _format(spec: LlmStep, scope: Scope, ctx: Context) -> str | dict[str, Any] | None:
    fmt = spec.format
    if fmt is None or fmt == "json" or isinstance(fmt, dict):
        return fmt
    # An expression, bare or in one {{ }}: evaluate() unwraps it (a bare one may end in }}).
    value = await ctx.render(evaluate, fmt, scope, what=f"steps.{spec.id}.format")
    if not isinstance(value, dict):
        raise RenderError(
            f"steps.{spec.id}.format must give a JSON Schema (a mapping), got "
            f"{type(value).__name__}"
        )
    try:
        check_schema(value)
    except jsonschema.SchemaError as exc:
        raise RenderError(
            f"steps.{spec.id}.format is not a valid JSON Schema: {exc.message}"
        ) from None
    why = _unusable(value)  # refused before the model is asked
    if why:
        raise RenderError(f"steps.{spec.id}.format cannot be used as a JSON Schema: {why}")
    return value


def _messages(spec: LlmStep, scope: Scope) -> list[ChatMessage]:
    where = f"steps.{spec.id}"
    if spec.messages:
        return [
            ChatMessage(
                role=m.role, content=render_text(m.content, scope, what=f"{where}.messages[{i}]")
            )
            for i, m in enumerate(spec.messages)
        ]
    out = []
    if spec.system:
        out.append(ChatMessage("system", render_text(spec.system, scope, what=f"{where}.system")))
    assert spec.prompt is not None  # the loader requires prompt or messages
    out.append(ChatMessage("user", render_text(spec.prompt, scope, what=f"{where}.prompt")))
    return out


async def _chat(
    spec: LlmStep,
    ctx: Context,
    request: ChatRequest,
    on_text: Callable[[str], None] | None,
) -> ChatResult:
    """Ask the model, through the cache of model answers when the service has one."""
    if ctx.cache is None:
        result = await ctx.provider.chat(request, on_text)
    else:
        result = await ctx.cache.chat(
            ctx.provider, request, on_text, step=spec.cache, task=ctx.task.cache
        )
    if ctx.on_answer is not None:  # (flagged as cut, as the step's own usage is)
        ctx.on_answer(f"{result.provider}/{result.model}", result.usage.flag_truncation(None))
    return result


async def run_llm(spec: LlmStep, scope: Scope, ctx: Context) -> Outcome:
    """Ask the model; with ``format``, parse and check the reply and ask for repairs."""
    model = _model(ctx, spec.model)
    fmt = await _format(spec, scope, ctx)
    messages = await ctx.render(_messages, spec, scope)
    if ctx.on_prompt is not None:
        ctx.on_prompt(spec.id, [{"role": m.role, "content": m.content} for m in messages])
    request = ChatRequest(
        model=model,
        messages=tuple(messages),
        options=dict(spec.options),
        format=fmt,
        think=spec.think,
    )
    stream = ctx.on_text
    on_text = None if stream is None else (lambda text: stream(spec.id, text))
    result = await _chat(spec, ctx, request, on_text)
    num_ctx = spec.options.get("num_ctx")
    limit = num_ctx if isinstance(num_ctx, int) else None
    usage = result.usage.flag_truncation(limit)
    answered = f"{result.provider}/{result.model}"
    if fmt is None:
        return Outcome(result.text, answered, usage)
    schema = fmt if isinstance(fmt, dict) else None
    for repair in range(spec.repair_attempts + 1):
        value, problems = _check_json(result.text, schema)
        if not problems:
            return Outcome(value, answered, usage)
        if repair == spec.repair_attempts:
            break
        # Show the model its own reply and what is wrong with it, and ask again.
        listed = "\n".join(f"- {p}" for p in problems[:10])
        messages += [
            ChatMessage("assistant", result.text),
            ChatMessage(
                "user",
                "Your reply is not valid:\n" + listed + "\nAnswer again with "
                "only the corrected JSON" + (" matching the schema." if schema else "."),
            ),
        ]
        request = msgspec.structs.replace(request, messages=tuple(messages))
        result = await _chat(spec, ctx, request, on_text)
        usage = usage.plus(result.usage.flag_truncation(limit))
    # The last reply itself, the start of it: what to look at (a step's output is not kept
    # when it fails, and the message is clipped as every task error is).
    shown = result.text if len(result.text) <= REPLY_SHOWN else result.text[:REPLY_SHOWN] + "…"
    cut = result.usage.finish_reason == "length"  # (the model stopped at its length limit)
    raise InvalidOutput(
        f"the model's reply stayed invalid after {spec.repair_attempts} repair(s): "
        + "; ".join(problems[:5])
        + (
            "; the last reply was cut off at its length limit (raise options.num_predict, or "
            "the provider's max_tokens)"
            if cut
            else ""
        )
        + f"; its last reply: {shown!r}"
    )


async def run_render(spec: RenderStep, scope: Scope, ctx: Context) -> Outcome:
    """Render text, with no model call."""
    return Outcome(await ctx.render(render_text, spec.text, scope, what=f"steps.{spec.id}.text"))


async def run_parse_json(spec: ParseJsonStep, scope: Scope, ctx: Context) -> Outcome:
    """Parse JSON from the input (text, or an already parsed value) and check its schema."""
    value = await ctx.render(evaluate, spec.input, scope, what=f"steps.{spec.id}.input")
    if isinstance(value, str):
        try:
            value = parse_json_text(value, _fits(spec.schema))
        except ValueError as exc:
            raise InvalidOutput(
                f"steps.{spec.id}.input is not JSON ({exc}): {value[:200]!r}"
            ) from None
    if spec.schema is not None:
        problems = _schema_problems(value, spec.schema)
        if problems:
            raise InvalidOutput(f"the JSON does not match the schema: {'; '.join(problems[:5])}")
    return Outcome(value)


async def run_embed(spec: EmbedStep, scope: Scope, ctx: Context) -> Outcome:
    """Embed a string (one vector) or a list of strings (a list of vectors)."""
    value = await ctx.render(evaluate, spec.input, scope, what=f"steps.{spec.id}.input")
    single = isinstance(value, str)
    inputs = [value] if single else value
    if not isinstance(inputs, list | tuple) or not all(isinstance(i, str) for i in inputs):
        raise RenderError(f"steps.{spec.id}.input must give a string or a list of strings")
    result = await ctx.provider.embed(_model(ctx, spec.model), list(inputs))
    if ctx.on_answer is not None:
        ctx.on_answer(f"{result.provider}/{result.model}", result.usage)
    output = result.vectors[0] if single else result.vectors
    return Outcome(output, f"{result.provider}/{result.model}", result.usage)


class _MapOutput:
    """The JSON size of a map's output (``[a,b,…]``) as its items finish, in any order: the
    step fails at the first item that takes it over ``[limits] max_step_output_bytes``, not
    after every item has been built."""

    def __init__(self, items: int, limit: int) -> None:
        self.items = items
        self.limit = limit
        self.size = 2  # the brackets
        self.done = 0

    def add(self, output: Any) -> None:
        """Count one item's output (and its comma).

        Raises:
            InvalidOutput: the items so far are over the limit.
        """
        self.size += json_size(output, self.limit) + (1 if self.done else 0)
        self.done += 1
        if self.size > self.limit:
            raise too_large(
                "the step's output",
                self.size,
                self.limit,
                "max_step_output_bytes",
                more=f" or more (after {self.done} of {self.items} items)",
            )


def _map_items(spec: MapStep, items: Any, limit: int) -> list[Any] | tuple[Any, ...]:
    """The items ``over`` gave, checked: a list of at most ``[limits] max_map_items``."""
    if not isinstance(items, list | tuple):
        raise RenderError(f"steps.{spec.id}.over must give a list, got {type(items).__name__}")
    if len(items) > limit:
        raise RenderError(
            f"steps.{spec.id}.over gives {len(items)} items; the limit is {limit} "
            "([limits] max_map_items)"
        )
    return items


async def run_map(spec: MapStep, scope: Scope, ctx: Context) -> Outcome:
    """Run the inner step per item, ``concurrency`` at a time; results keep the input order."""
    over = await ctx.render(evaluate, spec.over, scope, what=f"steps.{spec.id}.over")
    items = _map_items(spec, over, ctx.limits.max_map_items)
    output = _MapOutput(len(items), ctx.limits.max_step_output_bytes)
    gate = asyncio.Semaphore(spec.concurrency)
    inner = spec.step
    ctx = msgspec.structs.replace(ctx, on_text=None)  # items do not stream their text

    where = f"steps.{spec.id}.step"

    def late(step: StepSpec) -> str:
        return f"an item of steps.{spec.id} took longer than {step.timeout:g}s"

    async def one(index: int, item: Any) -> Outcome:
        local = {**scope, "item": item, "index": index}
        try:
            outcome = await run_step(inner, local, ctx, where=where, late=late, gate=gate)
        except StepError as exc:
            # Which item, and the inner step's path in the template (its messages name it
            # as a step of its own: steps.item.text).
            message = exc.message.replace(f"steps.{inner.id}.", f"{where}.")
            exc.message = f"item {index} of steps.{spec.id}: {message}"
            exc.args = (exc.message,)
            raise
        if outcome is None:  # skipped by its `when`
            outcome = Outcome(None)
        output.add(outcome.output)  # over the limit: the other items are cancelled
        return outcome

    try:
        async with asyncio.TaskGroup() as group:
            runs = [group.create_task(one(i, item)) for i, item in enumerate(items)]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    outcomes = [r.result() for r in runs]
    usage = total_usage(o.usage for o in outcomes)
    model = next((o.model for o in outcomes if o.model), None)
    return Outcome([o.output for o in outcomes], model, usage)


Executor = Callable[[Any, Scope, Context], Awaitable[Outcome]]
EXECUTORS: dict[type, Executor] = {
    LlmStep: run_llm,
    RenderStep: run_render,
    ParseJsonStep: run_parse_json,
    EmbedStep: run_embed,
    MapStep: run_map,
}


async def execute(spec: StepSpec, scope: Scope, ctx: Context) -> Outcome:
    """Run one step of any kind."""
    return await EXECUTORS[type(spec)](spec, scope, ctx)


async def run_step(
    spec: StepSpec,
    scope: Scope,
    ctx: Context,
    *,
    where: str,
    late: Callable[[StepSpec], str],
    gate: asyncio.Semaphore | None = None,
) -> Outcome | None:
    """Run a step as its template says: skipped when its ``when`` is false, else within its
    timeout. A task's steps and a map's items both run through here.

    Args:
        where: the step's path in the template (``steps.ID``), named by a failing ``when``.
        late: the message, given the step, when it takes longer than its timeout.
        gate: held while the step executes (not while its ``when`` renders); the wait for it
            does not count against the timeout.

    Returns:
        The step's outcome; None when its ``when`` skipped it.

    Raises:
        StepTimeout: it took longer than ``spec.timeout``.
    """
    if spec.when and not await ctx.render(evaluate, spec.when, scope, what=f"{where}.when"):
        return None
    try:
        # Leaving the timeout cancels what the step runs, closing any model connection.
        async with gate or contextlib.nullcontext(), asyncio.timeout(spec.timeout):
            return await execute(spec, scope, ctx)
    except TimeoutError:
        raise StepTimeout(late(spec)) from None
