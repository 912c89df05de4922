"""The GRPO stage: prompts with a reference answer, trained with TRL's GRPOTrainer (the hooks `nbtune/stages.py`
names).

Each step samples `training.num_generations` completions per prompt, scores them with the sum of the rewards
`training.rewards` names (nbtune/rewards.py) and moves the model towards the completions above their group's
mean. `training.micro_batch_size` counts completions, as TRL does: 8 with 4 generations is 2 prompts a step.
Rows are prompt-reference (a prompt, plain or a conversation, and a reference/answer/solution column) or chat:
the prompt is the conversation up to its last assistant turn, the reference the `answer` column if present,
else that turn. With beta > 0 the KL penalty is taken against the base with the adapter disabled (PEFT methods)
or a frozen copy. Each evaluation adds `accuracy`, the held-out exact match of greedy answers, and `reward`,
their mean summed reward. Importing this module imports TRL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nbtune import formats, rewards, stages
from nbtune.config import ConfigError, TuneConfig
from nbtune.stage_dpo import use_chat_template
from nbtune.training import GuardedCheckpoints

EVAL_BATCH = 16  # held-out prompts answered per generate call

from trl import GRPOConfig, GRPOTrainer  # noqa: E402  (after nbtune.training: transformers is loaded there)


def prepare(config: TuneConfig, tokenizer: Any) -> Any:
    """The rows as prompts with a reference answer (and their other columns, for user rewards), checked."""
    from nbtune import data

    train_rows, eval_rows = data.load_rows(config)
    fmt, columns = data.resolve_format(config, train_rows[0])
    stages.check_format(stages.STAGES["grpo"], fmt)
    for row in train_rows + eval_rows:
        formats.check_row(fmt, row)
    train, evaluation = ([example(fmt, r) for r in rows] for rows in (train_rows, eval_rows))
    conversational = use_chat_template(config, tokenizer, train[0])
    longer = sum(n > config.data.max_length for n in prompt_lengths(tokenizer, [r["prompt"] for r in train]))
    return data.PreparedData(
        train=train, eval=evaluation, columns=columns, labels=(), fingerprint=data.fingerprint(train_rows, eval_rows),
        truncated=longer, stats={"format": fmt, "train_rows": len(train), "eval_rows": len(evaluation),
               "conversational": conversational})  # its answers use the chat template


def prompt_lengths(tokenizer: Any, prompts: list[Any]) -> list[int]:
    """Tokens of each prompt as TRL tokenizes it: a conversation through the chat template with the generation
    prompt, text as it is."""
    return [len(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)
                ["input_ids"]) if formats.is_conversation(p) else len(tokenizer(p)["input_ids"]) for p in prompts]


def example(fmt: str, row: dict[str, Any]) -> dict[str, Any]:
    """One row as GRPO reads it: `prompt` (text or messages), `reference` (text), and the row's other plain
    columns by name."""
    if fmt == "chat":
        messages = row["messages"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns and "answer" not in row:
            raise ConfigError([("data.format", "data.format chat for GRPO needs an assistant turn or an answer "
                                               f"column in every row (got {str(messages)[:80]!r})")])
        prompt = messages[:turns[-1]] if turns else messages
        reference = row["answer"] if "answer" in row else messages[turns[-1]]["content"]
        used = ("messages", "answer")
    else:
        used = ("prompt", next(c for c in formats.REFERENCE_COLUMNS if c in row))
        prompt, reference = row["prompt"], row[used[1]]
    others = {k: v for k, v in row.items() if k not in used and k not in ("prompt", "reference")
              and isinstance(v, (str, int, float, bool))}
    return {"prompt": prompt, "reference": str(reference), **others}


@dataclass
class RewardConfig(GRPOConfig):
    """GRPOConfig that also carries the names of the rewards the run sums (`training.rewards`) and the prompt
    tokens kept (`data.max_length`: a longer prompt loses tokens from its start, as the estimator assumes)."""

    rewards: list[str] = field(default_factory=list)
    max_prompt_tokens: int | None = None


def arguments(config: TuneConfig, common: dict[str, Any]) -> Any:
    """GRPOConfig: the shared arguments, the group size, completion length, temperature and KL weight. The eval batch is
    rounded up to whole groups, which TRL requires (this stage's evaluation answers greedily, one each); TRL
    counts the tokens seen itself (prompts and completions), from inputs the Trainer's count cannot read."""
    t = config.training
    groups = math.ceil(common["per_device_eval_batch_size"] / t.num_generations)
    common = {**common, "per_device_eval_batch_size": groups * t.num_generations, "include_num_input_tokens_seen": "no"}
    return RewardConfig(**common,
                        num_generations=t.num_generations, max_completion_length=t.max_completion_length,
                        temperature=t.temperature, beta=t.beta, log_completions=False, rewards=list(t.rewards),
                        max_prompt_tokens=config.data.max_length)


def reward_functions(names: list[str]) -> list[Any]:
    """Each named reward as TRL calls it (keyword arguments, completions as messages for chat prompts), named
    for TRL's per-reward metrics (rewards/<name>/mean)."""
    def wrap(name: str) -> Any:
        def call(prompts: list[Any], completions: list[Any], reference: list[str], **kwargs: Any) -> list[Any]:
            columns = {k: v for k, v in kwargs.items() if k not in TRL_ARGUMENTS}
            return rewards.scored(name, [completion_text(c) for c in completions], reference, prompt=prompts,
                                  **columns)
        call.__name__ = name
        return call
    return [wrap(name) for name in names]


TRL_ARGUMENTS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def completion_text(completion: Any) -> str:
    """A completion as text: TRL gives chat completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def build_trainer(prepared: Any, args: Any, callbacks: list[Any]) -> Any:
    """TRL's GRPOTrainer over the prompts, with the run's model as it was built (method applied)."""
    import datasets

    datasets.disable_progress_bars()
    data = prepared.data
    if not getattr(prepared.built.model.generation_config, "use_cache", True):  # prefix methods (peft_methods.py)
        args.generation_kwargs = {**(args.generation_kwargs or {}), "use_cache": False}
    trainer = RewardTrainer(
        model=prepared.built.model, reward_funcs=reward_functions(args.rewards), args=args,
        train_dataset=datasets.Dataset.from_list(data.train),
        eval_dataset=datasets.Dataset.from_list(data.eval) if data.eval else None,
        processing_class=prepared.tokenizer, callbacks=callbacks)
    trainer.held_out = data.eval
    return trainer


class RewardTrainer(GuardedCheckpoints, GRPOTrainer):
    """GRPOTrainer whose evaluations answer each held-out prompt greedily once and report the exact match
    (`accuracy`) and the mean summed reward (`reward`), instead of sampling groups for a GRPO loss; its
    checkpoints are guarded."""

    held_out: list[dict[str, Any]] = []

    def _tokenize_prompts(self, prompts: list[Any]) -> Any:
        """TRL's prompt tokens, each prompt cut to its last `max_prompt_tokens` (TRL itself no longer cuts them)."""
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        return ([ids[-self.args.max_prompt_tokens:] for ids in prompt_ids], *rest)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.trainer_utils import EvalLoopOutput

        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        self.model.eval()  # TRL's log() reads the mode from the model
        answers = greedy_answers(self.model, self.processing_class, [r["prompt"] for r in self.held_out],
                                 self.args.max_completion_length, self.args.max_prompt_tokens)
        metrics = held_out_metrics(self.held_out, answers, self.args.rewards)
        return EvalLoopOutput(predictions=None, label_ids=None, num_samples=len(self.held_out),
                              metrics={f"{prefix}_{k}": v for k, v in metrics.items()})


def held_out_metrics(rows: list[dict[str, Any]], answers: list[str], names: list[str]) -> dict[str, float]:
    """Exact match of the answers against the references, and their mean summed reward."""
    references = [r["reference"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "reference"}
    matched = rewards.exact_match(answers, references)
    summed = [sum(v or 0.0 for v in values) for values in zip(
        *(rewards.scored(n, answers, references, **columns) for n in names), strict=True)]
    return {"accuracy": sum(matched) / len(rows), "reward": sum(summed) / len(rows)}


def greedy_answers(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                   max_prompt_tokens: int | None = None) -> list[str]:
    """The model's greedy answer to each prompt (a conversation through the chat template, or text as it is),
    left-padded in batches, without gradients; a prompt over `max_prompt_tokens` keeps its last ones."""
    import torch

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             if formats.is_conversation(p) else p for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(texts), EVAL_BATCH):
            batch = tokenizer(texts[start:start + EVAL_BATCH], return_tensors="pt", padding=True,
                              add_special_tokens=not formats.is_conversation(prompts[start])).to(model.device)
            if max_prompt_tokens is not None:  # left-padded: the last columns hold every prompt's last tokens
                batch = {k: v[:, -max_prompt_tokens:] for k, v in batch.items()}
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out
