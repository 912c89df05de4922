"""Saving a trained model as its method's artifact, and loading it back onto a fresh base model.

PEFT methods save a peft adapter directory (loadable by plain `peft.PeftModel.from_pretrained`); full
fine-tuning, freezing, BitFit and distillation save the whole (student) model with `save_pretrained`; methods
with their own format (bottleneck adapters) name `save` / `load_trained` hooks in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbtune.methods.registry import Method, MethodContext


def save_trained(model: Any, method: Method, directory: str | Path, ctx: MethodContext) -> Path:
    """Write the artifact of `model`, trained with `method`, into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save = method.hook("save")
    if save is not None:
        save(model, directory, ctx)
    else:
        model.save_pretrained(str(directory))
    return directory


def load_trained(method: Method, base_model: Any, directory: str | Path, ctx: MethodContext) -> Any:
    """The trained model, in eval mode, from an artifact directory and a freshly loaded base model."""
    load = method.hook("load_trained")
    if load is not None:
        return load(base_model, directory)
    if method.is_peft:
        from peft import PeftModel

        from nbtune.methods.peft_methods import accept_past_key_values

        return accept_past_key_values(PeftModel.from_pretrained(base_model, str(directory))).eval()
    device = next(base_model.parameters()).device
    return type(base_model).from_pretrained(str(directory), dtype=base_model.dtype).to(device).eval()
