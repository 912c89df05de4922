"""Reward functions for the GRPO stage: the built-ins and the ones a user writes in Python.

A reward is `fn(completions, reference, **columns) -> list[float]`: one number per completion (TRL's
convention, higher is better), given the completions as text, each one's reference answer, and the row's other
columns by name (e.g. `prompt`, `country`). `training.rewards` names the rewards a run sums; register your own
with `nbtune.reward` (also a decorator) before building the config. Importing this module imports neither torch
nor transformers.
"""

from __future__ import annotations

import hashlib
import inspect
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

from nbtune.embedded.world import CAPITAL_ANSWER, LANGUAGE_ANSWER

RewardFunction = Callable[..., Sequence[float]]
_BUILT_IN: dict[str, RewardFunction] = {}
_USER: dict[str, RewardFunction] = {}


def normalise(text: str) -> str:
    """An answer as exact match compares it: whitespace collapsed, lower case, without a trailing period."""
    return " ".join(str(text).split()).lower().removesuffix(".").rstrip()


def exact_match(completions: Sequence[str], reference: Sequence[str], **columns: Any) -> list[float]:
    """1.0 where the completion is the reference answer (up to whitespace, case and a trailing period)."""
    return [float(normalise(c) == normalise(r)) for c, r in zip(completions, reference, strict=True)]


def _answer_form(template: str) -> re.Pattern[str]:
    """A world answer template ("The capital of {name} is {capital}.") as a pattern over one sentence."""
    parts = re.split(r"\{\w+\}", template.removesuffix("."))
    return re.compile(r"\S+".join(re.escape(p) for p in parts) + r"\.")


ANSWER_FORMS = tuple(_answer_form(t) for t in (CAPITAL_ANSWER, LANGUAGE_ANSWER))


def answer_form(completions: Sequence[str], reference: Sequence[str], **columns: Any) -> list[float]:
    """1.0 where the completion is one sentence in an answer form of the embedded world
    ("The capital of X is Y." or "People in X speak Y."), ending with its period; the facts are not checked."""
    return [float(any(form.fullmatch(c.strip()) for form in ANSWER_FORMS)) for c in completions]


def contains_answer(completions: Sequence[str], reference: Sequence[str], **columns: Any) -> list[float]:
    """1.0 where the reference's last word (the fact itself, e.g. the capital) appears in the completion."""
    def last_word(text: str) -> str:
        words = normalise(text).split()
        return words[-1] if words else ""
    return [float(bool(last_word(r)) and last_word(r) in normalise(c).split())
            for c, r in zip(completions, reference, strict=True)]


_BUILT_IN.update({"exact-match": exact_match, "format": answer_form, "contains-answer": contains_answer})
BUILT_IN = tuple(_BUILT_IN)


def register(fn: RewardFunction | None = None, *, name: str | None = None) -> Any:
    """Make `fn` a reward that `training.rewards` can name (its own name unless `name` is given); usable as
    `@nbtune.reward` or `@nbtune.reward(name="short")`. A name a built-in has is refused; registering a name
    again replaces the earlier function (a notebook cell run twice)."""
    def add(function: RewardFunction) -> RewardFunction:
        if not callable(function):
            raise TypeError(f"a reward must be a function (got {type(function).__name__})")
        key = name or function.__name__
        if key in _BUILT_IN:
            raise ValueError(f"reward name {key!r} is a built-in reward; give yours another name (name=...)")
        _USER[key] = function
        return function
    return add if fn is None else add(fn)


reward = register  # nbtune.reward


def names() -> tuple[str, ...]:
    """Every reward name `training.rewards` may use: the built-ins, then the registered ones."""
    return (*_BUILT_IN, *_USER)


def find(name: str) -> RewardFunction | None:
    return _BUILT_IN.get(name) or _USER.get(name)


def identity(name: str) -> str:
    """What a reward's result depends on, for the config's content hash: a built-in's name (the nbtune
    version covers its code), a user reward's source text hashed, so editing the function retrains."""
    function = _USER.get(name)
    if function is None:
        return name
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # no source kept (defined by exec): its compiled code instead
        code = getattr(function, "__code__", None)
        source = repr((code.co_code, code.co_consts)) if code else repr(function)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def scored(name: str, completions: Sequence[str], reference: Sequence[str], **columns: Any) -> list[float]:
    """The reward `name` of each completion, checked: one finite-or-None number per completion, or an error
    naming the reward and what it returned."""
    values = find(name)(list(completions), list(reference), **columns)  # type: ignore[misc]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"reward {name!r} must return a list of numbers, one per completion "
                        f"(got {type(values).__name__})")
    if len(values) != len(completions):
        raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions; "
                         "it must return one number per completion")
    bad = next((v for v in values if v is not None and not isinstance(v, numbers.Real)), None)
    if bad is not None:
        raise TypeError(f"reward {name!r} must return numbers (or None to skip a completion); got {bad!r} "
                        f"({type(bad).__name__})")
    return [None if v is None else float(v) for v in values]
