"""Bottleneck adapters (Houlsby et al. 2019), inserted into any transformer without extra libraries.

Each adapted projection becomes `Adapted(projection, adapter)`: y = p(x) + up(act(down(p(x)))), with `up` zero-initialised
so the model starts out unchanged. Adapters follow the attention output projection and the feed-forward output
projection of every layer, found by name for each architecture family.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from nbtune.methods.registry import MethodContext
from nbtune.methods.selective import classifier_parameter_names, layer_stacks

WEIGHTS_FILE = "adapters.safetensors"
PARAMS_FILE = "adapters.json"
# Output projections by leaf name (Llama/Mistral/Qwen, T5, BART/OPT); GPT-2's c_proj and BERT's dense go by parent.
ATTENTION_OUTPUTS = ("o_proj", "o", "out_proj")
FFN_OUTPUTS = ("down_proj", "wo", "fc2", "w2")


def _is_attention_output(path: str) -> bool:
    parts = path.split(".")
    leaf, parent = parts[-1], ".".join(parts[:-1])
    if leaf == "c_proj":  # GPT-2: attn.c_proj vs mlp.c_proj
        return "attn" in parent
    if leaf == "dense":  # BERT: attention.output.dense vs output.dense
        return parent.endswith("attention.output")
    return leaf in ATTENTION_OUTPUTS


def _is_ffn_output(path: str) -> bool:
    parts = path.split(".")
    leaf, parent = parts[-1], ".".join(parts[:-1])
    if leaf == "c_proj":
        return "mlp" in parent
    if leaf == "dense":
        return parent.endswith("output") and "attention" not in parent
    return leaf in FFN_OUTPUTS


def _out_features(module: Any) -> int:
    for attribute in ("out_features", "nf"):  # nn.Linear, GPT-2's Conv1D
        if hasattr(module, attribute):
            return int(getattr(module, attribute))
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


@functools.cache
def _classes() -> tuple[type, type]:
    import torch
    from torch import nn

    activations = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

    class BottleneckAdapter(nn.Module):
        """h + up(act(down(h))), with `up` starting at zero."""

        def __init__(self, width: int, bottleneck: int, non_linearity: str, init_scale: float):
            super().__init__()
            self.down = nn.Linear(width, bottleneck)
            self.act = activations[non_linearity]()
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

    return BottleneckAdapter, Adapted


def insert_adapters(model: Any, params: dict[str, Any]) -> list[str]:
    """Wrap the chosen output projections of every layer with adapters; returns the wrapped paths."""
    bottleneck_adapter, adapted = _classes()
    want_attention = params["placement"] in ("both", "attention")
    want_ffn = params["placement"] in ("both", "ffn")
    targets = []
    for stack_path, _ in layer_stacks(model):
        for path, module in model.get_submodule(stack_path).named_modules():
            if not hasattr(module, "weight") or isinstance(module, adapted):
                continue
            if (want_attention and _is_attention_output(path)) or (want_ffn and _is_ffn_output(path)):
                targets.append(f"{stack_path}.{path}")
    if not targets:
        raise ValueError(f"method.placement {params['placement']!r}: found no attention or feed-forward output "
                         f"projection in {type(model).__name__} to put adapters after")
    for path in targets:
        parent_path, _, leaf = path.rpartition(".")
        projection = model.get_submodule(path)
        adapter = bottleneck_adapter(_out_features(projection), params["bottleneck"], params["non_linearity"],
                                     params["init_scale"])
        weight = projection.weight
        adapter.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        setattr(model.get_submodule(parent_path), leaf, adapted(projection, adapter))
    return targets


def apply_adapters(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Insert adapters and train only them (plus a seq-cls model's classification head)."""
    classifier = classifier_parameter_names(model, ctx)
    insert_adapters(model, params)
    for name, p in model.named_parameters():
        p.requires_grad_(".adapter." in name or name in classifier)
    model.nbtune_adapter_params = dict(params)
    return model


def save_adapters(model: Any, directory: str | Path, ctx: MethodContext) -> None:
    """The trained weights (adapters, and the classification head) as safetensors, plus their params as JSON."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / PARAMS_FILE).write_text(json.dumps({"method": "adapter", "params": model.nbtune_adapter_params},
                                                    indent=2))


def load_adapters(base_model: Any, directory: str | Path) -> Any:
    """Re-insert adapters into a fresh base model and load their trained weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    params = json.loads((directory / PARAMS_FILE).read_text())["params"]
    insert_adapters(base_model, params)
    base_model.nbtune_adapter_params = params
    weights = load_file(str(directory / WEIGHTS_FILE))
    names = {n for n, _ in base_model.named_parameters()}
    unknown = sorted(set(weights) - names)
    if unknown:
        raise ValueError(f"{directory / WEIGHTS_FILE} holds weights this model lacks: {unknown[:5]}")
    base_model.load_state_dict(weights, strict=False)
    for p in base_model.parameters():
        p.requires_grad_(False)
    return base_model.eval()
