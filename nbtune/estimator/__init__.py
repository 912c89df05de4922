"""Memory estimator: how much GPU memory a fine-tuning config takes, before launching.

`estimate_memory(config)` is the instant analytical tier; `simulate_memory(config)` runs one real training step
of the model code on fake tensors; `fit_to_gpu(config, gpu)` is the cheapest change that makes a config fit.
`import nbtune.estimator` does not import torch.
"""

from __future__ import annotations

from nbtune._lazy import lazy_getattr
from nbtune.estimator.gpus import GPUS, gpu_bytes

_LAZY = {"estimate_memory": "nbtune.estimator.estimate", "MemoryEstimate": "nbtune.estimator.estimate",
         "Suggestion": "nbtune.estimator.estimate", "fit_to_gpu": "nbtune.estimator.estimate",
         "simulate_memory": "nbtune.estimator.simulate"}

__all__ = ["GPUS", "MemoryEstimate", "Suggestion", "estimate_memory", "fit_to_gpu", "gpu_bytes",
           "simulate_memory"]


__getattr__ = lazy_getattr(__name__, _LAZY)
