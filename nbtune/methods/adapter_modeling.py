"""Bottleneck adapter layers that need only torch and transformers, never nbtune.

nbtune trains with these classes, and `Run.merge` copies this file into an adapter export as
`modeling_nbtune_adapters.py` with BASE_CLASS set to the trained model's transformers class: then
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (or ...ForSequenceClassification) builds
the base architecture, wraps the projections that `config.nbtune_adapters["targets"]` lists, and loads the
weights. A Houlsby adapter cannot be folded into the projection it follows (its non-linearity sits between the
down and up projections), so this small model class is how the adapter travels.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

BASE_CLASS: str | None = None  # set in an export, e.g. "LlamaForCausalLM"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), with `up` starting at zero so the model starts out unchanged."""

    def __init__(self, width: int, bottleneck: int, non_linearity: str, init_scale: float = 1e-3):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, width)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_scale)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: Any) -> Any:
        return h + self.up(self.act(self.down(h)))


class Adapted(nn.Module):
    """A projection followed by its adapter."""

    def __init__(self, projection: nn.Module, adapter: nn.Module):
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapter(self.projection(*args, **kwargs))

    # Some models read their projection's weight directly (T5 checks `wo.weight.dtype`).
    @property
    def weight(self) -> Any:
        return self.projection.weight

    @property
    def bias(self) -> Any:
        return getattr(self.projection, "bias", None)


def output_width(module: nn.Module) -> int:
    for attribute in ("out_features", "nf"):  # nn.Linear, GPT-2's Conv1D
        if hasattr(module, attribute):
            return int(getattr(module, attribute))
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


def wrap_projections(model: nn.Module, targets: list[str], bottleneck: int, non_linearity: str,
                     init_scale: float = 1e-3) -> None:
    """Put a fresh adapter after each projection named in `targets` (dotted module paths)."""
    for path in targets:
        parent_path, _, leaf = path.rpartition(".")
        projection = model.get_submodule(path)
        adapter = BottleneckAdapter(output_width(projection), bottleneck, non_linearity, init_scale)
        weight = projection.weight
        adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        setattr(model.get_submodule(parent_path), leaf, Adapted(projection, adapter))


def adapted_model_class(base: type) -> type:
    """`base` (a transformers model class) whose instances carry the adapters their config lists."""

    class NbtuneAdapterModel(base):
        def __init__(self, config: Any, *args: Any, **kwargs: Any):
            super().__init__(config, *args, **kwargs)
            settings = config.nbtune_adapters
            wrap_projections(self, settings["targets"], settings["bottleneck"], settings["non_linearity"])

    return NbtuneAdapterModel


NbtuneAdapterModel = adapted_model_class(getattr(transformers, BASE_CLASS)) if BASE_CLASS else None
