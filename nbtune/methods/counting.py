"""Exact parameter counts: of a model in memory, and of a config's model with its method applied.

Counts are of unique parameters (tied weights once). A bitsandbytes 4-bit weight (`Params4bit`) stores two
values per byte; it is counted by its logical size, the number of weights it represents, not its bytes.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from nbtune.config import TuneConfig
from nbtune.methods.registry import MethodContext

REAL_SKELETON_LIMIT = 50_000_000  # parameters; above this a method that cannot run on meta is not counted


def _logical_numel(p: Any) -> int:
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    if type(p).__name__ == "Params4bit":  # packed but not yet quantized: two values per stored byte
        return p.numel() * 2
    return p.numel()


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of a model, each unique parameter once, 4-bit weights by logical count."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_parameters(config: TuneConfig, model_config: Any = None) -> tuple[int, int]:
    """(trainable, total) for the config's model and method, counted exactly on a meta-device skeleton.

    No weights are read or allocated. QLoRA is counted as LoRA on the unquantized skeleton (quantizing needs
    real weights; the logical counts are the same). Distillation counts the student it trains. A few peft
    methods compute their initial values from the weights (BOFT, FRoD, UniLoRA); they cannot be built on the
    meta device, so small models (up to `REAL_SKELETON_LIMIT` parameters) are counted on randomly initialised
    CPU weights instead, and larger ones raise ValueError.
    """
    import torch

    from nbtune.methods import registry
    from nbtune.models import auto_class, load_model_config

    model_config = copy.deepcopy(model_config if model_config is not None else load_model_config(config))
    task = config.model.task
    method = registry.get(config.method.name)
    ctx = MethodContext(task=task, model_config=model_config, num_labels=getattr(model_config, "num_labels", None),
                        dtype=config.model.dtype, extras={"total_steps": config.training.max_steps})
    apply = method.hook("apply")
    with torch.device("meta"):
        model = auto_class(task).from_config(model_config)
        base_total = count_parameters(model)[1]
        try:
            return count_parameters(apply(model, config.method_params, ctx))
        except (NotImplementedError, RuntimeError) as error:
            meta_error = error
    if base_total > REAL_SKELETON_LIMIT:
        raise ValueError(f"method {method.name} cannot be counted without real weights on a model of {base_total:,} "
                         f"parameters (on the meta device: {meta_error})")
    model = auto_class(task).from_config(model_config)
    return count_parameters(apply(model, config.method_params, ctx))
