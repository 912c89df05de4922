"""The tasks nbtune tunes for, in one table that validation, model loading, peft, the estimator, forms and docs
read. A new task family (image classification, image-to-text) is one entry here, plus the encoder that turns
its rows into model inputs (nbtune/data.py) and, where the loss or metrics differ, a training stage
(nbtune/stages.py); see ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One task: its config name, what it does in the user's words, and how transformers and peft call it."""

    name: str
    description: str
    auto_class: str  # the transformers AutoModel class that loads a model for it
    peft_task_type: str  # peft's TaskType value
    metric: str | None = None  # an extra eval metric beside the loss ("accuracy"), computed from the logits


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("causal-lm", "generate the target text", "AutoModelForCausalLM", "CAUSAL_LM"),
    Task("seq2seq", "encoder-decoder: generate the target from the input", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    Task("seq-cls", "classify each row", "AutoModelForSequenceClassification", "SEQ_CLS", metric="accuracy"),
)}


def task(name: str) -> Task:
    """The task called `name` (config validation has already refused unknown names)."""
    return TASKS[name]
