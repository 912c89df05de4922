"""Training stages: what one kind of training needs beyond the model and its method.

A stage says which data formats and tasks it trains, which methods compose with it (and why not, where not),
how a config's rows become training examples, which Trainer runs the loss (transformers' or one of TRL's), the
names of the metrics it logs, and what the memory estimator must count beyond a supervised step (a reference
model, two sequences per example, generation). `training.execute` reads the stage and nothing else about it;
the config's validation, the builder's forms, the estimator and the docs read this same registry.
See ARCHITECTURE.md. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune import formats
from nbtune.tasks import HELD_OUT_ACCURACY, TASKS

if TYPE_CHECKING:
    from nbtune.config import TuneConfig
    from nbtune.data import PreparedData
    from nbtune.methods.registry import Method, MethodContext

CAUSAL_ONLY = ("causal-lm",)


@dataclass(frozen=True)
class Stage:
    """One kind of training, as `training.execute` runs it and the estimator counts it."""

    name: str
    title: str
    description: str
    trainer: str  # the library class that trains it, in words (docs, tooltips)
    formats: tuple[str, ...]  # the data formats it trains (nbtune/formats.py)
    tasks: tuple[str, ...]
    prepare_data: Callable[[TuneConfig, Any], PreparedData]  # (config, tokenizer) -> train/eval examples
    arguments: Callable[[TuneConfig, dict[str, Any]], Any]  # (config, common TrainingArguments kwargs) -> args
    build_trainer: Callable[..., Any]  # (prepared run, args, callbacks) -> the Trainer
    save_artifact: Callable[[Any, Method, Path, MethodContext, TuneConfig], Any]  # (model, method, folder, ctx, cfg)
    reads: tuple[str, ...] = ()  # training.* fields only this stage reads (forms show them only for it)
    logged: Mapping[str, str] = field(default_factory=dict)  # the trainer's log name -> the event's metric name
    sequences_per_example: int = 1  # DPO runs the chosen and the rejected answer of each pair
    reference_model: bool = False  # scores against a frozen reference (the base: adapter disabled, or a copy)
    generates: bool = False  # samples completions while training (KV cache, num_generations)
    fused_log_probs: bool = False  # scores tokens through TRL's fused LM head: never the (tokens, vocab) logits
    accuracy_means: str = HELD_OUT_ACCURACY  # what its eval "accuracy" measures, in words (else the task's)
    language_model_loss: bool = True  # its loss is a token cross-entropy (so exp(loss) is a perplexity)
    throughput: str = "tokens"  # what its speed is counted in per second: tokens, or images (the task's)

    def unsupported(self, method: Method, task: str) -> str | None:
        """Why `method` cannot train with this stage on `task`, in words; None when it can."""
        if task not in self.tasks:
            return f"{self.name} trains {', '.join(self.tasks)} models, not {task}"
        if self.name != "sft" and method.compute_loss is not None:
            return f"{method.name} brings its own loss, which replaces the stage's; it trains only with sft"
        return None

    def uses_reference(self, config: TuneConfig) -> bool:
        """Whether a run of `config` holds a reference model (GRPO only with a KL penalty, beta > 0)."""
        return self.reference_model and (not self.generates or config.training.beta > 0)


# ----- sft: the supervised stage (transformers' Trainer) -------------------------------------------------
def _prepare_rows(config: TuneConfig, tokenizer: Any) -> PreparedData:
    from nbtune import data

    return data.prepare(config, tokenizer)


def _training_arguments(config: TuneConfig, common: dict[str, Any]) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def _supervised_trainer(prepared: Any, args: Any, callbacks: list[Any]) -> Any:
    from nbtune import data
    from nbtune.training import MethodTrainer

    built, task, packing = prepared.built, prepared.built.ctx.task, prepared.data.packing
    trainer_class = _packed_trainer_class() if packing else MethodTrainer
    if TASKS[task].captions:
        from nbtune import captions

        trainer_class = captions.trainer_class()
        trainer_class.caption_tokenizer = prepared.tokenizer.tokenizer
    if TASKS[task].draws:
        from nbtune import diffusion

        trainer_class = diffusion.trainer_class()
        trainer_class.judge = prepared.data.stats.get("judge")
    return trainer_class(
        model=built.model, args=args, train_dataset=prepared.data.train, eval_dataset=prepared.data.eval or None,
        data_collator=packing or data.collator(task, prepared.tokenizer),
        compute_metrics=task_metric(task), callbacks=callbacks, method_loss=built.method.compute_loss,
        method_context=built.ctx, chunked_loss=prepared.loss is not None and prepared.loss.value == "chunked",
    )


def _packed_trainer_class() -> type:
    """The supervised Trainer counting a packed batch's real tokens: with no attention mask, transformers would
    count the row fillers too (and warn at every step)."""
    from nbtune.training import MethodTrainer

    class PackedTrainer(MethodTrainer):
        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            if self.args.include_num_input_tokens_seen != "no":
                self.state.num_input_tokens_seen += self.data_collator.real_tokens(inputs)

    return PackedTrainer


def task_metric(task: str) -> Callable[[Any], dict[str, float]] | None:
    """The Trainer's compute_metrics for a task: accuracy for classification, None (loss only) otherwise."""
    return _accuracy if TASKS[task].classifies else None


