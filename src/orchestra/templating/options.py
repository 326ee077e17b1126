"""An llm step's ``options``: checked where a template is loaded, as its other fields are.

Options pass to the model server as written (Ollama's names; an OpenAI-compatible server gets
them renamed), and servers take options of their own, so an unknown name is allowed. But one a
single typo from a known option (``temprature``: a letter left out, added, changed or two
swapped) silently loses the setting: it is refused, naming the option meant. A known option
of the wrong type (``temperature: hot``) is refused too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestra.templating.params import non_finite
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


#: Other servers' options (llama.cpp's, vLLM's, OpenAI's) one edit from a known one.
OTHERS = frozenset({"top_a", "n_keep", "n_probs", "typ_p", "min_keep"})

#: Names shorter than this are not checked for typos: too many real options are one letter
#: from each other there (top_a, top_k, top_p).
TYPO_MIN_LENGTH = 6


def one_edit_apart(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one insertion, deletion, substitution, or swap of two
    neighbouring letters (a typo); False when they are equal."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diffs) == 1 or (
            len(diffs) == 2
            and diffs[1] == diffs[0] + 1
            and a[diffs[0]] == b[diffs[1]]
            and a[diffs[1]] == b[diffs[0]]
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    return short[i:] == long[i + 1 :]


def check_options(c: Checker, path: Path_, options: dict[Any, Any]) -> None:
    """Report each known option of the wrong type, and each unknown name that is close to
    a known one, at its key."""
    for name, value in options.items():
        at = (*path, str(name))
        fits = KNOWN.get(str(name))
        if fits is None:
            if str(name) in OTHERS or len(str(name)) < TYPO_MIN_LENGTH:
                continue
            near = next((known for known in KNOWN if one_edit_apart(str(name), known)), None)
            if near:
                c.add(at, f"unknown option {name!r}; did you mean {near!r}?")
        elif not fits(value):
            c.add(at, f"option {name!r} must be {_KINDS[fits]}, got {value!r}")
            continue
        if non_finite({name: value}):
            # YAML's .nan and .inf: JSON has neither, so no model server could be sent them.
            c.add(
                at,
                f"option {name!r} holds .inf or .nan, or a number past ±1.8e308: only finite "
                "numbers can be sent",
            )
