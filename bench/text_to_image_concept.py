"""DreamBooth on the embedded text-to-image default: does a fine-tune teach `nbtune:tiny-diffusion` the concept
of `nbtune:sks-star` (a star, prompted "a red sks in the top left")?

Each row trains through nbtune (`nbtune.train`, the run store: a repeat is served from the cache) and reads the
run's own evaluations: eval accuracy is the share of the 32 images drawn from the held-out prompts (8 colour x
place pairs train never shows, 4 seeds each) that the shape judge names a star, before training (the base) and
after. The acceptance asks >= 0.8 after LoRA.

    python bench/text_to_image_concept.py --out bench/results/text-to-image-concept-$(date +%F).md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import peft

import nbtune
from nbtune.embedded.build_diffusion import cpu_model
from nbtune.generation import SAMPLING

# LoRA on the attention (diffusers' DreamBooth recipe, the task's default) and LoRA that also adapts the
# transformer blocks' other linear layers and the ResNet convolutions, where this tiny UNet draws its shapes
RECIPE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2"]
ROWS = [("lora", {}, 0), ("lora", {"target_modules": RECIPE_TARGETS}, 0),
        ("lora", {"target_modules": RECIPE_TARGETS}, 1), ("lora", {"target_modules": RECIPE_TARGETS}, 2),
        ("full", {}, 0)]


def config(method: str, params: dict, seed: int, steps: int) -> nbtune.TuneConfig:
    return nbtune.TuneConfig(
        model={"name_or_path": "nbtune:tiny-diffusion", "task": "text-to-image"},
        method={"name": method, "params": params}, data={"source": "nbtune:sks-star"},
        training={"max_steps": steps, "micro_batch_size": 8, "eval_every": steps // 3, "seed": seed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--store", default=None, help="run store (default: $NBTUNE_HOME or ./.nbtune)")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    started, lines = time.time(), []
    for method, params, seed in ROWS:
        run = nbtune.train(config(method, params, seed, args.steps), store=args.store, progress=False)
        s = run.summary
        targets = ", ".join(params.get("target_modules", [])) or "default"
        lines.append(f"| {method} | {targets} | {seed} | {s.learning_rate:g} | {s.trainable_percent:.2f} | "
                     f"{_share(s.base_eval_accuracy)} | {_share(s.final_eval_accuracy)} | {s.wall_time_s:.0f} | "
                     f"{'yes' if run.cached else 'no'} |")
        print(lines[-1], flush=True)
    import diffusers
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report = (f"# DreamBooth on `nbtune:tiny-diffusion` with `nbtune:sks-star`\n\n"
              f"Date: {date.today()}. Machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, CPU "
              f"only; load average (1, 5, 15 min) at the end: {load}. torch {torch.__version__}, diffusers "
              f"{diffusers.__version__}, peft {peft.__version__}. Each run: {args.steps} steps of 8 images, eval every "
              f"{args.steps // 3} steps; total wall time {time.time() - started:.0f} s (cached rows cost "
              f"nothing).\n\nStar share: of the 32 images drawn from the held-out prompts ({SAMPLING.describe()}), "
              f"the share the shape judge names a star.\n\n"
              "| method | target modules | seed | lr | trainable % | star share, base | after | time s | cached |\n"
              "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
