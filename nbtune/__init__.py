"""nbtune: plan, run and compare fine-tuning of language models from a notebook.

`import nbtune` is light: torch, transformers, peft and plotly are imported only when a feature needs them,
so `%load_ext nbtune` is instant.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

from nbtune._lazy import lazy_getattr
from nbtune.config import ConfigError, TuneConfig

__version__ = "0.1.0"

# bitsandbytes warns at import on CPUs with AVX512-BF16 that it cannot fetch an optional kernel from the hub;
# its own CPU kernels are used instead, so the warning only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still reads the attribute transformers 5 renamed; the warning is about peft, not the user's config.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

# Public names that live in heavier modules, imported on first use.
_LAZY = {
    "train": "nbtune.runner",
    "load_trained_model": "nbtune.training",
    "launch": "nbtune.runner",
    "resume": "nbtune.runner",
    "Run": "nbtune.runner",
    "RunStore": "nbtune.store",
    "estimate_memory": "nbtune.estimator",
    "MemoryEstimate": "nbtune.estimator",
    "compare": "nbtune.comparison",
    "Comparison": "nbtune.comparison",
    "show_figure": "nbtune.static_image",
    "reward": "nbtune.rewards",
    "try_it": "nbtune.widgets.try_it",
}

__all__ = ["ConfigError", "TuneConfig", "__version__", "load_ipython_extension", *_LAZY]


_lazy = lazy_getattr(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    if name == "widgets":  # the UI subpackage, imported only when asked for
        return importlib.import_module("nbtune.widgets")
    return _lazy(name)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext nbtune`: register the %nbtune magics (the UI layer lives in nbtune.widgets)."""
    importlib.import_module("nbtune.widgets.magics").load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    importlib.import_module("nbtune.widgets.magics").unload_ipython_extension(ipython)
