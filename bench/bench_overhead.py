"""What nbtune's events and run store cost in training speed: tokens/s of `nbtune.launch` against a bare
transformers Trainer on the same model, data, method and steps, measured side by side.

Both sides train the same config in the same process, in interleaved repetitions (the order alternates, so
drift of a shared machine hits both), and both are timed the same way: a callback takes the time at the first
step's start and at the end of training, and the tokens the Trainer counted. The nbtune side pays for
everything a notebook run does: a step event per logged step (memory read, JSON line flushed to disk), a
subscriber (as a live chart), the run store, the background thread. The verdict takes the median of the
per-repetition step ratios in each order (bare first, nbtune first); both must be >= 0.98. A repetition's
step ratio pairs the two sides step by step (step i trains the same batch on both) and takes the median of
bare/nbtune over the steps: a stall of this shared VM (another tenant on the core, invisible to the load
average) slows a few steps of one side, which moves a whole-run ratio by up to 40 % but not that median, while
a cost nbtune paid at every step (an event, a flush) would move every pair. The whole-run tokens/s ratios are
reported beside it, and nbtune's costs that are not per step (start, store) are not what it measures. Each
side's minor page faults and system time on its training thread are reported too: they were the overhead's
cause (a background thread's malloc arena gave every step's memory back to the OS; see nbtune/cpu_allocator.py).

    python bench/bench_overhead.py --reps 5 --steps 30 --out bench/results/overhead-YYYY-MM-DD.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

THRESHOLD = 0.98
LOAD: list[float] = []
USAGE: list[tuple[int, float]] = []  # (minor faults, system seconds) of each run's training thread
STEPS: list[list[float]] = []  # each run's step cycles in seconds: one step's start to the next's
BARE_SECONDS: list[float] = []  # timed seconds of each bare run, for the seconds per step


def bench_config(steps: int, log_every: int) -> Any:
    from nbtune import TuneConfig

    # The embedded default model and dataset; no evaluation inside the timed steps, fp32 on CPU.
    return TuneConfig(method="lora", training={"max_steps": steps, "eval_every": None, "log_every": log_every,
                                               "micro_batch_size": 16, "precision": "fp32",
                                               "warmup_ratio": 0.0})


def timer_callback() -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Wall time from the first step's start to the end of training, and the tokens trained on."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.cpu_start = 0.0
            self.seconds = self.cpu_seconds = 0.0
            self.tokens = 0
            self.faults, self.system_s = 0, 0.0  # the training thread's minor page faults and kernel time
            self.step_starts: list[float] = []

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.step_starts.append(time.perf_counter())
            if self.start is None:
                self.start, self.cpu_start = time.perf_counter(), time.thread_time()
                self.first_tokens = state.num_input_tokens_seen
                self.usage = resource.getrusage(resource.RUSAGE_THREAD)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            self.seconds = time.perf_counter() - (self.start or time.perf_counter())
            self.cpu_seconds = time.thread_time() - self.cpu_start  # the training thread's own CPU time
            self.tokens = state.num_input_tokens_seen - self.first_tokens
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            self.faults = usage.ru_minflt - self.usage.ru_minflt
            self.system_s = usage.ru_stime - self.usage.ru_stime
            USAGE.append((self.faults, self.system_s))
            ends = [*self.step_starts[1:], self.start + self.seconds]  # a cycle holds every callback of its step
            STEPS.append([end - start for start, end in zip(self.step_starts, ends, strict=True)])

        @property
        def tokens_per_s(self) -> tuple[float, float]:
            """Tokens per wall-clock second, and per CPU second of the training thread."""
            return self.tokens / self.seconds, self.tokens / self.cpu_seconds

    return Timer()


def run_nbtune(config: Any, store: Path) -> tuple[float, float]:
    import nbtune

    timer = timer_callback()
    run = nbtune.launch(config, store=store, force=True, callbacks=[timer])
    run.subscribe(lambda event: None)  # a live chart listens to every event
    run.wait()
    if run.status != "finished":
        raise RuntimeError(f"nbtune run ended {run.status}: {run.error}")
    return timer.tokens_per_s


def run_bare(config: Any, out_dir: Path) -> tuple[float, float]:
    """The same training with a plain transformers Trainer: same model, data, method and arguments."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from nbtune import data as data_module
    from nbtune import models
    from nbtune.training import OPTIMIZERS, SCHEDULERS, _checkpointing_args

    t = config.training
    set_seed(t.seed)
    tokenizer = models.load_tokenizer(config)
    prepared = data_module.prepare(config, tokenizer)
    model = models.build(config, tokenizer=tokenizer, dtype=config.model.dtype,
                         extras={"total_steps": t.max_steps}).model
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=max(t.micro_batch_size, 16),
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=config.learning_rate,
        num_train_epochs=t.epochs, max_steps=t.max_steps, warmup_steps=t.warmup_ratio,
        lr_scheduler_type=SCHEDULERS[t.scheduler], weight_decay=t.weight_decay, optim=OPTIMIZERS[t.optimizer].trainer_name,
        bf16=t.precision == "bf16" and on_gpu, fp16=t.precision == "fp16" and on_gpu,
        **_checkpointing_args(TrainingArguments, t.gradient_checkpointing), max_grad_norm=t.max_grad_norm,
        seed=t.seed, data_seed=t.seed, eval_strategy="no", eval_on_start=bool(prepared.eval),
        logging_steps=t.log_every, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not on_gpu,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu, prediction_loss_only=True,
    )
    timer = timer_callback()
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval or None,
                      data_collator=data_module.Collator(tokenizer.pad_token_id, config.model.task),
                      callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # printing logs is not training; leave it out of the baseline too
    trainer.train()
    BARE_SECONDS.append(timer.seconds)
    return timer.tokens_per_s


