"""The optimizers a config can name, with what the Trainer calls them and what state they keep: one table that
validation, training, the estimator and the memory measurements read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Optimizer:
    name: str  # as a config writes it
    trainer_name: str  # TrainingArguments.optim
    description: str
    state: str  # what it keeps per trainable parameter: "adam" (two moments), "momentum" or "factored"
    eight_bit: bool = False  # bitsandbytes 8-bit states (blockwise, 256 elements a block)
    paged: bool = False  # states in CUDA unified memory, evictable to CPU
    bitsandbytes_class: str | None = None  # bitsandbytes.optim class, for the optimizers it implements


OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", "adamw_torch", "AdamW (PyTorch)", "adam"),
    Optimizer("adamw-8bit", "adamw_bnb_8bit", "8-bit AdamW (bitsandbytes)", "adam", eight_bit=True,
              bitsandbytes_class="AdamW8bit"),
    Optimizer("paged-adamw", "paged_adamw_32bit", "paged AdamW (bitsandbytes)", "adam", paged=True,
              bitsandbytes_class="PagedAdamW32bit"),
    Optimizer("paged-adamw-8bit", "paged_adamw_8bit", "paged 8-bit AdamW (bitsandbytes)", "adam", eight_bit=True,
              paged=True, bitsandbytes_class="PagedAdamW8bit"),
    Optimizer("sgd", "sgd", "SGD with momentum 0.9", "momentum"),
    Optimizer("adafactor", "adafactor", "Adafactor (factored second moment)", "factored"),
)}
