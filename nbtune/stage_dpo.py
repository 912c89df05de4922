"""The preference stages: pairs trained with TRL's DPOTrainer (dpo) or KTOTrainer (kto), the hooks
`nbtune/stages.py` names. KTO learns from each answer alone, marked desirable or not: a pair becomes two rows.

The reference model is TRL's choice, which is the one the issue asks for: a PEFT model is its own reference
with the adapter disabled (no second copy in memory); any other method gets a frozen copy of the base, loaded
from the same checkpoint (the estimator counts it). TRL renders conversational pairs with the tokenizer's chat
template; a template named in `data.chat_template` replaces it. Each evaluation adds the held-out preference
accuracy, the share of eval pairs whose chosen answer the model scores above the rejected one
(`nbtune.preference.score_pairs`), as `accuracy`. Importing this module imports TRL.
"""

from __future__ import annotations

from typing import Any

from nbtune import formats, stages
from nbtune.config import TuneConfig
from nbtune.training import GuardedCheckpoints

PAIR = ("prompt", "chosen", "rejected")

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402  (after nbtune.training: transformers)


def prepare(config: TuneConfig, tokenizer: Any) -> Any:
    """The pairs as TRL reads them (prompt, chosen, rejected; chat or plain), checked, and what the run records."""
    from nbtune import data

    train_rows, eval_rows = data.load_rows(config)
    fmt, columns = data.resolve_format(config, train_rows[0])
    stages.check_format(stages.for_config(config), fmt)
    for row in train_rows + eval_rows:
        formats.check_row(fmt, row)
    conversational = use_chat_template(config, tokenizer, train_rows[0])
    train, evaluation = ([{k: r[k] for k in PAIR} for r in rows] for rows in (train_rows, eval_rows))
    return data.PreparedData(
        train=train, eval=evaluation, columns=columns, labels=(), fingerprint=data.fingerprint(train_rows, eval_rows),
        stats={"format": fmt, "train_rows": len(train), "eval_rows": len(evaluation),
               "conversational": conversational})  # its answers use the chat template


def prepare_unpaired(config: TuneConfig, tokenizer: Any) -> Any:
    """KTO's rows: each pair's chosen answer marked desirable and its rejected one not (TRL's unpairing, done
    here so the run counts its steps over the rows it trains), shuffled by the seed: TRL reads them in order,
    and unpairing puts every desirable row first."""
    import random

    import datasets
    from trl.data_utils import unpair_preference_dataset

    datasets.disable_progress_bars()
    prepared = prepare(config, tokenizer)
    prepared.train = unpair_preference_dataset(datasets.Dataset.from_list(prepared.train)).to_list()
    random.Random(config.training.seed).shuffle(prepared.train)
    prepared.stats["train_rows"] = len(prepared.train)
    return prepared


def use_chat_template(config: TuneConfig, tokenizer: Any, row: dict[str, Any]) -> bool:
    """Whether the rows are conversations; if so the tokenizer renders them as SFT would: its own template, or
    the one `data.chat_template` names (as the artifact saves it)."""
    from nbtune.methods.artifacts import chat_template_of_run

    if not formats.is_conversation(row["prompt"]):
        return False
    tokenizer.chat_template = chat_template_of_run(config, tokenizer, "chat")[1]
    return True


def arguments(config: TuneConfig, common: dict[str, Any]) -> Any:
    """DPOConfig: the shared arguments, beta, and the config's token limit for prompt + answer."""
    return DPOConfig(**common, beta=config.training.beta, max_length=config.data.max_length)


def kto_arguments(config: TuneConfig, common: dict[str, Any]) -> Any:
    """KTOConfig: the shared arguments, beta, and the config's token limit for prompt + answer."""
    return KTOConfig(**common, beta=config.training.beta, max_length=config.data.max_length)


def build_trainer(prepared: Any, args: Any, callbacks: list[Any]) -> Any:
    """TRL's DPOTrainer over the pairs, with the run's model as it was built (method applied)."""
    return _trainer(PreferenceTrainer, prepared, args, callbacks)


def build_kto_trainer(prepared: Any, args: Any, callbacks: list[Any]) -> Any:
    """TRL's KTOTrainer over the unpaired rows; its evaluations score the held-out pairs as DPO's do."""
    return _trainer(UnpairedPreferenceTrainer, prepared, args, callbacks)


def _trainer(cls: type, prepared: Any, args: Any, callbacks: list[Any]) -> Any:
    import datasets

    datasets.disable_progress_bars()  # TRL tokenizes with datasets.map; its bars would reach the cell
    data = prepared.data
    trainer = cls(
        model=prepared.built.model, args=args, train_dataset=datasets.Dataset.from_list(data.train),
        eval_dataset=datasets.Dataset.from_list(data.eval) if data.eval else None,
        processing_class=prepared.tokenizer, callbacks=callbacks)
    trainer.held_out_pairs = data.eval
    return trainer


class HeldOutPairs:
    """Mixed into a preference Trainer: its evaluations also report the held-out preference accuracy (chosen
    scored above rejected by the model itself, summed log-probabilities)."""

    held_out_pairs: list[dict[str, Any]] = []

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        from nbtune.preference import score_pairs

        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.held_out_pairs:
            scores = score_pairs(self.model, self.processing_class, self.held_out_pairs,
                                 max_length=self.args.max_length)
            output.metrics[f"{prefix}_accuracy"] = scores.accuracy
            output.metrics[f"{prefix}_preference_margin"] = scores.mean_margin
        return output


class PreferenceTrainer(GuardedCheckpoints, HeldOutPairs, DPOTrainer):
    """DPOTrainer with guarded checkpoints and the held-out preference accuracy."""


class UnpairedPreferenceTrainer(GuardedCheckpoints, HeldOutPairs, KTOTrainer):
    """KTOTrainer with guarded checkpoints and the held-out preference accuracy."""
