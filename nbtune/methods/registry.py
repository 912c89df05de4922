"""The one registry of tuning methods.

Each `Method` describes itself — name, family, one-line description, paper, its fields (type, default, range,
help), its recommended learning rate, and how to apply it to a model — and the widget forms, the memory
estimator, the docs and the config validation all read this same description. The hooks that apply a method
are plain functions of modules that import torch, transformers and peft only when called, so reading the
registry never imports them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nbtune._lazy import import_heavy
from nbtune.tasks import TASKS

FIELD_KINDS = ("int", "float", "bool", "choice", "str", "str-list", "int-list")
ALL_TASKS = tuple(n for n, t in TASKS.items() if t.library == "transformers")  # a method's default
DRAWING_TASKS = tuple(n for n, t in TASKS.items() if t.draws)  # only the methods that name them train them


@dataclass(frozen=True)
class Field:
    """One parameter of a method, as a form shows it and as validation checks it."""

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    optional: bool = False  # None is allowed (means "the library's automatic choice")

    def check(self, value: Any, prefix: str = "method") -> str | None:
        """An error message naming the field, the value and what is allowed, or None if the value is fine."""
        name = f"{prefix}.{self.name}"
        if value is None:
            return None if self.optional else f"{name} is required ({self.help})"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{name} must be true or false (got {value!r})"
        if self.kind in ("int", "float"):
            ok_type = isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float))
            if not ok_type or isinstance(value, bool):
                return f"{name} must be {'an integer' if self.kind == 'int' else 'a number'} (got {value!r})"
            if value != value or value in (float("inf"), float("-inf")):  # NaN fails every bound check below
                return f"{name} must be a finite number (got {value!r})"
            if self.low is not None and value < self.low:
                return f"{name} must be >= {self.low} (got {value!r})"
            if self.high is not None and value > self.high:
                return f"{name} must be <= {self.high} (got {value!r})"
            return None
        if self.kind == "choice":
            allowed = ", ".join(str(c) for c in self.choices)
            return None if value in self.choices else f"{name} must be one of {allowed} (got {value!r})"
        if self.kind == "str":
            return None if isinstance(value, str) else f"{name} must be text (got {value!r})"
        if self.kind in ("str-list", "int-list"):
            item = str if self.kind == "str-list" else int
            if isinstance(value, (list, tuple)) and all(isinstance(v, item) for v in value):
                if self.choices and any(v not in self.choices for v in value):
                    return f"{name} items must be among {', '.join(map(str, self.choices))} (got {value!r})"
                return None
            what = "names" if item is str else "integers"
            return f"{name} must be a list of {what} (got {value!r})"
        return None


@dataclass
class MethodContext:
    """What a method needs to know about the model it is applied to."""

    task: str
    model_config: Any = None  # transformers.PretrainedConfig
    tokenizer: Any = None
    num_labels: int | None = None
    dtype: str = "fp32"
    sharded: bool = False  # its parameters are sharded across processes (distributed.strategy fsdp or zero3)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the teacher model for distillation


@dataclass(frozen=True)
class Method:
    """A tuning method: how it looks in a form, how it is validated, and where its code lives."""

    name: str
    title: str
    family: str
    description: str
    paper: str
    fields: tuple[Field, ...]
    apply: Callable[[Any, dict[str, Any], MethodContext], Any]  # (model, params, ctx) -> the model to train
    learning_rate: float
    tasks: tuple[str, ...] = ALL_TASKS
    is_peft: bool = True  # the artifact is a PEFT adapter loadable by peft.PeftModel.from_pretrained
    # (params, ctx) -> extra from_pretrained kwargs (QLoRA: the 4-bit quantization config)
    load_kwargs: Callable[[dict[str, Any], MethodContext], dict[str, Any]] | None = None
    compute_loss: Callable[..., Any] | None = None  # (model, inputs, ctx) -> (loss, outputs), training only
    callbacks: Callable[..., list[Any]] | None = None  # (model, params, ctx) -> TrainerCallbacks
    save: Callable[..., None] | None = None  # (model, directory, ctx); None: model.save_pretrained
    load_trained: Callable[..., Any] | None = None  # (base_model, directory) -> the trained model
    virtual_tokens: str | None = None  # field whose value is the number of tokens added to every sequence
    generated: bool = False  # generated from an installed peft config class
    # methods to suggest when a step does not fit in memory, the mildest change first (the suggestions keep the
    # first that fits); the last saves the most
    lighter_methods: tuple[str, ...] = ("lora", "qlora")
    trains_only_biases: bool = False  # trains next to nothing on architectures without biases (Llama-like)
    no_gradient_checkpointing: str = ""  # why training.gradient_checkpointing cannot be on with it ("": it can)
    no_sharding: str = ""  # why distributed.strategy fsdp / zero3 (sharded parameters) cannot train it ("": they can)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"method {self.name!r} has no field {name!r}; fields: {[f.name for f in self.fields]}")

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields}

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Params with defaults filled in, in field order."""
        return {f.name: params.get(f.name, f.default) for f in self.fields}

    def check(self, params: dict[str, Any], task: str | None = None) -> list[tuple[str, str]]:
        """Every problem of these params as (dotted field, message)."""
        out = []
        known = {f.name for f in self.fields}
        for key in params:
            if key not in known:
                allowed = ", ".join(sorted(known)) or "none"
                out.append((f"method.{key}", f"method.{key} is not a parameter of {self.name}; allowed: {allowed}"))
        for f in self.fields:
            message = f.check(params.get(f.name, f.default))
            if message:
                out.append((f"method.{f.name}", message))
        if task is not None and task not in self.tasks:
            out.append(("model.task", f"model.task {task!r} is not supported by {self.name}; it supports {', '.join(self.tasks)}"))
        return out


