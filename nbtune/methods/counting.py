"""Exact parameter counts: of a model in memory, and of a config's model with its method applied.

Counts are of unique parameters (tied weights once). A bitsandbytes 4-bit weight (`Params4bit`) stores two
values per byte; it is counted by its logical size, the number of weights it represents, not its bytes.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from nbtune.config import TuneConfig

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
    from nbtune.models import build, load_model_config

    model_config = copy.deepcopy(model_config if model_config is not None else load_model_config(config))
    base_total: list[int] = []
    options = {"model_config": model_config, "with_load_kwargs": False, "dtype": "fp32",  # counts are dtype-free
               "extras": {"total_steps": config.training.max_steps},
               "prepare": lambda base, _: base_total.append(count_parameters(base)[1])}
    try:
        return count_parameters(build(config, device="meta", **options).model)
    except (NotImplementedError, RuntimeError) as error:
        meta_error = error
    if base_total[0] > REAL_SKELETON_LIMIT:
        raise ValueError(f"method {config.method.name} cannot be counted without real weights on a model of "
                         f"{base_total[0]:,} parameters (on the meta device: {meta_error})")
    return count_parameters(build(config, device="cpu", **options).model)
