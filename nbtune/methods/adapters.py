"""Bottleneck adapters (Houlsby et al. 2019), inserted into any transformer without extra libraries.

Each adapted projection becomes `Adapted(projection, adapter)`: y = p(x) + up(act(down(p(x)))), with `up`
zero-initialised so the model starts out unchanged. Adapters follow the attention output projection and the
feed-forward output projection of every layer, found by name for each architecture family. The layers live in
`adapter_modeling.py`, which needs nothing of nbtune: `save_adapter_model` ships it with a merged export.
"""

from __future__ import annotations

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


def adapter_targets(model: Any, placement: str) -> list[str]:
    """The dotted paths of the output projections that get an adapter, for a placement."""
    from nbtune.methods.adapter_modeling import Adapted

    want_attention = placement in ("both", "attention")
    want_ffn = placement in ("both", "ffn")
    targets = []
    for stack_path, _ in layer_stacks(model):
        for path, module in model.get_submodule(stack_path).named_modules():
            if not hasattr(module, "weight") or isinstance(module, Adapted):
                continue
            if (want_attention and _is_attention_output(path)) or (want_ffn and _is_ffn_output(path)):
                targets.append(f"{stack_path}.{path}")
    if not targets:
        raise ValueError(f"method.placement {placement!r}: found no attention or feed-forward output "
                         f"projection in {type(model).__name__} to put adapters after")
    return targets


def insert_adapters(model: Any, params: dict[str, Any]) -> list[str]:
    """Wrap the chosen output projections of every layer with adapters; returns the wrapped paths."""
    from nbtune.methods.adapter_modeling import wrap_projections

    targets = adapter_targets(model, params["placement"])
    wrap_projections(model, targets, params["bottleneck"], params["non_linearity"], params["init_scale"])
    return targets


def adapted_paths(model: Any) -> list[str]:
    """The dotted paths of the projections that carry an adapter now."""
    from nbtune.methods.adapter_modeling import Adapted

    return [path for path, module in model.named_modules() if isinstance(module, Adapted)]


def apply_adapters(model: Any, params: dict[str, Any], ctx: MethodContext) -> Any:
    """Insert adapters and train only them (plus a classifier's new head)."""
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


MODELING_FILE = "modeling_nbtune_adapters.py"


def save_adapter_model(model: Any, directory: str | Path, auto_class: str) -> None:
    """The trained model with its adapters as one transformers folder that loads without nbtune:
    weights, a config listing the adapters, and a copy of `adapter_modeling.py` that builds them.

    `auto_class` is the transformers auto class to register ("AutoModelForCausalLM", ...); loading needs
    `trust_remote_code=True`, because the adapters are code that transformers does not ship.
    """
    import transformers

    from nbtune.methods import adapter_modeling

    base_class = type(model).__name__
    if getattr(transformers, base_class, None) is not type(model):
        raise ValueError(f"cannot export adapters on {base_class}: transformers has no class of that name to "
                         "build on (models loaded with trust_remote_code are not supported)")
    params = model.nbtune_adapter_params
    directory = Path(directory)
    config = model.config
    config.nbtune_adapters = {"targets": adapted_paths(model), "bottleneck": params["bottleneck"],
                              "non_linearity": params["non_linearity"], "placement": params["placement"]}
    config.auto_map = {auto_class: f"{MODELING_FILE.removesuffix('.py')}.NbtuneAdapterModel"}
    model.save_pretrained(str(directory))
    source = Path(adapter_modeling.__file__).read_text()
    unset = "BASE_CLASS: str | None = None"
    if unset not in source:
        raise RuntimeError(f"{adapter_modeling.__file__} lost its line {unset!r}")
    (directory / MODELING_FILE).write_text(source.replace(unset, f"BASE_CLASS: str | None = {base_class!r}"))