_METHODS: dict[str, Method] = {}
# The builder loads the generated entries on a background thread while the form is already usable: a lookup
# from another thread waits for them instead of seeing half of them (an RLock: registering looks names up).
_generated_lock = threading.RLock()
_generated_started = False
_generated_loaded = False


def register(method: Method) -> Method:
    """Add a method to the registry; a name already registered (built in or not) is refused.

    The built-in entries are loaded first, so registering before the first read never hides them.
    """
    _ensure_builtin()
    existing = _METHODS.get(method.name)
    if existing is not None:
        raise ValueError(f"method {method.name!r} is already registered ({existing.title}); "
                         f"register it under another name")
    _METHODS[method.name] = method
    return method


def _ensure_builtin() -> None:
    # Importing registers the built-in entries once; later calls find the module loaded (another thread
    # waits for an import in progress; this thread's own nested calls, from `register`, pass through).
    importlib.import_module("nbtune.methods.builtin")


def _ensure_generated() -> None:
    global _generated_started, _generated_loaded
    if _generated_loaded:
        return
    with _generated_lock:
        if _generated_started:  # loaded meanwhile, failed once, or being registered by this very thread
            return
        _generated_started = True
        _ensure_builtin()
        import_heavy()
        importlib.import_module("nbtune.methods.generated").register_peft_methods()
        _generated_loaded = True


def is_registered(name: str) -> bool:
    """Whether a method of this name is registered now (never loads the generated peft entries)."""
    _ensure_builtin()
    return name in _METHODS


def generated_loaded() -> bool:
    """True once the entries generated from the installed peft are registered (loading them imports peft)."""
    return _generated_loaded


def find(name: str) -> Method | None:
    """The method of this name, or None. Generated peft entries are loaded only when a name is not built in."""
    _ensure_builtin()
    if name not in _METHODS:
        _ensure_generated()
    return _METHODS.get(name)


def get(name: str) -> Method:
    method = find(name)
    if method is None:
        raise ValueError(f"method.name must be one of {', '.join(names())} (got {name!r})")
    return method


def all_methods(include_generated: bool = True) -> list[Method]:
    """Every registered method; built-in ones first, in registry order."""
    _ensure_builtin()
    if include_generated:
        _ensure_generated()
    methods = list(_METHODS.values())
    built_in = [m for m in methods if not m.generated]
    return built_in + [m for m in methods if m.generated] if include_generated else built_in


def names(include_generated: bool = True) -> list[str]:
    return [m.name for m in all_methods(include_generated)]
