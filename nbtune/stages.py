"""Training stages: what one kind of training needs beyond the model and its method.

A stage says how a config's rows become training examples, how examples are batched, which transformers
Trainer runs the loss, which metrics an evaluation reports, and how the result is saved. `training.execute`
reads the stage and nothing else about it, so a new stage (SFT with chat templates, preference tuning such as
DPO with TRL's trainers) is one entry here; a new task family (image classification) is one entry in
nbtune/tasks.py plus its encoder in nbtune/data.py, and a stage only where its loss or metrics differ.
See ARCHITECTURE.md. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.tasks import TASKS

if TYPE_CHECKING:
    from nbtune.config import TuneConfig
    from nbtune.data import PreparedData
    from nbtune.methods.registry import Method, MethodContext


@dataclass(frozen=True)
class Stage:
    """One kind of training, as `training.execute` runs it."""

    name: str
    description: str
    prepare_data: Callable[[TuneConfig, Any], PreparedData]  # (config, tokenizer) -> tokenized train/eval examples
    collator: Callable[[Any, str], Callable[[list[dict[str, Any]]], dict[str, Any]]]  # (tokenizer, task) -> batcher
    trainer_class: Callable[[], type]  # -> the Trainer subclass (a function: transformers loads when training starts)
    metrics: Callable[[str], Callable[[Any], dict[str, float]] | None]  # (task) -> Trainer compute_metrics, or None
    save_artifact: Callable[[Any, Method, Path, MethodContext, TuneConfig], Any]  # (model, method, folder, ctx, config)


def _prepare_rows(config: TuneConfig, tokenizer: Any) -> PreparedData:
    from nbtune import data

    return data.prepare(config, tokenizer)


def _pad_to_longest(tokenizer: Any, task: str) -> Any:
    from nbtune import data

    return data.Collator(tokenizer.pad_token_id, task)


def _method_trainer() -> type:
    from nbtune.training import MethodTrainer

    return MethodTrainer


def _task_metric(task: str) -> Callable[[Any], dict[str, float]] | None:
    return _accuracy if TASKS[task].metric == "accuracy" else None


def _accuracy(eval_prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


def _save_with_method(model: Any, method: Method, directory: Path, ctx: MethodContext, config: TuneConfig) -> Any:
    from nbtune.methods.artifacts import save_trained

    return save_trained(model, method, directory, ctx, config=config)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("supervised", "supervised fine-tuning: the task's loss on prompt/target or text/label rows",
          prepare_data=_prepare_rows, collator=_pad_to_longest, trainer_class=_method_trainer,
          metrics=_task_metric, save_artifact=_save_with_method),
)}


def for_config(config: TuneConfig) -> Stage:
    """The stage a config trains with: "supervised", the one stage so far (a `training.stage` field, when a
    second stage exists, is read here and nowhere else)."""
    return STAGES["supervised"]
