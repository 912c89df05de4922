"""Methods that choose which existing weights train: full fine-tuning, layer freezing, BitFit.

Also the generic look-ups other methods share: the transformer layer stacks of a model and its output head.
"""

from __future__ import annotations

from typing import Any

from nbtune.methods.registry import MethodContext
from nbtune.tasks import TASKS

# Attribute names under which architectures keep their list of transformer layers
# (Llama/Mistral `layers`, GPT-2 `h`, BERT `layer`, T5 `block`, some vision/hybrid models `blocks`).
LAYER_LIST_NAMES = ("layers", "h", "layer", "block", "blocks")
HEAD_NAMES = ("lm_head", "score", "classifier", "classification_head", "qa_outputs", "pooler")


def layer_stacks(model: Any) -> list[tuple[str, Any]]:
    """The transformer layer lists of a model as (dotted path, ModuleList): one, or two for encoder-decoder."""
    import torch

    stacks = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if path.rsplit(".", 1)[-1] not in LAYER_LIST_NAMES:
            continue
        if any(path.startswith(p + ".") for p, _ in stacks):  # a list nested inside a layer (T5 `layer`)
            continue
        if len({type(m) for m in module}) == 1:
            stacks.append((path, module))
    if not stacks:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}: no ModuleList named "
                         f"{', '.join(LAYER_LIST_NAMES)}")
    return stacks


def layer_count(model: Any) -> int:
    """Layers per stack (the smallest stack for encoder-decoder models)."""
    return min(len(stack) for _, stack in layer_stacks(model))


def head_parameter_names(model: Any) -> set[str]:
    """Names of the output head's and the final norms' parameters (outside every layer and embedding)."""
    stacks = [p for p, _ in layer_stacks(model)]
    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_params = {id(p) for p in output.parameters()} if output is not None else set()
    for name, p in model.named_parameters():
        if any(name.startswith(s + ".") for s in stacks):
            continue
        parts = name.split(".")
        is_head = id(p) in output_params or any(part in HEAD_NAMES for part in parts)
        is_final_norm = any("norm" in part.lower() or part == "ln_f" for part in parts[:-1]) and not any(
            "embed" in part.lower() for part in parts)
        if is_head or is_final_norm:
            names.add(name)
    return names


def classifier_parameter_names(model: Any, ctx: MethodContext) -> set[str]:
    """A classifier's freshly initialised classification head (empty for other tasks)."""
    if not TASKS[ctx.task].classifies:
        return set()
    return {n for n in head_parameter_names(model) if any(part in HEAD_NAMES for part in n.split("."))}


def apply_full(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_freeze(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Freeze all but the top N layers (top-only) or the bottom N layers and embeddings (bottom-frozen)."""
    n, mode = params["layers"], params["mode"]
    stacks = layer_stacks(model)
    total = min(len(stack) for _, stack in stacks)
    if not 0 <= n <= total:
        raise ValueError(f"method.layers must be between 0 and {total}, the layer count of "
                         f"{type(model).__name__} (got {n})")
    if mode not in ("top-only", "bottom-frozen"):
        raise ValueError(f"method.mode must be one of top-only, bottom-frozen (got {mode!r})")
    trainable_prefixes = []
    for path, stack in stacks:
        chosen = range(len(stack) - n, len(stack)) if mode == "top-only" else range(n, len(stack))
        trainable_prefixes += [f"{path}.{i}." for i in chosen]
    head = head_parameter_names(model)
    stack_paths = [p for p, _ in stacks]
    for name, p in model.named_parameters():
        in_layers = any(name.startswith(s + ".") for s in stack_paths)
        if name in head:  # a head tied to the input embeddings follows train_head too
            train = params["train_head"]
        elif in_layers:
            train = any(name.startswith(prefix) for prefix in trainable_prefixes)
        else:  # embeddings and anything else outside the layers
            train = False
        p.requires_grad_(train)
    return model


def apply_bitfit(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Train the bias terms only (plus a classifier's new head)."""
    biases = [name for name, _ in model.named_parameters() if name == "bias" or name.endswith(".bias")]
    if not biases:
        raise ValueError(f"method bitfit needs bias parameters, but {type(model).__name__} has none "
                         "(Llama-style models are usually built without biases); use lora or ia3 instead")
    keep = set(biases) | classifier_parameter_names(model, ctx)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return model
