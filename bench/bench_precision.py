"""Is `training.precision: auto` the fastest precision here? Tokens/s of the default config with precision auto,
fp32 and bf16, side by side in one process.

The three train the default config (`TuneConfig()`: embedded model and dataset, default method) for the same
steps, interleaved in rounds whose order rotates (so drift of a shared machine hits all three), with the
threads nbtune picks (OMP_NUM_THREADS unset). Only the optimizer steps are timed (a callback sums each step's
wall time and counts its tokens), so the evaluations the default config runs are left out. The verdict is the
median tokens/s of auto over the median of the fastest explicit precision; it must be >= 0.95.

    python bench/bench_precision.py --rounds 3 --steps 60 --out bench/results/precision-YYYY-MM-DD.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

THRESHOLD = 0.95
PRECISIONS = ("auto", "fp32", "bf16")


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and tokens of the optimizer steps only (evaluation and saving are outside them)."""

        def __init__(self) -> None:
            self.seconds = self.cpu_seconds = 0.0
            self.tokens = 0
            self._start = self._cpu_start = 0.0
            self._tokens = 0

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self._start, self._cpu_start = time.perf_counter(), time.thread_time()
            self._tokens = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            self.seconds += time.perf_counter() - self._start
            self.cpu_seconds += time.thread_time() - self._cpu_start  # the training thread's own CPU time
            self.tokens += state.num_input_tokens_seen - self._tokens

    return StepTimer()


def train_once(precision: str, steps: int) -> tuple[float, float, str]:
    """(tokens per second and per CPU second of the steps, the precision the run resolved to)."""
    from nbtune import TuneConfig
    from nbtune.events import EventStream
    from nbtune.training import execute

    config = TuneConfig().replace(**{"training.max_steps": steps, "training.precision": precision})
    timer = step_timer()
    with tempfile.TemporaryDirectory() as folder:
        summary = execute(config, Path(folder) / "run", EventStream(), extra_callbacks=[timer])
    return timer.tokens / timer.seconds, timer.tokens / timer.cpu_seconds, summary.precision


def machine() -> dict[str, str]:
    import torch
    import transformers

    from nbtune import precision

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown"
    device = precision.this_device()
    return {"cpu": model, "cores": str(os.cpu_count()), "native_bf16": f"{'yes' if device.native_bf16 else 'no'} "
            f"({device.evidence})", "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}", "omp": os.environ.get("OMP_NUM_THREADS", "unset")}


def run(rounds: int, steps: int) -> dict[str, Any]:
    for name in ("fp32", "bf16"):  # warm-up: imports, first-call kernels of both
        train_once(name, 5)
    rows, resolved = [], ""
    for i in range(rounds):
        order = PRECISIONS[i % 3:] + PRECISIONS[:i % 3]
        load = os.getloadavg()[0]
        speeds, per_cpu = {}, {}
        for name in order:
            speeds[name], per_cpu[name], became = train_once(name, steps)
            if name == "auto":
                resolved = became
        rows.append({"round": i + 1, "order": ", ".join(order), "load": load, **speeds,
                     **{f"{k}_cpu": v for k, v in per_cpu.items()}})
        print(f"round {i + 1} ({', '.join(order)}, load {load:.2f}): "
              + ", ".join(f"{k} {speeds[k]:,.0f}" for k in PRECISIONS), flush=True)
    medians = {name: statistics.median(r[name] for r in rows) for name in PRECISIONS}
    cpu = {name: statistics.median(r[f"{name}_cpu"] for r in rows) for name in PRECISIONS}
    best = {name: max(r[name] for r in rows) for name in PRECISIONS}  # other processes only ever slow a run
    fastest = max(("fp32", "bf16"), key=lambda n: medians[n])
    fastest_cpu = max(("fp32", "bf16"), key=lambda n: cpu[n])
    return {"rows": rows, "medians": medians, "fastest": fastest, "resolved": resolved,
            "ratio": medians["auto"] / medians[fastest], "cpu_ratio": cpu["auto"] / cpu[fastest_cpu],
            "cpu_medians": cpu, "fastest_cpu": fastest_cpu, "best": best}


def report(result: dict[str, Any], info: dict[str, str], rounds: int, steps: int, started: str,
           load_start: tuple[float, float, float]) -> str:
    ratio, fastest = result["ratio"], result["fastest"]
    lines = [f"# precision auto against the fastest precision ({started})", "",
             f"- Machine: {info['cpu']}, {info['cores']} cores; native bf16: {info['native_bf16']}",
             f"- Versions: {info['versions']}; OMP_NUM_THREADS {info['omp']} (nbtune picks its threads)",
             f"- Config: `TuneConfig()` (embedded model and dataset, default method), {steps} steps, "
             f"optimizer steps timed (evaluations left out)",
             f"- Command: `python bench/bench_precision.py --rounds {rounds} --steps {steps}`",
             f"- Load average when it started: {', '.join(f'{x:.2f}' for x in load_start)}",
             f"- precision auto resolved to **{result['resolved']}**", "",
             "| round | order | load (1 min) | auto tokens/s | fp32 tokens/s | bf16 tokens/s | "
             "tokens per CPU second: auto / fp32 / bf16 |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['round']} | {r['order']} | {r['load']:.2f} | {r['auto']:,.0f} | {r['fp32']:,.0f} | "
                     f"{r['bf16']:,.0f} | {r['auto_cpu']:,.0f} / {r['fp32_cpu']:,.0f} / {r['bf16_cpu']:,.0f} |")
    m, c, b = result["medians"], result["cpu_medians"], result["best"]
    lines += ["", f"Medians: auto {m['auto']:,.0f}, fp32 {m['fp32']:,.0f}, bf16 {m['bf16']:,.0f} tokens/s; "
              f"bf16/fp32 = {m['bf16'] / m['fp32']:.2f}.", "",
              f"**auto / fastest ({fastest}) = {ratio:.3f}** (threshold {THRESHOLD}): "
              f"{'PASS' if ratio >= THRESHOLD else 'FAIL'}", "",
              f"Per CPU second of the training thread (insensitive to other processes taking the CPU): auto "
              f"{c['auto']:,.0f}, fp32 {c['fp32']:,.0f}, bf16 {c['bf16']:,.0f}; auto / fastest "
              f"({result['fastest_cpu']}) = {result['cpu_ratio']:.3f}.", "",
              f"Best round of each: auto {b['auto']:,.0f}, fp32 {b['fp32']:,.0f}, bf16 {b['bf16']:,.0f} tokens/s; "
              f"auto / fastest = {b['auto'] / max(b['fp32'], b['bf16']):.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    result = run(args.rounds, args.steps)
    text = report(result, machine(), args.rounds, args.steps, started, load_start)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
