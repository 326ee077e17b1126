"""The model process: llama.cpp, through llama-cpp-python, in a child of the service.

Run as ``python -m orchestra.llm.model_child`` by :mod:`orchestra.llm.model_process`; this is
the only module that imports ``llama_cpp``. Native code that crashes (a CPU feature the build
assumed, a bad GGUF file, running out of memory) kills this process, and the service, which
only reads its pipe, records the crash and starts another.

The process speaks :mod:`orchestra.llm.model_wire` on stdin/stdout. A reader thread takes every
frame as it arrives, so a :class:`~orchestra.llm.model_wire.Cancel` is seen while a generation
runs (checked between tokens), and end-of-file on stdin (the service is gone, even killed)
ends the process at once. Requests are served one at a time, in order: the model is not
thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time
from typing import IO, Any

from orchestra.llm import model_wire as wire

#: llama-cpp-python's words when a prompt does not fit the context window.
_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


class _Cancelled(Exception):
    """The service asked to stop this request."""


class _Channel:
    """Frames in from stdin (on a reader thread), frames out to the private copy of stdout."""

    def __init__(self, incoming: IO[bytes], outgoing: IO[bytes]) -> None:
        self._in = incoming
        self._out = outgoing
        self.inbox: queue.Queue[wire.ToChild] = queue.Queue()
        self.cancelled: set[int] = set()

    def send(self, message: wire.FromChild) -> None:
        self._out.write(wire.frame(message))
        self._out.flush()  # a buffered writer's flush writes all of it, even when interrupted

    def read_forever(self) -> None:
        """Queue requests and note cancels; exit the process when the service is gone, or
        when what it sends cannot be read (it would wait for ever on a stream it lost)."""
        try:
            while True:
                header = self._in.read(wire.HEADER.size)
                if len(header) < wire.HEADER.size:
                    os._exit(0)  # the service closed the pipe or died: nobody to answer
                body = self._in.read(wire.body_length(header))
                message = wire.to_child.decode(body)
                if isinstance(message, wire.Cancel):
                    self.cancelled.add(message.id)
                else:
                    self.inbox.put(message)
        except BaseException as exc:
            sys.stderr.write(f"model process: cannot read the service's frames: {exc!r}\n")
            os._exit(4)

    def check(self, request_id: int) -> None:
        if request_id in self.cancelled:
            raise _Cancelled()


class _Abort:
    """Stops llama.cpp in the middle of evaluating a prompt when its request is cancelled.

    Evaluating a long prompt is one call into llama.cpp that can take many seconds, with no
    token to check a cancel between. llama.cpp asks an abort callback after each step of its
    compute graph; the callback is set only while a prompt is evaluated, because while tokens
    stream it would be asked hundreds of times per token, each a trip into Python.
    """

    def __init__(self, channel: _Channel) -> None:
        import llama_cpp

        self._api = llama_cpp
        self.request_id = 0
        # Kept referenced: llama.cpp holds only the C pointer.
        self._callback = llama_cpp.ggml_abort_callback(
            lambda _data: self.request_id in channel.cancelled
        )
        self._none = llama_cpp.ggml_abort_callback()
        self._on = False

    def watch(self, llm: Any, request_id: int) -> None:
        self.request_id = request_id
        self._api.llama_set_abort_callback(llm._ctx.ctx, self._callback, None)
        self._on = True

    def stop_watching(self, llm: Any) -> None:
        if self._on:
            self._api.llama_set_abort_callback(llm._ctx.ctx, self._none, None)
            self._on = False


class _Model:
    """The loaded model (and, on first use, a second instance for embeddings)."""

    def __init__(self, load: wire.Load, channel: _Channel) -> None:
        self.load = load
        self.llm: Any = None
        self.embedder: Any = None
        self.n_ctx = load.context_length
        self.abort = _Abort(channel)

    def _open(self, embedding: bool, n_ctx: int) -> Any:
        from llama_cpp import Llama

        return Llama(
            model_path=self.load.model_path,
            n_ctx=n_ctx,
            n_threads=self.load.threads or None,
            embedding=embedding,
            verbose=False,
        )

    def _open_sized(self) -> Any:
        """The model, with the context asked for, else the one it was trained for up to
        ``wire.DEFAULT_CONTEXT`` (the cache grows with it: 128k tokens of a large model take
        many GB). The trained length is read from the loaded model: opened at the default,
        then again at its own when that is shorter. (A vocabulary-only load, which reads no
        hyperparameters, said 0, and printed a context warning every crash report quoted.)"""
        if self.load.context_length:
            return self._open(embedding=False, n_ctx=self.load.context_length)
        llm = self._open(embedding=False, n_ctx=wire.DEFAULT_CONTEXT)
        trained = int(llm._model.n_ctx_train())
        if 0 < trained < wire.DEFAULT_CONTEXT:
            llm.close()
            llm = self._open(embedding=False, n_ctx=trained)
        return llm

    def start(self) -> wire.Loaded:
        started = time.perf_counter()
        self.llm = self._open_sized()
        self.n_ctx = int(self.llm.n_ctx())
        return wire.Loaded(
            n_ctx=int(self.llm.n_ctx()),
            n_ctx_train=int(self.llm._model.n_ctx_train()),
            load_ms=_ms_since(started),
        )

    def generate(self, request: wire.Generate, channel: _Channel) -> wire.Generated:
        llm = self.llm
        kwargs = dict(request.options)
        if kwargs.get("seed") is None:
            # Drawn afresh: llama.cpp's own draw without one starts over in every process and
            # after every seeded call, so unseeded sampling answered the same each time.
            kwargs["seed"] = secrets.randbits(31)
        if request.response_format is not None:
            kwargs["response_format"] = request.response_format
        from llama_cpp import LogitsProcessorList

        sampled = [0]

        def counted(_ids: Any, scores: Any) -> Any:  # asked once per token sampled
            sampled[0] += 1
            return scores

        kwargs["logits_processor"] = LogitsProcessorList([counted])
        started = time.perf_counter()
        first_token: float | None = None
        parts: list[str] = []
        finish: str | None = None
        self.abort.watch(llm, request.id)
        try:
            chunks = llm.create_chat_completion(messages=request.messages, stream=True, **kwargs)
            for chunk in chunks:
                self.abort.stop_watching(llm)
                channel.check(request.id)
                self._take(request.id, chunk, parts, channel)
                if parts and first_token is None:
                    first_token = time.perf_counter()
                finish = chunk["choices"][0].get("finish_reason") or finish
        except Exception:
            llm.reset()  # an aborted prompt may leave part of it in the cache: start afresh
            raise
        finally:
            self.abort.stop_watching(llm)
        ended = time.perf_counter()
        generated = first_token or ended
        # Counted as llama.cpp's own usage counts them, not as streamed pieces (one may hold
        # several tokens: 488 pieces of 512 tokens in German). Every token sampled but the
        # last was evaluated into the context after the prompt; the last one is the answer's
        # only when it was cut at its length (else it was the end, or held the stop string).
        text = "".join(parts)
        if text and not sampled[0]:
            # A build whose custom samplers are not called (llama-cpp-python swallows their
            # errors): the text tokenized again, which counts the same in all but rare cases.
            sampled[0] = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            sampled[0] += 0 if finish == "length" else 1
        last = 1 if sampled[0] else 0
        completion = sampled[0] - (0 if finish == "length" else last)
        return wire.Generated(
            id=request.id,
            text=text,
            prompt_tokens=max(0, int(llm.n_tokens) - sampled[0] + last),
            completion_tokens=completion,
            finish_reason=finish,
            prompt_ms=round((generated - started) * 1000, 3),
            generation_ms=round((ended - generated) * 1000, 3),
        )

    @staticmethod
    def _take(request_id: int, chunk: Any, parts: list[str], channel: _Channel) -> None:
        """Keep a streamed piece of text and send it on."""
        piece = chunk["choices"][0].get("delta", {}).get("content")
        if piece:
            parts.append(piece)
            channel.send(wire.Text(request_id, piece))

    def embed(self, request: wire.Embed, channel: _Channel) -> wire.Embedded:
        started = time.perf_counter()
        if self.embedder is None:
            self.embedder = self._open(embedding=True, n_ctx=self.n_ctx)
        vectors: list[list[float]] = []
        tokens = 0
        for text in request.inputs:
            channel.check(request.id)
            tokens += len(self.embedder.tokenize(text.encode("utf-8")))
            vectors.append(_pooled(self.embedder.embed(text)))
        return wire.Embedded(
            id=request.id, vectors=vectors, prompt_tokens=tokens, total_ms=_ms_since(started)
        )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _pooled(embedding: Any) -> list[float]:
    """One vector per input: llama.cpp returns per-token vectors for models without pooling."""
    if embedding and isinstance(embedding[0], list):
        width = len(embedding[0])
        return [sum(row[i] for row in embedding) / len(embedding) for i in range(width)]
    return [float(x) for x in embedding]


def _failure(request_id: int, exc: Exception) -> wire.Failed:
    """What went wrong with one request, in words for the task's error."""
    if isinstance(exc, _Cancelled):
        return wire.Failed(request_id, "cancelled", "cancelled")
    text = str(exc) or type(exc).__name__
    too_long = _TOO_LONG.search(text)
    if too_long:
        tokens, window = too_long.groups()
        return wire.Failed(
            request_id,
            "too_long",
            f"the prompt has {tokens} tokens, more than the model's context window of "
            f"{window}; shorten the text, or split it into parts (the built-in "
            "summarize_long template summarizes a text of any length)",
        )
    return wire.Failed(request_id, "invalid", text)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the service dies (besides end-of-file on stdin)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def serve(channel: _Channel) -> None:
    """Load the model the first message names, then answer requests until stdin closes."""
    load = channel.inbox.get()
    if not isinstance(load, wire.Load):
        channel.send(wire.Failed(0, "load", f"expected a load message first, got {load!r}"))
        return
    model = _Model(load, channel)
    try:
        channel.send(model.start())
    except Exception as exc:  # llama-cpp-python says ValueError; keep any reason it gives
        channel.send(wire.Failed(0, "load", f"cannot load {load.model_path}: {exc}"))
        return
    while True:
        request = channel.inbox.get()
        if not isinstance(request, (wire.Generate, wire.Embed)):
            continue  # a second load: the model is loaded once
        channel.send(wire.Started(request.id))
        try:
            channel.check(request.id)
            if isinstance(request, wire.Generate):
                channel.send(model.generate(request, channel))
            else:
                channel.send(model.embed(request, channel))
        except Exception as exc:  # too long a prompt, a schema the grammar cannot express…
            cancelled = request.id in channel.cancelled  # an abort surfaces as an error
            channel.send(_failure(request.id, _Cancelled() if cancelled else exc))
        finally:
            channel.cancelled.discard(request.id)


def main() -> None:
    """Entry point of the model process."""
    # Frames go to a private copy of stdout; fd 1 then points at stderr, so whatever native
    # code prints lands in the service's log instead of corrupting a frame.
    outgoing = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops its children itself
    _die_with_parent()
    channel = _Channel(sys.stdin.buffer, outgoing)
    threading.Thread(target=channel.read_forever, name="model-inbox", daemon=True).start()
    serve(channel)
    outgoing.flush()
    os._exit(3)  # loading failed: the service was told why; nothing more to do


if __name__ == "__main__":
    main()
