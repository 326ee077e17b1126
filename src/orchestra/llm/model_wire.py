"""What the service and its model process say to each other, and how it is framed.

The embedded model runs in a child process (:mod:`orchestra.llm.model_child`); the service
talks to it over the child's stdin and stdout. Each message is a msgspec Struct, encoded as
MessagePack and sent as one frame: a 4-byte big-endian length, then the bytes. Every request
carries an ``id``; the child answers it with :class:`Started` when it begins work on it, any
number of :class:`Text` pieces (a chat that streams), and then exactly one final message
(:class:`Generated`, :class:`Embedded` or :class:`Failed`). :class:`Cancel` asks the child to
stop a request early; the request still ends with its final message (``Failed`` with
``reason="cancelled"``).

::

    service                                       model process
    Load(path, context, threads) ──────────────►  loads the GGUF file
                                  ◄──────────────  Loaded(n_ctx, load_ms) | Failed(id=0)
    Generate(id=1, messages, …)   ──────────────►
                                  ◄──────────────  Started(1), Text(1, "Hel"), Text(1, "lo"), …
    Cancel(1)                     ──────────────►  (checked between tokens)
                                  ◄──────────────  Generated(1, …) | Failed(1, …)

When the service's end of the pipe closes (the service died), the child exits.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import msgspec

#: Frame header: the length of the MessagePack body that follows.
HEADER = struct.Struct(">I")
#: Largest frame either side accepts (a long prompt, a batch of embeddings).
MAX_FRAME = 256 * 1024 * 1024
#: Context window, in tokens, when none is set: the model's trained length, up to this.
DEFAULT_CONTEXT = 8192


class Load(msgspec.Struct, frozen=True, tag="load"):
    """Load the model; sent once, first."""

    model_path: str
    #: Context window in tokens; 0: the model's trained length, up to ``DEFAULT_CONTEXT``.
    context_length: int
    #: CPU threads; 0: llama.cpp's choice.
    threads: int


class Generate(msgspec.Struct, frozen=True, tag="generate"):
    """A chat completion, streamed back as :class:`Text` pieces."""

    id: int
    messages: list[dict[str, str]]
    #: llama-cpp-python keyword arguments (temperature, max_tokens, stop, seed, …).
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    #: llama-cpp-python's ``response_format`` (JSON, optionally with a schema).
    response_format: dict[str, Any] | None = None


class Embed(msgspec.Struct, frozen=True, tag="embed"):
    """One embedding vector per input."""

    id: int
    inputs: list[str]


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """Stop request ``id`` at the next token."""

    id: int


class Loaded(msgspec.Struct, frozen=True, tag="loaded"):
    """The model is loaded and ready."""

    n_ctx: int
    n_ctx_train: int
    load_ms: float


class Started(msgspec.Struct, frozen=True, tag="started"):
    """The child begins work on request ``id`` (the ones before it are finished)."""

    id: int


class Text(msgspec.Struct, frozen=True, tag="text"):
    """A piece of generated text."""

    id: int
    text: str


class Generated(msgspec.Struct, frozen=True, tag="generated"):
    """A chat completion finished."""

    id: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    prompt_ms: float
    generation_ms: float
    #: Loading the model for this request (embeddings load a second instance on first use).
    load_ms: float = 0.0


class Embedded(msgspec.Struct, frozen=True, tag="embedded"):
    """Embeddings computed."""

    id: int
    vectors: list[list[float]]
    prompt_tokens: int
    total_ms: float


FailureReason = Literal["invalid", "too_long", "cancelled", "load"]


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    """A request (or, with ``id`` 0, loading the model) failed without harm to the process."""

    id: int
    reason: FailureReason
    message: str


ToChild = Load | Generate | Embed | Cancel
FromChild = Loaded | Started | Text | Generated | Embedded | Failed

_encoder = msgspec.msgpack.Encoder()
to_child = msgspec.msgpack.Decoder(ToChild)
from_child = msgspec.msgpack.Decoder(FromChild)


def frame(message: ToChild | FromChild) -> bytes:
    """One message as a length-prefixed frame."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """The length a frame header announces.

    Raises:
        ValueError: the length is beyond :data:`MAX_FRAME` (the stream is corrupt).
    """
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes announced (limit {MAX_FRAME})")
    return int(length)
