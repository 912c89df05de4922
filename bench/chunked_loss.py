"""Peak memory and step time of `training.loss_implementation` standard vs chunked, side by side, on CPU.

The model is the embedded base's shape (nbtune:tiny: hidden 192, vocabulary 2048, two blocks) with room for 512
positions, with LoRA or full fine-tuning, a micro-batch of full-length rows (what the estimate assumes). The
peak is the most bytes of tensors one real step's forward and backward hold at once beyond the weights and the
optimizer state (nbtune.estimator.measure, exact on CPU), beside the instant estimate's; the time is the median
wall time of a full step (forward, backward, optimizer), standard and chunked interleaved so a shared machine's
drift hits both, on one thread as nbtune trains the embedded model.

    OMP_NUM_THREADS=1 python bench/chunked_loss.py --out bench/results/chunked-loss-YYYY-MM-DD.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOSSES = ("standard", "chunked")


def model_config(max_length: int) -> Any:
    """The embedded base's configuration, with positions for `max_length` tokens."""
    from transformers import AutoConfig

    from nbtune import embedded

    config = AutoConfig.from_pretrained(embedded.BASE_MODEL_DIR)
    config.max_position_embeddings = max(config.max_position_embeddings, max_length)
    return config


def bench_config(method: str, loss: str, max_length: int, batch: int) -> Any:
    from nbtune import TuneConfig

    return TuneConfig(model={"name_or_path": "tiny-shape"}, method=method, data={"max_length": max_length},
                      training={"micro_batch_size": batch, "precision": "fp32", "loss_implementation": loss})


def step_seconds(config: Any, mc: Any, steps: int) -> list[float]:
    """Wall seconds of each full training step (forward, loss, backward, optimizer) after one warm-up step."""
    import torch

    from nbtune.estimator.measure import make_optimizer, step_loss
    from nbtune.estimator.skeleton import build_model

    torch.manual_seed(0)
    model, _ = build_model(config, mc, device="cpu")
    model.train()
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    b, s = config.training.micro_batch_size, config.data.max_length
    ids = torch.randint(0, int(mc.vocab_size), (b, s))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = []
    for step in range(steps + 1):
        started = time.perf_counter()
        step_loss(config, model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            out.append(time.perf_counter() - started)
    return out


def bench(method: str, max_length: int, batch: int, steps: int, reps: int) -> dict[str, dict[str, float]]:
    from nbtune.estimator.estimate import terms
    from nbtune.estimator.measure import measure_step
    from nbtune.estimator.skeleton import facts

    mc = model_config(max_length)
    out: dict[str, dict[str, float]] = {}
    times: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    for rep in range(reps):
        for loss in LOSSES if rep % 2 == 0 else LOSSES[::-1]:
            times[loss] += step_seconds(bench_config(method, loss, max_length, batch), mc, steps)
    for loss in LOSSES:
        config = bench_config(method, loss, max_length, batch)
        t = terms(config, facts(config, mc), device="cpu")
        estimated = max(t.phases["forward end"].dynamic, t.phases["backward"].dynamic)
        out[loss] = {"peak": measure_step(config, mc)["step_peak"], "estimated": estimated,
                     "logits": t.logits.logits, "seconds": statistics.median(times[loss]),
                     "tokens_per_s": batch * max_length / statistics.median(times[loss])}
    return out


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    mib = 2**20
    lines = [f"# Chunked cross-entropy against the standard loss on CPU, {datetime.date.today()}", "",
             f"`{' '.join(['python', *sys.argv])}`; CPU {cpu_model()}, load before {args.load_before}, "
             f"after {os.getloadavg()[0]:.2f}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
             f"torch threads 1; Python {platform.python_version()}.", "",
             f"The embedded base's shape (hidden 192, vocabulary 2048), {args.batch} x {args.max_length} tokens, fp32; "
             f"median of {args.reps} x {args.steps} steps, standard and chunked interleaved.", "",
             "| method | loss | peak MiB (measured) | peak MiB (estimate) | logits term MiB | step s | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for method, by_loss in results.items():
        for loss, r in by_loss.items():
            lines.append(f"| {method} | {loss} | {r['peak'] / mib:.1f} | {r['estimated'] / mib:.1f} | "
                         f"{r['logits'] / mib:.1f} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} |")
    lines.append("")
    for method, by_loss in results.items():
        s, c = by_loss["standard"], by_loss["chunked"]
        lines.append(f"- {method}: chunked holds {100 * (1 - c['peak'] / s['peak']):.0f} % less at its peak "
                     f"({(s['peak'] - c['peak']) / mib:.1f} MiB; the estimate says {(s['estimated'] - c['estimated']) / mib:.1f}), "
                     f"at {c['tokens_per_s'] / s['tokens_per_s']:.2f}x the tokens/s")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--out", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    import torch

    torch.set_num_threads(1)
    results = {m: bench(m, args.max_length, args.batch, args.steps, args.reps) for m in args.methods.split(",")}
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
