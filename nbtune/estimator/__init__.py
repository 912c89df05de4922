"""Memory estimator: how much GPU memory a fine-tuning config takes, before launching.

`estimate_memory(config)` is the instant analytical tier; `simulate_memory(config)` runs one real training step
of the model code on fake tensors. `import nbtune.estimator` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from nbtune.estimator.gpus import GPUS, gpu_bytes

_LAZY = {"estimate_memory": "nbtune.estimator.estimate", "MemoryEstimate": "nbtune.estimator.estimate",
         "simulate_memory": "nbtune.estimator.simulate"}

__all__ = ["GPUS", "MemoryEstimate", "estimate_memory", "gpu_bytes", "simulate_memory"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbtune.estimator' has no attribute {name!r}")
