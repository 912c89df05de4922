"""Which trainer the supervised stage should run on: transformers' Trainer (nbtune's `sft`, full logits),
the same with nbtune's chunked loss, and TRL's SFTTrainer, side by side on the same model, rows and steps.

TRL's SFTTrainer (1.16) always scores tokens through its fused LM head (`trl.trainer.utils.add_fused_lm_head`:
log-probabilities, entropy and top-1 per trained token, tile by tile), so it never builds the full logits. All
three sides get nbtune's encoded rows of nbtune:chat (loss on the assistant's answer), LoRA on the embedded base,
fp32 (SFTConfig's own default would be bf16, which is emulated on CPUs without AVX512-BF16) and one thread. They
run in interleaved repetitions (the order rotates, so a shared machine's drift hits each), each timed per step
from the third step on (imports and warm-up left out); the verdict is the median step time of each, and the
final training loss, which must agree.

    OMP_NUM_THREADS=1 python bench/sft_trainer.py --reps 3 --steps 30 --out bench/results/sft-trainer-YYYY-MM-DD.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIDES = ("trainer", "trainer-chunked", "trl-sft")
WARM_STEPS = 2  # steps left out of the timing: the first steps import and allocate


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds of each step cycle: one step's start to the next's (the last to the end of training)."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.starts.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            self.end = time.perf_counter()

        def steps(self) -> list[float]:
            ends = [*self.starts[1:], self.end]
            return [b - a for a, b in zip(self.starts, ends, strict=True)][WARM_STEPS:]

    return StepTimer()


def train(side: str, steps: int) -> tuple[float, float]:
    """(median seconds per step, final training loss) of one side."""
    import datasets
    from transformers import TrainingArguments, set_seed

    import nbtune
    from nbtune import data, models
    from nbtune.training import MethodTrainer

    config = nbtune.TuneConfig(method="lora", data={"source": "nbtune:chat"}, training={
        "max_steps": steps, "eval_every": None, "precision": "fp32", "log_every": 5})
    tokenizer = models.load_tokenizer(config)
    prepared = data.prepare(config, tokenizer)
    set_seed(config.training.seed)
    model = models.build(config, tokenizer=tokenizer, dtype="float32", extras={"total_steps": steps}).model
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=config.training.micro_batch_size,
                  max_steps=steps, learning_rate=config.learning_rate, report_to="none", disable_tqdm=True,
                  use_cpu=True, remove_unused_columns=False, save_strategy="no", logging_steps=5,
                  dataloader_num_workers=0, seed=0, data_seed=0, bf16=False)
    collator, timer = data.Collator(tokenizer.pad_token_id, "causal-lm"), step_timer()
    if side == "trl-sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True},
                                                         max_length=None),
                             train_dataset=datasets.Dataset.from_list(prepared.train), data_collator=collator,
                             processing_class=tokenizer, callbacks=[timer])
    else:
        trainer = MethodTrainer(model=model, args=TrainingArguments(**common), train_dataset=prepared.train,
                                data_collator=collator, callbacks=[timer], chunked_loss=side == "trainer-chunked")
    result = trainer.train()
    return statistics.median(timer.steps()), result.training_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    import logging

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_overhead import machine

    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    load = os.getloadavg()
    results: dict[str, list[tuple[float, float]]] = {side: [] for side in SIDES}
    for rep in range(args.reps):
        for side in SIDES[rep % 3:] + SIDES[:rep % 3]:
            results[side].append(train(side, args.steps))
            print(f"rep {rep + 1}: {side} {results[side][-1][0] * 1e3:.0f} ms/step, loss {results[side][-1][1]:.5f}",
                  file=sys.stderr)
    base = statistics.median(s for s, _ in results["trainer"])
    lines = [f"# The supervised stage's trainer, side by side ({time.strftime('%Y-%m-%d %H:%M %Z')})", "",
             f"- Machine: {machine()}", f"- Load average at the start: {', '.join(f'{x:.1f}' for x in load)}; "
             f"at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
             f"- `python bench/sft_trainer.py --reps {args.reps} --steps {args.steps}`: LoRA on nbtune:chat, "
             f"micro-batch 16, fp32, one thread; median step from step {WARM_STEPS + 1}", "",
             "| trainer | median ms per step (each rep) | x transformers' Trainer | final training loss |",
             "|---|---|---:|---|"]
    for side in SIDES:
        steps = [s for s, _ in results[side]]
        lines.append(f"| {side} | {statistics.median(steps) * 1e3:.0f} ({', '.join(f'{s * 1e3:.0f}' for s in steps)}) "
                     f"| {statistics.median(steps) / base:.2f} | {', '.join(f'{loss:.5f}' for _, loss in results[side])} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
