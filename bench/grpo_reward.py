"""Does GRPO's mean reward rise over training on the embedded model? (issue 14's GRPO acceptance)

The untuned base answers no held-out `nbtune:chat` question exactly (exact match 0.00), so an exact-match
reward gives GRPO no signal from the base: every completion of a group scores 0. This script therefore starts
GRPO from a short SFT run: LoRA SFT on `nbtune:chat` for --sft-steps, merged into a plain model folder
(`export_merged`), then GRPO with LoRA on the same rows from that model, the rewards given by --rewards. It
prints the mean training reward of each logged step (TRL's `reward`: the sum of the rewards, averaged over the
step's sampled completions), the first and last steps' means, and the held-out exact match of greedy answers
before GRPO (its step-0 evaluation: the merged SFT model) and after. With --control-learning-rate it also runs
the same GRPO from the same model at that (negligible) learning rate: the same prompts in the same order, so
the difference of the two curves is what training changed, not which prompts a step drew.

    python bench/grpo_reward.py --batch 64 --learning-rate 1e-3 --control-learning-rate 1e-8 \
        --out bench/results/grpo-reward-2026-12-02.md --png bench/results/grpo-reward-2026-12-02.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the demo: one thread is fastest for this tiny model

import nbtune  # noqa: E402
from nbtune.events import EventStream  # noqa: E402
from nbtune.methods.artifacts import export_merged  # noqa: E402


def sft_model(steps: int, work: Path) -> Path:
    """A LoRA SFT run on nbtune:chat, merged into a plain transformers folder."""
    config = nbtune.TuneConfig(method="lora", data={"source": "nbtune:chat"}, training={"max_steps": steps})
    run = nbtune.train(config, store=work / "store", progress=False)
    if run.status != "finished":
        raise SystemExit(f"the SFT run ended {run.status}: {run.error}")
    return export_merged(run, work / "sft-merged")


def grpo(model: Path, args: argparse.Namespace, work: Path, learning_rate: float) -> tuple[list[dict], list[dict], float]:
    """The GRPO run's step and eval events, and its wall time."""
    from nbtune.training import execute

    config = nbtune.TuneConfig(
        model={"name_or_path": str(model)}, method="lora", data={"source": "nbtune:chat"},
        training={"stage": "grpo", "rewards": args.rewards, "max_steps": args.steps, "log_every": 1,
                  "eval_every": args.steps, "micro_batch_size": args.batch, "num_generations": args.generations,
                  "max_completion_length": 24, "beta": args.beta, "learning_rate": learning_rate,
                  "seed": args.seed})
    events = EventStream()
    started = time.perf_counter()
    execute(config, work / f"grpo-run-{learning_rate}", events)
    kinds = {kind: [e.data for e in events.history if e.kind == kind] for kind in ("step", "eval")}
    return kinds["step"], kinds["eval"], time.perf_counter() - started


def cpu_name() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def blocks(steps: list[dict], size: int) -> str:
    """Mean reward of each `size` consecutive steps."""
    rewards = [s["reward"] for s in steps]
    return ", ".join(f"{statistics.mean(rewards[i:i + size]):.3f}" for i in range(0, len(rewards), size))


def report(args: argparse.Namespace, steps: list[dict], evals: list[dict], seconds: float,
           control: tuple[list[dict], list[dict], float] | None) -> str:
    """The reward curve and the held-out exact match before and after, as markdown."""
    curve = [(s["step"], s["reward"], s.get("reward_std"), s.get("completion_length"), s.get("kl")) for s in steps]
    head, tail = curve[: args.window], curve[-args.window:]
    lines = [
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. CPU: {cpu_name()} ({os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}). GRPO wall time {seconds:.0f} s.",
        "",
        f"Start: LoRA SFT on nbtune:chat for {args.sft_steps} steps, merged (`export_merged`). GRPO: LoRA, rewards "
        f"{args.rewards}, {args.steps} steps, {args.batch} completions a step ({args.batch // args.generations} "
        f"prompts x {args.generations} generations), beta {args.beta}, learning rate {args.learning_rate}, seed "
        f"{args.seed}, at most 24 completion tokens, sampling temperature 1.0 (TRL's default).",
        "",
        f"- mean reward, first {len(head)} steps: {statistics.mean(r for _, r, *_ in head):.3f}; "
        f"last {len(tail)} steps: {statistics.mean(r for _, r, *_ in tail):.3f}",
        f"- held-out exact match of greedy answers (100 eval countries' questions): before GRPO "
        f"{evals[0]['accuracy']:.2f}, after {evals[-1]['accuracy']:.2f}",
        f"- mean reward of each {args.window * 2} steps: {blocks(steps, args.window * 2)}",
        *([f"- control (learning rate {args.control_learning_rate}, same model, prompts and seed; {control[2]:.0f} s): "
           f"mean reward of each {args.window * 2} steps: {blocks(control[0], args.window * 2)}; held-out exact "
           f"match before {control[1][0]['accuracy']:.2f}, after {control[1][-1]['accuracy']:.2f}"] if control else []),
        "",
        "| step | mean reward | reward std | completion length | kl |",
        "|---|---|---|---|---|",
        *(f"| {step} | {r:.3f} | {_num(sd)} | {_num(length, 1)} | {_num(kl, 4)} |"
          for step, r, sd, length, kl in curve),
    ]
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def figure(curves: dict[str, list[dict]], rewards: list[str], window: int) -> dict:
    """Each run's reward curve, as a running mean over `window` steps, as a plotly figure dict (static_image
    draws it without plotly)."""
    def running(values: list[float]) -> list[float]:
        return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
    return {"data": [{"type": "scatter", "mode": "lines", "x": [s["step"] for s in steps],
                      "y": running([s["reward"] for s in steps]), "name": name} for name, steps in curves.items()],
            "layout": {"title": {"text": f"GRPO on nbtune:chat after a short SFT: mean reward ({' + '.join(rewards)}), "
                                         f"running mean of {window} steps"},
                       "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "mean reward"}},
                       "width": 800, "height": 420}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--control-learning-rate", type=float, help="also run a control at this learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rewards", nargs="+", default=["exact-match"])
    parser.add_argument("--window", type=int, default=10, help="steps averaged at the start and at the end")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = sft_model(args.sft_steps, work)
        steps, evals, seconds = grpo(model, args, work, args.learning_rate)
        control = grpo(model, args, work, args.control_learning_rate) if args.control_learning_rate else None
    text = report(args, steps, evals, seconds, control)
    print(text)
    if args.out:
        args.out.write_text(f"# GRPO mean reward over training on `nbtune:chat`\n\n{text}")
    if args.png:
        from nbtune.static_image import png

        curves = {f"learning rate {args.learning_rate}": steps}
        if control:
            curves[f"control, learning rate {args.control_learning_rate}"] = control[0]
        args.png.write_bytes(png(figure(curves, args.rewards, args.window)) or b"")


if __name__ == "__main__":
    main()
