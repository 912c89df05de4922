"""The number formats a config names (model.dtype, training.precision, a QLoRA compute dtype): one table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    name: str  # as a config writes it
    torch_name: str  # the torch.dtype attribute
    bytes: int  # per element


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("fp32", "float32", 4), DType("fp16", "float16", 2), DType("bf16", "bfloat16", 2))}
BYTES: dict[str, int] = {d.name: d.bytes for d in DTYPES.values()}


def torch_dtype(name: str) -> Any:
    """The torch.dtype of a config dtype name ("bf16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPES[name].torch_name)


def from_torch(value: Any) -> str | None:
    """The config name of a torch dtype or its string ("torch.bfloat16", "float16"), None if not one of ours."""
    text = str(value).removeprefix("torch.")
    return next((d.name for d in DTYPES.values() if d.torch_name == text), None)
