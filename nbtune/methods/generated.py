"""Registry entries generated from the installed peft's own config dataclasses.

Every peft method without a hand-written entry gets one: its fields come from the config dataclass (type from
the annotation, default, `metadata["help"]`), and it is applied with `get_peft_model(model, Config(**params))`.
A newer peft adds its new methods here without new code.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import sys
import types
import typing
from typing import Any

from nbtune.methods import registry
from nbtune.methods.registry import Field, Method, MethodContext

# Bookkeeping that peft fills in itself, or that the engine decides (task, inference mode, tokenizer).
SKIPPED_FIELDS = {
    "task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "runtime_config", "num_transformer_submodules", "num_attention_heads", "num_layers", "token_dim",
    "tokenizer_name_or_path", "tokenizer_kwargs", "peft_version",
}
# peft leaves these without a usable default (it raises when they are missing).
DEFAULT_OVERRIDES = {"num_virtual_tokens": 16}


def register_peft_methods() -> None:
    """Register one entry per peft method that has no entry yet (built in, or registered by the user).

    Calling it again registers nothing new.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for peft_type, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if not registry.is_registered(_method_name(peft_type)):
            registry.register(method_from_peft_config(peft_type, config_class))


def _method_name(peft_type: Any) -> str:
    return str(getattr(peft_type, "value", peft_type)).lower().replace("_", "-")


def method_from_peft_config(peft_type: Any, config_class: type) -> Method:
    """A registry entry describing one peft config dataclass."""
    from peft import PromptLearningConfig

    is_prompt = issubclass(config_class, PromptLearningConfig)
    fields = tuple(f for f in (_field(f, config_class) for f in dataclasses.fields(config_class)) if f is not None)
    title = config_class.__name__.removesuffix("Config")
    return Method(
        name=_method_name(peft_type),
        title=title,
        family="prompt" if is_prompt else "peft",
        description=f"peft's {title}, with the fields and defaults of peft.{config_class.__name__}.",
        paper=_paper(peft_type, config_class) or f"See the peft documentation of {config_class.__name__}.",
        fields=fields,
        apply=functools.partial(apply_peft, getattr(peft_type, "value", peft_type)),
        learning_rate=2e-2 if is_prompt else 3e-3,
        virtual_tokens="num_virtual_tokens" if is_prompt and any(f.name == "num_virtual_tokens" for f in fields)
        else None,
        generated=True,
    )


def _paper(peft_type: Any, config_class: type) -> str | None:
    """The arXiv id cited first by peft's model class (the method's own paper), else by its config class."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    for doc in (getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type), "__doc__", None), config_class.__doc__):
        match = re.search(r"(?:arxiv\.org/(?:abs|pdf)/|huggingface\.co/papers/)(\d{4}\.\d{4,5})", doc or "")
        if match:
            return f"arXiv:{match.group(1)}"
    return None


def _field(f: dataclasses.Field, config_class: type) -> Field | None:
    if f.name in SKIPPED_FIELDS or f.name.startswith("_") or not f.init:
        return None
    kind = _kind(_annotation(f, config_class))
    if kind is None:
        return None
    kind_name, choices, optional = kind
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None
    default = _plain(default)
    if default is None and f.name in DEFAULT_OVERRIDES:
        default = DEFAULT_OVERRIDES[f.name]
    help_text = " ".join(str(f.metadata.get("help", "")).split()) or f.name.replace("_", " ")
    field = Field(f.name, kind_name, default, help_text, choices=choices, optional=optional or default is None)
    return field if field.check(default) is None else None  # a default we cannot represent: leave it to peft


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, set)):
        return list(value)
    return value


def _annotation(f: dataclasses.Field, config_class: type) -> Any:
    if not isinstance(f.type, str):
        return f.type
    namespace = {**vars(typing), **vars(sys.modules[config_class.__module__])}
    try:
        return eval(f.type, namespace)  # annotations are strings under `from __future__ import annotations`
    except Exception:
        return None


def _kind(tp: Any) -> tuple[str, tuple[Any, ...], bool] | None:
    """(field kind, choices, optional) for a type annotation, or None for types a form cannot edit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        args = tuple(a for a in args if a is not type(None))
        if len(args) == 1:
            kind = _kind(args[0])
            return None if kind is None else (kind[0], kind[1], True if optional else kind[2])
        kinds = [_kind(a) for a in args]
        if any(k is None for k in kinds):
            return None
        names = {k[0] for k in kinds}
        if names in ({"str-list", "str"}, {"int-list", "int"}):  # peft also takes one name; a list says more
            return ("str-list" if "str" in names else "int-list"), (), optional
        if names == {"int", "float"}:
            return "float", (), optional
        choices = [c for k in kinds for c in k[1]]
        if names <= {"choice", "str"} and choices:  # an Enum or Literal, also accepted as text
            return "choice", tuple(dict.fromkeys(choices)), optional
        if names == {"bool", "choice"}:
            return "choice", (True, False, *choices), optional
        return None
    if tp is bool:
        return "bool", (), False
    if tp is int:
        return "int", (), False
    if tp is float:
        return "float", (), False
    if tp is str:
        return "str", (), False
    if origin is typing.Literal:
        return "choice", tuple(args), False
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "choice", tuple(m.value for m in tp), False
    if origin is list and args in ((str,), (int,)):
        return ("str-list" if args[0] is str else "int-list"), (), False
    return None


def apply_peft(peft_type: str, model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Wrap the model with the peft method `peft_type` configured by these params."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from nbtune.methods.peft_methods import default_targets, get_peft_model, task_arguments

    classes = {getattr(t, "value", t): c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if peft_type not in classes:
        raise ValueError(f"method {_method_name(peft_type)!r} is not a method of the installed peft; "
                         f"it has {', '.join(sorted(map(_method_name, classes)))}")
    config_class = classes[peft_type]
    if "target_modules" in params:  # peft's default for the model type, or one borrowed (a vision model)
        params = {**params, "target_modules": default_targets(peft_type, model, params["target_modules"])}
    task = task_arguments(ctx)
    if "modules_to_save" in task:  # the task's new head, beside any modules the user named
        params = {**params, "modules_to_save": [*task.pop("modules_to_save"), *(params.get("modules_to_save") or [])]}
    return get_peft_model(model, config_class(**task, **params))

