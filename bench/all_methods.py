"""Every built-in method on the embedded default, with its default budget: does each one learn?

For each method: eval loss of the untuned base and after tuning (and accuracy on the classification task),
trainable share, wall time. Runs go through the run store, so a repeat is served from the cache.

    python bench/all_methods.py --dataset capitals --out bench/results/all-methods-capitals.md
    python bench/all_methods.py --dataset shapes   # image-cls on the embedded ViT
    python bench/all_methods.py --dataset shape-captions   # image-to-text on the embedded captioner (acc: exact match)

A method the task cannot train (the prompt methods on images) is listed with the registry's reason.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import nbtune
from nbtune.methods import registry
from nbtune.records import RunSummary

TASK = {"capitals": "causal-lm", "regions": "seq-cls", "sentiment": "seq-cls", "shapes": "image-cls",
        "shape-captions": "image-to-text", "sks-star": "text-to-image"}
MODEL = {"shapes": "nbtune:tiny-vit", "shape-captions": "nbtune:tiny-captioner",
         "sks-star": "nbtune:tiny-diffusion"}  # the rest: nbtune:tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="capitals", choices=sorted(TASK))
    parser.add_argument("--methods", nargs="*", help="default: every built-in method")
    parser.add_argument("--store", default=None, help="run store (default: $NBTUNE_HOME or ./.nbtune)")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()

    methods = args.methods or registry.names(include_generated=False)
    base = nbtune.TuneConfig(model={"task": TASK[args.dataset], "name_or_path": MODEL.get(args.dataset, "nbtune:tiny")},
                             data={"source": f"nbtune:{args.dataset}"})
    rows = []
    started = time.time()
    for name in methods:
        if TASK[args.dataset] not in registry.get(name).tasks:
            print(f"{name}: not for {TASK[args.dataset]} (supports {', '.join(registry.get(name).tasks)})", flush=True)
            continue
        run = nbtune.train(base.replace(method=name), store=args.store, progress=False)
        s = run.summary or RunSummary()  # train() returns an ended run, which always has a summary
        base_loss, final_loss = s.base_eval_loss, s.final_eval_loss
        drop = 100 * (1 - final_loss / base_loss) if base_loss and final_loss else None
        rows.append({
            "method": name, "state": run.status, "lr": s.learning_rate,
            "trainable %": s.trainable_percent, "base eval loss": base_loss, "eval loss": final_loss,
            "drop %": drop, "base acc": s.base_eval_accuracy, "acc": s.final_eval_accuracy,
            "time s": s.wall_time_s, "cached": run.cached, "error": s.error,
        })
        print(_line(rows[-1]), flush=True)

    table = _markdown(rows)
    learned = [r for r in rows if r["drop %"] is not None and r["drop %"] >= 10 and
               (r["acc"] is None or r["base acc"] is None or r["acc"] > r["base acc"])]
    verdict = f"{len(learned)} of {len(rows)} methods learned (eval loss >= 10 % below the base's" + (
        ", accuracy above the base's)" if TASK[args.dataset] != "causal-lm" else ")")
    header = (f"# All methods on the embedded default: `nbtune:{args.dataset}`\n\n"
              f"Date: {date.today()}. Machine: {platform.machine()}, {_cpu_model()}, "
              f"{_cores()} cores, CPU only. Budget: each method's defaults (TuneConfig: max_steps "
              f"{base.training.max_steps}, micro-batch {base.training.micro_batch_size}, the registry's "
              f"learning rate). Total wall time {time.time() - started:.0f} s (cached rows cost nothing).\n\n")
    report = header + table + f"\n\n{verdict}.\n"
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)


def _cpu_model() -> str:
    """The CPU's model name as lscpu gives it."""
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or "cpu")


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _line(row: dict) -> str:
    return "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "error" or v)


def _markdown(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c != "error"] + (["error"] if any(r["error"] for r in rows) else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
