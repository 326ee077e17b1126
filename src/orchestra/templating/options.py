"""An llm step's ``options``: checked where a template is loaded, as its other fields are.

Options pass to the model server as written (Ollama's names; an OpenAI-compatible server gets
them renamed), and servers take options of their own, so an unknown name is allowed. But one a
letter or two from a known option (``temprature``) is a typo that silently loses the setting:
it is refused, naming the option meant. A known option of the wrong type (``temperature:
hot``) is refused too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from orchestra.templating.source import Checker, Path_


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _stop(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


_KINDS: dict[Callable[[Any], bool], str] = {
    _number: "a number",
    _integer: "an integer",
    _flag: "true or false",
    _stop: "a string or a list of strings",
}

#: Ollama's model options (its API's ``options``) and the OpenAI-style names templates may
#: use, each with what its value must be.
KNOWN: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(
        (
            "temperature",
            "top_p",
            "min_p",
            "typical_p",
            "tfs_z",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
            "mirostat_tau",
            "mirostat_eta",
        ),
        _number,
    ),
    **dict.fromkeys(
        (
            "seed",
            "num_predict",
            "max_tokens",
            "num_ctx",
            "num_batch",
            "num_keep",
            "num_gpu",
            "main_gpu",
            "num_thread",
            "top_k",
            "repeat_last_n",
            "mirostat",
        ),
        _integer,
    ),
    **dict.fromkeys(("penalize_newline", "numa", "low_vram", "use_mmap", "use_mlock"), _flag),
    "stop": _stop,
}


#: Other servers' options (vLLM's, OpenAI's) that look like a known one but are not typos.
OTHERS = frozenset(
    {
        "min_tokens",
        "repetition_penalty",
        "length_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "best_of",
        "ignore_eos",
        "skip_special_tokens",
    }
)


def check_options(c: Checker, path: Path_, options: dict[Any, Any]) -> None:
    """Report each known option of the wrong type, and each unknown name that is close to
    a known one, at its key."""
    for name, value in options.items():
        at = (*path, str(name))
        fits = KNOWN.get(str(name))
        if fits is None:
            if str(name) in OTHERS:
                continue
            near = difflib.get_close_matches(str(name), KNOWN, n=1, cutoff=0.85)
            if near:
                c.add(at, f"unknown option {name!r}; did you mean {near[0]!r}?")
        elif not fits(value):
            c.add(at, f"option {name!r} must be {_KINDS[fits]}, got {value!r}")