def paired_step_ratio(bare_steps: list[float], nbtune_steps: list[float]) -> float:
    """The median over steps of bare/nbtune step time (the same batch on both sides): nbtune's speed relative
    to the bare Trainer at a typical step, unmoved by a stall of a few steps."""
    return statistics.median(b / n for b, n in zip(bare_steps, nbtune_steps, strict=True))


def event_cost(n: int = 2000) -> float:
    """Seconds one step event costs the training thread: memory read, JSON line flushed, a subscriber fed."""
    from nbtune.events import EventStream
    from nbtune.training import memory_now

    with tempfile.TemporaryDirectory() as tmp:
        stream = EventStream(Path(tmp) / "events.jsonl")
        stream.subscribe(lambda event: None)
        start = time.perf_counter()
        for step in range(n):
            stream.emit("step", step=step, total_steps=n, epoch=0.1, loss=1.234, learning_rate=1e-4, grad_norm=0.5,
                        tokens_per_s=5000.0, samples_per_s=50.0, tokens_seen=step * 100, elapsed_s=1.0,
                        memory=memory_now())
        seconds = (time.perf_counter() - start) / n
        stream.close()
    return seconds


def machine() -> str:
    import torch
    import transformers

    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({cpu})"
    return (f"{platform.node()}: {device}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (each trains both sides)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--log-every", type=int, default=1, help="steps between step events (1: the worst case)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings stable on a shared machine; 0: torch's default)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = bench_config(args.steps, args.log_every)
    LOAD[:] = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, out_dir = Path(tmp) / "store", Path(tmp) / "bare"
        run_bare(config, out_dir), run_nbtune(config, store)  # warm-up: imports, caches, allocator
        for rep in range(args.reps):
            order = ("bare", "nbtune") if rep % 2 == 0 else ("nbtune", "bare")
            result: dict[str, Any] = {}
            for side in order:
                gc.collect()  # the previous run's reference cycles (a Trainer's) go now, not inside this run
                result[side] = run_bare(config, out_dir) if side == "bare" else run_nbtune(config, store)
                result[f"{side}_usage"], result[f"{side}_steps"] = USAGE[-1], STEPS[-1]
            result["ratio"] = result["nbtune"][0] / result["bare"][0]
            result["step_ratio"] = paired_step_ratio(result["bare_steps"], result["nbtune_steps"])
            result["cpu_ratio"] = result["nbtune"][1] / result["bare"][1]
            result["step_s"] = BARE_SECONDS[-1] / args.steps
            result["order"] = ", ".join(order)
            rows.append(result)
            print(f"rep {rep + 1}/{args.reps} ({' then '.join(order)}): bare {result['bare'][0]:.0f} tok/s, "
                  f"nbtune {result['nbtune'][0]:.0f} tok/s, ratio {result['ratio']:.3f}, step ratio "
                  f"{result['step_ratio']:.3f} "
                  f"(per CPU second {result['cpu_ratio']:.3f})", file=sys.stderr)

    per_event = event_cost()
    median = statistics.median(r["ratio"] for r in rows)
    step_median = statistics.median(r["step_ratio"] for r in rows)
    by_order = {order: statistics.median(r["step_ratio"] for r in rows if r["order"] == order)
                for order in ("bare, nbtune", "nbtune, bare") if any(r["order"] == order for r in rows)}
    run_by_order = {order: statistics.median(r["ratio"] for r in rows if r["order"] == order) for order in by_order}
    cpu_median = statistics.median(r["cpu_ratio"] for r in rows)
    step_seconds = statistics.median(r["step_s"] for r in rows)
    verdict = "PASS" if len(by_order) == 2 and min(by_order.values()) >= THRESHOLD else "FAIL"
    lines = [
        f"# nbtune overhead: events and run store vs a bare Trainer ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"- Machine: {machine()}",
        f"- Config: embedded `nbtune:tiny` + `nbtune:capitals`, LoRA, {args.steps} steps, micro-batch 16, "
        f"fp32, a step event every {args.log_every} step(s) with one subscriber; timed from the first step to "
        "the end of training on both sides",
        f"- Command: `python bench/bench_overhead.py --reps {args.reps} --steps {args.steps} "
        f"--log-every {args.log_every} --threads {args.threads}`",
        "",
        f"- Load average when it started: {', '.join(f'{x:.1f}' for x in LOAD)} (a machine shared with other work)",
        "",
        "| rep | order | step ratio | bare tokens/s | nbtune.launch tokens/s | whole-run ratio "
        "| ratio per CPU second | bare faults (sys s) | nbtune faults (sys s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        (bare_faults, bare_sys), (nb_faults, nb_sys) = r["bare_usage"], r["nbtune_usage"]
        lines.append(f"| {i + 1} | {r['order']} | {r['step_ratio']:.3f} | {r['bare'][0]:.0f} "
                     f"| {r['nbtune'][0]:.0f} | {r['ratio']:.3f} "
                     f"| {r['cpu_ratio']:.3f} | {bare_faults} ({bare_sys:.2f}) | {nb_faults} ({nb_sys:.2f}) |")
    def per_order(values: dict[str, float]) -> str:
        return "; ".join(f"{order.split(',')[0]} first: {value:.3f}" for order, value in values.items())

    lines += ["", f"**Median step ratio nbtune/bare (speed at a typical step, paired by step) by order: "
              f"{per_order(by_order)}** (threshold {THRESHOLD} in both orders): {verdict}. Over all repetitions: "
              f"{step_median:.3f}.", "",
              f"Median whole-run ratio (tokens per wall-clock second, moved by stalls) by order: "
              f"{per_order(run_by_order)}. Over all repetitions: {median:.3f}.", "",
              f"Median ratio of tokens per CPU second of the training thread (insensitive to other processes "
              f"taking the CPU): {cpu_median:.3f}.", "",
              f"Without the noise of whole runs: one step event costs the training thread {per_event * 1e6:.0f} µs "
              f"(memory read, JSON line flushed, one subscriber fed; mean of 2000), against a median bare step of "
              f"{step_seconds * 1e3:.0f} ms here: {100 * per_event / step_seconds:.2f} % of a step.", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