def _accuracy(eval_prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


def _save_with_method(model: Any, method: Method, directory: Path, ctx: MethodContext, config: TuneConfig) -> Any:
    from nbtune.methods.artifacts import save_trained

    return save_trained(model, method, directory, ctx, config=config)


# ----- dpo: preference pairs (TRL's DPOTrainer) ------------------------------------------------------------
def _dpo(name: str) -> Callable[..., Any]:
    """A hook of nbtune/stage_dpo.py, imported when a DPO run starts (it imports TRL)."""
    def hook(*args: Any) -> Any:
        from nbtune import stage_dpo

        return getattr(stage_dpo, name)(*args)
    return hook


# ----- grpo: sampled completions scored by reward functions (TRL's GRPOTrainer) ----------------------------
def _grpo(name: str) -> Callable[..., Any]:
    """A hook of nbtune/stage_grpo.py, imported when a GRPO run starts (it imports TRL)."""
    def hook(*args: Any) -> Any:
        from nbtune import stage_grpo

        return getattr(stage_grpo, name)(*args)
    return hook


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("sft", "Supervised fine-tuning (SFT)",
          "the task's loss on the answer: chat (assistant turns), instruction, prompt/completion and text rows; "
          "classification, seq2seq and image rows", "transformers Trainer",
          formats=(*formats.SUPERVISED, formats.IMAGE), tasks=tuple(TASKS), prepare_data=_prepare_rows,
          arguments=_training_arguments, build_trainer=_supervised_trainer, save_artifact=_save_with_method,
          reads=("packing", "loss_implementation")),
    Stage("dpo", "Direct preference optimisation (DPO)",
          "prefer each pair's chosen answer over its rejected one, relative to a frozen reference: the base "
          "with the adapter disabled for PEFT methods, a copy of the model otherwise", "TRL DPOTrainer",
          formats=("preference",), tasks=CAUSAL_ONLY, prepare_data=_dpo("prepare"), arguments=_dpo("arguments"),
          build_trainer=_dpo("build_trainer"), save_artifact=_save_with_method, reads=("beta",),
          logged={"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
                  "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"},
          sequences_per_example=2, reference_model=True, fused_log_probs=True, language_model_loss=False,
          accuracy_means="held-out preference accuracy: the chosen answer scored above the rejected one"),
    Stage("kto", "Kahneman-Tversky optimisation (KTO)",
          "learn from each answer alone, marked desirable (a pair's chosen answer) or not (its rejected one), "
          "relative to a frozen reference as DPO is; for data that rates single answers", "TRL KTOTrainer",
          formats=("preference",), tasks=CAUSAL_ONLY, prepare_data=_dpo("prepare_unpaired"),
          arguments=_dpo("kto_arguments"), build_trainer=_dpo("build_kto_trainer"), save_artifact=_save_with_method,
          reads=("beta",), logged={"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
                                   "rewards/margins": "reward_margin", "kl": "kl"},
          sequences_per_example=2, reference_model=True, fused_log_probs=True, language_model_loss=False,
          accuracy_means="held-out preference accuracy: the chosen answer scored above the rejected one"),
    Stage("grpo", "Group relative policy optimisation (GRPO)",
          "sample num_generations completions per prompt, score them with the reward functions "
          "(training.rewards) and prefer those above their group's mean; a KL penalty (beta > 0) keeps the model "
          "near a frozen reference", "TRL GRPOTrainer",
          formats=("prompt-reference", "chat"), tasks=CAUSAL_ONLY, prepare_data=_grpo("prepare"),
          arguments=_grpo("arguments"), build_trainer=_grpo("build_trainer"), save_artifact=_save_with_method,
          reads=("beta", "num_generations", "max_completion_length", "temperature", "rewards"),
          logged={"reward": "reward", "reward_std": "reward_std", "completions/mean_length": "completion_length",
                  "kl": "kl"},
          reference_model=True, generates=True, fused_log_probs=True, language_model_loss=False,
          accuracy_means="held-out exact match of greedy answers"),
)}
NAMES = tuple(STAGES)
ONLY_SOME_READ = ("beta", "num_generations", "max_completion_length", "temperature", "rewards", "packing",
                  "loss_implementation")  # the training.* fields read per stage


def for_config(config: TuneConfig) -> Stage:
    """The stage a config trains with (`training.stage`), as it trains the config's task."""
    return of_task(config.training.stage, config.model.task)


def of_task(name: str, task: str) -> Stage:
    """Stage `name` as it trains `task`: where the stage's eval accuracy is plain held-out accuracy, it
    measures what the task's does (image-to-text: the exact match of greedy captions); its loss is a language
    model's only where the task's is a token loss; its speed is counted in the task's units (images or tokens)."""
    stage = STAGES[name]
    if task not in TASKS:
        return stage
    t = TASKS[task]
    plain = stage.accuracy_means == HELD_OUT_ACCURACY
    return dataclasses.replace(stage, accuracy_means=t.accuracy_means if plain else stage.accuracy_means,
                               language_model_loss=stage.language_model_loss and t.token_loss,
                               throughput="images" if t.inputs == "image" else "tokens")


def trainers_of(fmt: str) -> list[str]:
    """The names of the stages that train rows of format `fmt`."""
    return [s.name for s in STAGES.values() if fmt in s.formats]


def check_format(stage: Stage, fmt: str) -> None:
    """Refuse rows of a format the stage cannot train, naming data.format and the stages that can."""
    if fmt in stage.formats:
        return
    from nbtune.config import ConfigError

    able = trainers_of(fmt)
    fix = f"set training.stage to {' or '.join(able)}" if able else "no stage trains it yet"
    raise ConfigError([("data.format", (
        f"data.format {fmt} ({formats.DESCRIPTIONS[fmt]}) cannot train with training.stage {stage.name}, which "
        f"trains {', '.join(stage.formats)}; {fix}, or give rows of one of those formats"))])


def supported_combinations(methods: Mapping[str, Method], task: str = "causal-lm") -> dict[tuple[str, str], str | None]:
    """{(stage, method): None if supported, else why not}: the stage × method table the docs show."""
    return {(s.name, m.name): s.unsupported(m, task) for s in STAGES.values() for m in methods.values()}
