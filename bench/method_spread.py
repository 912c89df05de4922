"""Do the built-in methods spread on an embedded classification task? Mean ± std of eval accuracy over seeds.

Runs `nbtune.compare` once per seed (the seed set through `training.seed`) for every built-in seq-cls method, in
a temporary store so that it measures training, not the cache, and counts the distinct quality levels.

    python bench/method_spread.py --dataset languages --out bench/results/method-spread-2026-12-01.md

Distinct levels: methods sorted by mean accuracy; a level starts at its best method, and a method below it opens
a new level when its mean is lower by more than the larger of the two methods' std (sample std over the seeds);
the strict count asks for more than the sum of the two std (mean ± std intervals that do not overlap).
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
from nbtune import embedded  # noqa: E402
from nbtune.methods import registry  # noqa: E402


def accuracies(dataset: str, methods: list[str], seeds: list[int], store: str) -> dict[str, list[float | None]]:
    """{method: [eval accuracy per seed]} (None where a method failed), printing each seed's line."""
    base = nbtune.TuneConfig(model={"task": "seq-cls"}, data={"source": f"nbtune:{dataset}"})
    found: dict[str, list[float | None]] = {m: [] for m in methods}
    for seed in seeds:
        started = time.perf_counter()
        comparison = nbtune.compare(base.replace(**{"training.seed": seed}), methods=methods, store=store,
                                    progress=False)
        for name in methods:
            summary = comparison.runs[name].summary if name in comparison.runs else None
            found[name].append(summary.final_eval_accuracy if summary else None)
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s  "
              + "  ".join(f"{m}={_fmt(found[m][-1])}" for m in methods), flush=True)
    return found


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the finished seeds (std 0 for one seed; None when none finished)."""
    done = [v for v in values if v is not None]
    if not done:
        return None, None
    return statistics.fmean(done), statistics.stdev(done) if len(done) > 1 else 0.0


def levels(stats: dict[str, tuple[float, float]], strict: bool = False) -> dict[str, int]:
    """Each method's quality level (1 = best), by the rule in this module's docstring."""
    ranked = sorted(stats, key=lambda m: -stats[m][0])
    level, leader, out = 1, ranked[0] if ranked else None, {}
    for name in ranked:
        assert leader is not None
        a, b = stats[leader][1], stats[name][1]
        if stats[leader][0] - stats[name][0] > (a + b if strict else max(a, b)):
            level, leader = level + 1, name
        out[name] = level
    return out


def machine() -> str:
    """Date, CPU model, load and versions: what a reader needs to compare a later measurement with this one."""
    import peft
    import torch
    import transformers

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. CPU: {model} ({os.cpu_count()} cores, CPU "
            f"only, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); load average (1, 5, 15 min) at the end: "
            f"{load}. Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, nbtune {getattr(nbtune, '__version__', '?')}.")


def report(dataset: str, found: dict[str, list[float | None]], seeds: list[int], seconds: float) -> str:
    """The markdown result: the machine, the task, the table (best first) and the number of distinct levels."""
    stats = {m: mean_std(v) for m, v in found.items()}
    done = {m: (s[0], s[1]) for m, s in stats.items() if s[0] is not None and s[1] is not None}
    level = levels(done)
    spec = embedded.DATASETS[dataset]
    n_eval = len(embedded.load_rows(dataset, "eval"))
    majority = max(map([r["label"] for r in embedded.load_rows(dataset, "eval")].count, spec.labels)) / n_eval
    rows = ["| method | eval accuracy, mean ± std | per seed | level |", "|---|---|---|---|"]
    for m in sorted(found, key=lambda m: -(stats[m][0] or -1)):
        mean, std = stats[m]
        cell = f"{mean:.3f} ± {std:.3f}" if mean is not None and std is not None else "failed"
        rows.append(f"| {m} | {cell} | {' '.join(map(_fmt, found[m]))} | {level.get(m, '-')} |")
    return (f"# Method spread on `nbtune:{dataset}`\n\n{machine()}\n\n"
            f"Task: {spec.description} {len(spec.labels)} classes, {len(embedded.load_rows(dataset, 'train'))} "
            f"train rows, {n_eval} eval rows; majority-class baseline {majority:.3f}. Budget: the demo's "
            f"(TuneConfig defaults, each method at its registry learning rate). Seeds {seeds} through "
            f"`training.seed`, a fresh temporary store; {seconds:.0f} s in all.\n\n" + "\n".join(rows)
            + f"\n\n**{max(level.values(), default=0)} distinct levels** among {len(found)} methods (a new level "
            "starts when a mean is lower than its level's best by more than the larger of the two std); "
            f"{max(levels(done, strict=True).values(), default=0)} by the strict rule (more than the sum of the "
            "two std).\n")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="languages", choices=[d.name for d in embedded.DATASETS.values()
                                                                    if d.task == "seq-cls"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", help="default: every built-in seq-cls method")
    parser.add_argument("--out", type=Path, help="write the markdown result here")
    args = parser.parse_args()
    methods = args.methods or [m.name for m in registry.all_methods(include_generated=False)
                               if "seq-cls" in m.tasks]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbtune-spread-") as store:
        found = accuracies(args.dataset, methods, args.seeds, store)
    text = report(args.dataset, found, args.seeds, time.perf_counter() - started)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
