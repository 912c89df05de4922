"""Useful (non-padding) tokens per second of `training.packing` against padded batches, side by side.

One process trains the same config padded and packed on each embedded causal dataset, in interleaved
repetitions (padded, packed, packed, padded, ...: drift of a shared machine hits both), one CPU thread as
nbtune's training uses for the embedded model, through `training.execute` (the path every run takes). Both
sides count the same real tokens (a padded batch's attention mask, a packed batch's tokens less its row
fillers), timed from the first step's start to the end of training (loading left out), in wall seconds and in
CPU seconds of the training thread (which other processes taking the CPU do not inflate). The verdict is the
median of the per-repetition ratios packed / padded; the target is >= 1.5.

    OMP_NUM_THREADS=1 python bench/packing.py --reps 6 --steps 60 --out bench/results/packing-YYYY-MM-DD.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = 1.5
DATASETS = ("nbtune:chat", "nbtune:capitals")


def bench_config(source: str, steps: int, packing: bool, method: str) -> Any:
    from nbtune import TuneConfig

    return TuneConfig(method=method, data={"source": source},
                      training={"max_steps": steps, "eval_every": None, "log_every": 5, "micro_batch_size": 16,
                                "precision": "fp32", "warmup_ratio": 0.0, "packing": packing})


def timer() -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Wall and training-thread CPU seconds from the first step's start to the end of training, and the real
        tokens the run counted meanwhile (CPU seconds are insensitive to other processes taking the CPU)."""

        start = cpu_start = None
        seconds = cpu_seconds = 0.0
        tokens = first_tokens = 0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if self.start is None:
                self.start, self.cpu_start = time.perf_counter(), time.thread_time()
                self.first_tokens = state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.thread_time() - self.cpu_start
            self.tokens = state.num_input_tokens_seen - self.first_tokens

    return Timer()


def padded_fill(source: str) -> float:
    """The share of a padded micro-batch's positions that are real tokens, over this seed's batches."""
    import random

    from nbtune import TuneConfig, data, models

    config = TuneConfig(data={"source": source})
    lengths = [len(x["input_ids"]) for x in data.prepare(config, models.load_tokenizer(config)).train]
    random.Random(0).shuffle(lengths)
    batches = [lengths[i:i + 16] for i in range(0, len(lengths), 16)]
    return sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)


def one_pair(source: str, steps: int, method: str, order: tuple[bool, ...]) -> dict[bool, tuple[float, float]]:
    """(real tokens per wall second, per CPU second of the training thread) of each side, in `order`."""
    from nbtune.events import EventStream
    from nbtune.training import execute

    out = {}
    for packing in order:
        clock = timer()
        with tempfile.TemporaryDirectory() as folder:
            summary = execute(bench_config(source, steps, packing, method), Path(folder), EventStream(),
                              extra_callbacks=[clock])
        if summary.state != "finished":
            raise RuntimeError(f"{source} packing={packing}: {summary.error}")
        out[packing] = (clock.tokens / clock.seconds, clock.tokens / clock.cpu_seconds)
    return out


def bench(source: str, reps: int, steps: int, method: str) -> list[dict[str, Any]]:
    rows = []
    for rep in range(reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        rates = one_pair(source, steps, method, order)
        rows.append({"rep": rep + 1, "order": " then ".join("packed" if p else "padded" for p in order),
                     "load": os.getloadavg()[0], "padded": rates[False][0], "packed": rates[True][0],
                     "ratio": rates[True][0] / rates[False][0], "cpu_padded": rates[False][1],
                     "cpu_packed": rates[True][1], "cpu_ratio": rates[True][1] / rates[False][1]})
        print(source, rows[-1], flush=True)
    return rows


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, load: tuple[float, ...]) -> str:
    import torch
    import transformers

    from nbtune.packed_attention import PACKED

    lines = [f"# training.packing: useful tokens/s packed vs padded ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"- Machine: {cpu_model()}, {os.cpu_count()} cores; OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
             f"- Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
             f"Python {platform.python_version()}",
             f"- Config: embedded model, method {args.method}, micro-batch 16, fp32, sdpa, {args.steps} steps; "
             "timed from the first step to the end of training (tokens counted without padding or fillers)",
             f"- Packed under sdpa: {'the whole micro-batch in one row' if PACKED['sdpa'].one_row else 'rows'}, "
             f"attention {PACKED['sdpa'].attention_cost} (nbtune/packed_attention.py)",
             f"- Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/packing.py "
             f"--reps {args.reps} --steps {args.steps} --method {args.method}`",
             f"- Load average when it started: {', '.join(f'{x:.2f}' for x in load)}", ""]
    for source, rows in results.items():
        ratio = statistics.median(r["ratio"] for r in rows)
        fill = padded_fill(source)
        lines += [f"## {source}", "",
                  f"Real tokens fill {fill:.0%} of a padded micro-batch, so removing the padding alone could "
                  f"give at most {1 / fill:.2f}x (attention computed per example, not per padded row, can add a "
                  "little more).", "",
                  "| rep | order | load (1 min) | padded tokens/s | packed tokens/s | packed / padded | "
                  "per CPU second: padded / packed | packed / padded (CPU) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['rep']} | {r['order']} | {r['load']:.2f} | {r['padded']:,.0f} | {r['packed']:,.0f} | "
                  f"{r['ratio']:.3f} | {r['cpu_padded']:,.0f} / {r['cpu_packed']:,.0f} | {r['cpu_ratio']:.3f} |"
                  for r in rows]
        verdict = "meets" if ratio >= TARGET else "does NOT meet"
        by_order = {o: statistics.median(r["ratio"] for r in rows if r["order"] == o) for o in
                    dict.fromkeys(r["order"] for r in rows)}
        both = statistics.geometric_mean(by_order.values())
        lines += ["", f"**median packed / padded = {ratio:.3f}** ({verdict} the target {TARGET}); by order: "
                  + ", ".join(f"{o} {v:.3f}" for o, v in by_order.items())
                  + f"; geometric mean of the two orders {both:.3f}",
                  "", f"Per CPU second of the training thread: median packed / padded "
                  f"{statistics.median(r['cpu_ratio'] for r in rows):.3f}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load = os.getloadavg()
    results = {source: bench(source, args.reps, args.steps, args.method) for source in args.datasets}
    text = report(results, args, load)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
