"""nbtune on a real GPU in one prepared command: peak memory beside both estimate tiers, tokens/s and MFU.

Models of real shapes (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B from the estimator's catalogue) get
random weights (a shape's memory and speed do not depend on its weights) and the embedded tokenizer (its ids fit
any of their vocabularies). Each row of the matrix trains a few steps through `nbtune.training.execute` and
records torch.cuda's max allocated and reserved memory over training beside the instant and simulated estimates,
tokens/s after the warm-up steps, MFU (FLOPs from nbtune.projection over the GPU's datasheet peak), the memory
left after the run, and for some rows a bare transformers Trainer's tokens/s. Rows run most informative first
under a time budget; a row that would not fit the time left (or the GPU) is skipped and says so. The report is
written row by row, so a killed run keeps what it measured. After the matrix, in time kept back for it, one
real out-of-memory: a row whose first micro-batch the estimate puts at 1.3x the free memory trains with
`training.on_oom: shrink` and must finish shrunk, with memory back to baseline (`check_oom_shrink`); then one
process trains under distributed.strategy fsdp through `accelerate launch`, its peak beside the per-GPU
estimate (`check_fsdp`). `--dry-run` runs tiny shapes on CPU, one step per
row and no CUDA call, so the whole path is tested here (tests/test_gpu_check.py).

Here, once (the lock's transformers, peft, trl, bitsandbytes cut to its CUDA 13 library, and liger-kernel from
the `gpu` extra: 19 MB in .whl/):
    python bench/gpu_check.py --prepare-wheels .whl
On the device: its python3 has torch 2.11+cu130, accelerate, safetensors, tokenizers, transformers 5.17 (the
lock's 5.24 is carried), no bitsandbytes, trl or datasets, and no network. One call, `carry: [".whl"]`,
timeout_s 540 (the budget, the install and the interpreter's start, with a margin), this command:
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 || exit; nvidia-smi; python3 bench/gpu_check.py --budget-s 450 --out $OUT/gpu-$(date -u +%F).md 2>&1 | tee $OUT/gpu-check.log
then copy the report into bench/results/. A second call can run the rows the first skipped (`--rows 14,15,...`).
Here, the test's way:
    python bench/gpu_check.py --dry-run --out /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
SHAPES = {"qwen-0.5b": "Qwen/Qwen2.5-0.5B", "llama-1b": "meta-llama/Llama-3.2-1B",
          "llama-3b": "meta-llama/Llama-3.2-3B", "llama-8b": "meta-llama/Llama-3.1-8B"}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 2048}  # --dry-run: the same kinds, tiny
STEPS, WARMUP_STEPS = 8, 2  # tokens/s is timed over the steps after the warm-up (allocator, kernels' autotune)
# Time a row is predicted to take, before the adaptive factor (the slowest measured/predicted ratio so far).
BUILD_BYTES_PER_S, LOAD_BYTES_PER_S, SAVE_BYTES_PER_S = 1.0e9, 2.0e9, 1.0e9  # random weights to disk; load; artifact
RUN_OVERHEAD_S, ASSUMED_MFU = 12.0, 0.2  # per training run (tokenizer, data, Trainer, teardown); before any row
DRY_ROW_S, DRY_SEQ_DIVISOR = 3.0, 16  # --dry-run: predicted seconds of a tiny run on CPU; shorter sequences
SUMMARY_S = 5.0  # kept back from the budget for the summary
LEFT_OVER_MIB = 16  # more than this allocated after a run is reported as memory not returned


@dataclass(frozen=True)
class Row:
    """One config of the matrix: a shape, a method and a step's size; `bare` also trains it with a bare
    Trainer; `lengths` "full" gives every example max_length tokens (what the estimate assumes), "varied" a
    uniform spread (padding matters); `options` are further training.* fields (packing, where nbtune has it)."""

    shape: str
    method: str
    seq: int
    batch: int
    checkpointing: bool
    bare: bool = False
    lengths: str = "full"
    options: tuple[tuple[str, Any], ...] = ()


FAST = (("packing", True), ("loss_implementation", "liger"))  # the "packing + Liger" rows
# Most informative first: the acceptance row (8B LoRA at 2048) with the bare Trainer; then every
# method once on one shape; then the rows where the estimator is known to be off (QLoRA 7B+ at mb 1-2,
# seq 512-1304), padded vs packed (+ torch.compile, once nbtune has training.compile) on varied lengths, the
# longest sequences, checkpointing both ways, and the remaining sizes.
MATRIX = (
    Row("llama-8b", "lora", 2048, 1, False, bare=True),
    Row("llama-1b", "full", 2048, 2, False, bare=True),
    Row("llama-1b", "qlora", 2048, 2, True),
    Row("llama-1b", "ia3", 2048, 2, False),
    Row("llama-1b", "prompt-tuning", 1024, 2, False),
    Row("llama-1b", "prefix-tuning", 1024, 2, False),
    Row("llama-8b", "qlora", 1024, 1, True),
    Row("llama-8b", "lora", 2048, 4, False, bare=True, lengths="varied"),
    Row("llama-8b", "lora", 2048, 4, False, lengths="varied", options=FAST),
    Row("llama-8b", "lora", 2048, 4, False, lengths="varied", options=(*FAST, ("compile", True))),
    Row("qwen-0.5b", "full", 4096, 1, True),
    Row("llama-3b", "lora", 4096, 1, True),
    Row("llama-1b", "lora", 512, 4, False, bare=True),
    Row("llama-3b", "full", 1024, 1, True),
    Row("qwen-0.5b", "lora", 2048, 4, False),
    Row("llama-8b", "qlora", 512, 2, False),
    Row("llama-8b", "lora", 4096, 1, True),
    Row("llama-3b", "qlora", 512, 2, False),
    Row("qwen-0.5b", "ia3", 512, 4, True),
    Row("llama-3b", "prefix-tuning", 2048, 1, False),  # prefix methods refuse checkpointing (registry)
    Row("qwen-0.5b", "prompt-tuning", 4096, 1, True),
)
COLUMNS = ("#", "shape", "method", "seq", "batch", "ckpt", "data", "instant GiB", "simulated GiB", "allocated GiB",
           "reserved GiB", "instant err %", "simulated err %", "reserved err %", "tokens/s", "MFU %",
           "bare tokens/s", "nbtune/bare", "left MiB", "s", "note")


def dry(row: Row) -> Row:
    """A row as --dry-run runs it: the same config with sequences 16 times shorter (tiny shapes, one step)."""
    return dataclasses.replace(row, seq=max(32, row.seq // DRY_SEQ_DIVISOR))


def shape_config(shape: str, tiny: bool) -> Any:
    """The catalogue's model config of a shape (its vocabulary too); `tiny` keeps only its kind."""
    from transformers import AutoConfig

    from nbtune.estimator.catalogue import lookup

    values = dict(lookup(SHAPES[shape]) or {})
    if tiny:
        values.update(TINY)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_shape(shape: str, folder: Path, tiny: bool, cuda: bool) -> None:
    """A model folder of the shape with random bf16 weights (made on the GPU: fast) and the embedded tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from nbtune import embedded

    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(shape_config(shape, tiny), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    positions = model.config.max_position_embeddings
    del model
    shutil.copy(embedded.BASE_MODEL_DIR / "tokenizer.json", folder / "tokenizer.json")
    settings = json.loads((embedded.BASE_MODEL_DIR / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": positions}))
    _free(cuda)


def text_rows(row: Row, count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` texts of random words that the embedded tokenizer makes into at least max_length tokens
    ("full"), or into lengths spread uniformly from max_length / 8 to max_length ("varied")."""
    from nbtune import embedded

    rng = random.Random(seed)
    vocab = [w.lstrip("Ġ▁") for w in _tokenizer_vocab(embedded.BASE_MODEL_DIR)]
    words = [w for w in vocab if w.isalpha()]
    rows = []
    for _ in range(count):
        n = row.seq if row.lengths == "full" else rng.randint(max(8, row.seq // 8), row.seq)
        rows.append({"text": " ".join(rng.choice(words) for _ in range(n + 8))})  # a word is >= 1 token
    return rows


def _tokenizer_vocab(folder: Path) -> list[str]:
    return list(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])


def tune_config(row: Row, model: str, steps: int, source: Any = None) -> Any:
    """The TuneConfig of a row: bf16 weights and autocast, no eval, a learning rate random weights survive."""
    from nbtune import TuneConfig

    data: dict[str, Any] = {"max_length": row.seq, "format": "text", "train_on": "all"}
    if source is not None:
        data.update(source={"train": source, "eval": []})
    training = {"micro_batch_size": row.batch, "precision": "bf16", "gradient_checkpointing": row.checkpointing,
                "max_steps": steps, "log_every": steps, "eval_every": None, "warmup_ratio": 0.0,
                "learning_rate": 1e-5, "scheduler": "constant", **dict(row.options)}
    return TuneConfig(model={"name_or_path": model, "dtype": "bf16"}, method=row.method, data=data,
                      training=training)


def supported(row: Row) -> str | None:
    """Why this nbtune cannot run the row (an option it has no field for), or None."""
    from nbtune.config import TrainingConfig

    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    missing = [name for name, _ in row.options if name not in names]
    return f"this nbtune has no training.{missing[0]}" if missing else None


def step_clock(cuda: bool) -> Any:
    """A Trainer callback that resets the GPU's peak memory as training begins and times every step end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []  # (time, non-padding tokens seen) at train begin, step ends

        def _mark(self, state: Any) -> None:
            if cuda:
                import torch

                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if cuda:
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._mark(state)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            self._mark(state)

        def tokens_per_s(self) -> float | None:
            marks = self.marks[WARMUP_STEPS:] if len(self.marks) > WARMUP_STEPS + 1 else self.marks
            if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
                return None
            return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])

    return StepClock()


def peaks(cuda: bool, baseline: int) -> dict[str, float]:
    """Peak allocated/reserved GiB since the last reset, then what is still allocated after freeing (MiB)."""
    if not cuda:
        return {}
    import torch

    out = {"allocated": torch.cuda.max_memory_allocated() / GIB, "reserved": torch.cuda.max_memory_reserved() / GIB}
    _free(cuda)
    out["left_mib"] = (torch.cuda.memory_allocated() - baseline) / 2**20
    return out


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def run_nbtune(row: Row, folder: Path, work: Path, steps: int, cuda: bool) -> dict[str, Any]:
    """One row trained through nbtune.training.execute: its measured peaks, tokens/s and the summary's note (a
    fallback: liger asked where liger-kernel cannot run)."""
    from nbtune import training
    from nbtune.events import EventStream

    baseline = _allocated(cuda)
    config = tune_config(row, str(folder), steps, text_rows(row, steps * row.batch))
    clock = step_clock(cuda)
    run_dir = work / "run"
    try:
        note = training.execute(config, run_dir, EventStream(), extra_callbacks=[clock]).note
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {**peaks(cuda, baseline), "tokens_per_s": clock.tokens_per_s(), "note": note}


def run_bare(row: Row, folder: Path, work: Path, steps: int, cuda: bool) -> float | None:
    """The same row with a bare transformers Trainer (full or peft's LoRA, as a user writes it): tokens/s."""
    import peft
    import torch
    import transformers as tf

    from nbtune.training import _checkpointing_args

    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoded = [tokenizer(r["text"], truncation=True, max_length=row.seq) for r in text_rows(row, steps * row.batch)]
    encoded = [{**e, "labels": list(e["input_ids"])} for e in encoded]
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    if row.method == "lora":
        p = tune_config(row, str(folder), steps).method_params
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=p["r"], lora_alpha=p["alpha"],
                                                           lora_dropout=p["dropout"]))
    args = tf.TrainingArguments(
        output_dir=str(work / "bare"), per_device_train_batch_size=row.batch, max_steps=steps, learning_rate=1e-5,
        lr_scheduler_type="constant", bf16=True, optim="adamw_torch", report_to="none", save_strategy="no",
        logging_steps=steps, disable_tqdm=True, include_num_input_tokens_seen="non_padding", use_cpu=not cuda,
        **_checkpointing_args(tf.TrainingArguments, row.checkpointing))
    clock = step_clock(cuda)
    trainer = tf.Trainer(model=model, args=args, train_dataset=encoded, callbacks=[clock],
                         data_collator=tf.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.remove_callback(tf.trainer_callback.PrinterCallback)  # its log lines, as nbtune removes them
    trainer.train()
    del trainer, model
    shutil.rmtree(work / "bare", ignore_errors=True)
    _free(cuda)
    return clock.tokens_per_s()


def _allocated(cuda: bool) -> int:
    if not cuda:
        return 0
    import torch

    return torch.cuda.memory_allocated()


@dataclass
class Budget:
    """The global time budget: what is left, and the factor on a row's predicted seconds: the largest
    measured/predicted ratio of the last three rows run (never below 1), the first row's left out (it also
    pays the process's one-time costs: CUDA's context, kernels loading, lazy imports)."""

    seconds: float
    started: float = dataclasses.field(default_factory=time.perf_counter)
    scale: float = 1.0
    mfu: float = ASSUMED_MFU
    measured_mfu: list[float] = dataclasses.field(default_factory=list)
    ratios: list[float] = dataclasses.field(default_factory=list)
    runs: int = 0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def learn(self, predicted: float, taken: float, mfu: float) -> None:
        self.runs += 1
        if self.runs > 1:
            self.ratios.append(taken / max(predicted / self.scale, 1e-9))
            self.scale = max(1.0, *self.ratios[-3:])
        if mfu > 0:  # the slowest MFU measured so far stands for the rows not yet run
            self.measured_mfu.append(mfu)
            self.mfu = min(self.measured_mfu)


def predicted_seconds(row: Row, estimate: Any, flops_per_token: float, built: bool, peak_flops: float | None,
                      budget: Budget) -> float:
    """Seconds the row should take: building the shape (once), loading, the steps, the artifact, the bare run."""
    from nbtune.projection import QUANTIZED_SLOWDOWN

    if peak_flops is None:  # a dry run on CPU
        return DRY_ROW_S * (1 + row.bare) * budget.scale
    weights = 2 * estimate.total_params  # bf16 bytes
    steps = STEPS * row.batch * row.seq * flops_per_token / (peak_flops * budget.mfu)
    steps *= QUANTIZED_SLOWDOWN if row.method == "qlora" else 1.0
    one = RUN_OVERHEAD_S + weights / LOAD_BYTES_PER_S + steps
    one += weights / SAVE_BYTES_PER_S if row.method == "full" else 0.0
    build = 0.0 if built else weights / BUILD_BYTES_PER_S + RUN_OVERHEAD_S
    return (build + one * (1 + row.bare)) * budget.scale


class Report:
    """The markdown report, written line by line (flushed), so a killed run keeps the rows it finished."""

    def __init__(self, path: Path, header: list[str]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(header) + "\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        self.rows: list[dict[str, Any]] = []

    def add(self, values: dict[str, Any]) -> None:
        self.rows.append(values)
        self.write("| " + " | ".join(_cell(values.get(c)) for c in COLUMNS) + " |")
        print(", ".join(f"{c}={_cell(values.get(c))}" for c in COLUMNS if values.get(c) is not None), flush=True)

    def write(self, line: str) -> None:
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/")


def environment(cuda: bool, budget_s: float, dry_run: bool) -> list[str]:
    """The report's header: the GPU, its driver, CUDA and the libraries' versions, the date, the CPU."""
    import torch

    from nbtune.training import library_versions

    gpu, driver = "none (dry run on CPU)", "-"
    if cuda:
        gpu = torch.cuda.get_device_name(0)
        driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    versions = library_versions()
    now = datetime.datetime.now(datetime.UTC)
    lines = [f"# nbtune on a real GPU: {gpu}, {now:%Y-%m-%d}", "",
             f"`python bench/gpu_check.py{' --dry-run' if dry_run else ''} --budget-s {budget_s:g}`, started "
             f"{now:%Y-%m-%d %H:%M} UTC, commit {_command(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'])}",
             "", "| | |", "|---|---|", f"| GPU | {gpu} |", f"| driver | {driver} |",
             f"| CUDA (torch's) | {torch.version.cuda or '-'} |", f"| CPU | {_cpu_model()} |",
             f"| Python | {platform.python_version()} |"]
    lines += [f"| {name} | {versions.get(name, '-')} |" for name in
              ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")]
    lines += ["", "Random weights of the catalogue's shapes, the embedded tokenizer; bf16 weights and autocast, "
              f"AdamW, {STEPS if not dry_run else 1} steps a row. Measured: torch.cuda max allocated/reserved over "
              "training; estimates: allocated (err = estimate / measured - 1) and the instant tier's reserved; "
              f"tokens/s: non-padding tokens after {WARMUP_STEPS} warm-up steps; MFU: nbtune.projection's FLOPs per "
              "token over the datasheet's dense bf16 peak; left MiB: still allocated after the run, freed."]
    if dry_run:
        lines += ["", "**Dry run**: tiny shapes on CPU, one step a row; its figures test the path, they measure nothing."]
    return lines


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def simulated_estimate(row: Row, tiny: bool, pool: ProcessPoolExecutor | None) -> Any:
    """The row's simulated estimate: a future on the pool's process (it runs beside the GPU work), or, without
    a pool, the estimate itself."""
    from nbtune.estimator import simulate_memory

    if supported(row) is not None:
        return None
    config, model_config = tune_config(row, SHAPES[row.shape], STEPS), shape_config(row.shape, tiny)
    if pool is None:
        return _or_none(simulate_memory, config, model_config, steps=2)
    return pool.submit(simulate_memory, config, model_config, steps=2)


def check_row(index: int, row: Row, ctx: dict[str, Any], budget: Budget, simulated: Any) -> dict[str, Any]:
    """Estimate, then (time and GPU allowing) build the shape, train the row, measure; the report's values."""
    from nbtune.estimator import estimate_memory
    from nbtune.estimator.skeleton import facts
    from nbtune.projection import step_flops

    out: dict[str, Any] = {"#": index, "shape": row.shape, "method": row.method, "seq": row.seq,
                           "batch": row.batch, "ckpt": row.checkpointing, "data": _data_label(row),
                           "lengths": row.lengths, "options": row.options}  # the last two: for the summary
    if supported(row) is not None:
        return {**out, "note": f"skipped: {supported(row)}"}
    instant = estimate_memory(tune_config(row, SHAPES[row.shape], STEPS), shape_config(row.shape, ctx["tiny"]))
    out["instant GiB"] = instant.allocated_bytes / GIB
    flops = step_flops(instant, facts(instant.config, instant.model_config))[0]
    folder = ctx["work"] / row.shape
    predicted = predicted_seconds(row, instant, flops, folder.exists(), ctx["peak_flops"], budget)
    why_not = _skip_reason(instant, predicted, budget, ctx["gpu_bytes"])
    started = time.perf_counter()
    if why_not:
        out["note"] = "skipped: " + why_not
    else:
        try:
            _measure(row, folder, ctx, out, first=("bare" if index % 2 == 0 else "nbtune"))
        except Exception as error:  # noqa: BLE001 - one failing row must not lose the rest of the matrix
            out["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        _free(ctx["cuda"])  # after the except block: a caught CUDA OOM's frames hold tensors until it ends
        out["s"] = time.perf_counter() - started
    simulated = _or_none(simulated.result) if isinstance(simulated, Future) else simulated  # done by now
    if simulated is not None:
        out["simulated GiB"] = simulated.allocated_bytes / GIB
    _derive(out, instant, simulated, flops, ctx["peak_flops"], row)
    if not why_not:
        budget.learn(predicted, out["s"], (out.get("MFU %") or 0) / 100)
    return out


def _data_label(row: Row) -> str:
    """The row's lengths and options in words: "varied, packing, liger"."""
    return row.lengths + "".join(f", {k}" if v is True else f", {v}" for k, v in row.options if v)


def _skip_reason(instant: Any, predicted: float, budget: Budget, gpu_bytes: int | None) -> str | None:
    if gpu_bytes is not None and instant.total_bytes > gpu_bytes:
        return f"estimated {instant.total_bytes / GIB:.0f} GiB does not fit the GPU's {gpu_bytes / GIB:.0f} GiB"
    if predicted > budget.left() - SUMMARY_S:
        return f"needs ~{predicted:.0f} s, {max(budget.left() - SUMMARY_S, 0):.0f} s of the budget left"
    return None


def _measure(row: Row, folder: Path, ctx: dict[str, Any], out: dict[str, Any], first: str) -> None:
    """Build the shape if needed, then train the row with nbtune (and a bare Trainer, in alternating order)."""
    cuda, steps, work = ctx["cuda"], ctx["steps"], ctx["work"]
    if not folder.exists():
        build_shape(row.shape, folder, ctx["tiny"], cuda)
    if row.bare and first == "bare":
        out["bare tokens/s"] = run_bare(row, folder, work, steps, cuda)
    measured = run_nbtune(row, folder, work, steps, cuda)
    out.update({"allocated GiB": measured.get("allocated"), "reserved GiB": measured.get("reserved"),
                "left MiB": measured.get("left_mib"), "tokens/s": measured["tokens_per_s"]})
    if row.bare and first == "nbtune":
        out["bare tokens/s"] = run_bare(row, folder, work, steps, cuda)
    if row.bare:
        out["note"] = f"{first} ran first"
    if measured.get("note"):
        out["note"] = ((out.get("note") or "") + "; " + measured["note"]).lstrip("; ")
    if (out.get("left MiB") or 0) > LEFT_OVER_MIB:
        out["note"] = ((out.get("note") or "") + "; memory not back to baseline").lstrip("; ")


def _derive(out: dict[str, Any], instant: Any, simulated: Any, flops: float, peak_flops: float | None,
            row: Row) -> None:
    """Errors (full-length rows: what the estimate assumes), MFU and the nbtune/bare ratio."""
    allocated, reserved = out.get("allocated GiB"), out.get("reserved GiB")
    if allocated and row.lengths == "full":
        out["instant err %"] = 100 * (instant.allocated_bytes / GIB / allocated - 1)
        out["reserved err %"] = 100 * (instant.reserved_bytes / GIB / reserved - 1)
        if simulated is not None:
            out["simulated err %"] = 100 * (simulated.allocated_bytes / GIB / allocated - 1)
    speed, bare = out.get("tokens/s"), out.get("bare tokens/s")
    if speed and peak_flops and row.lengths == "full":
        out["MFU %"] = 100 * speed * flops / peak_flops
    if speed and bare:
        out["nbtune/bare"] = speed / bare


def summary_lines(rows: list[dict[str, Any]], seconds: float) -> list[str]:
    """Medians of the estimate errors, the nbtune/bare ratios, what was skipped or failed, the time taken."""
    lines = ["", "## Summary", ""]
    for column in ("instant err %", "simulated err %", "reserved err %"):
        errors = [abs(r[column]) for r in rows if r.get(column) is not None]
        if errors:
            lines.append(f"- median |{column.removesuffix(' %')}|: {statistics.median(errors):.1f} % "
                         f"over {len(errors)} rows (max {max(errors):.1f} %)")
    ratios = [f"{r['nbtune/bare']:.3f} (row {r['#']}, {r['note']})" for r in rows if r.get("nbtune/bare")]
    if ratios:
        lines.append("- nbtune / bare Trainer tokens/s: " + ", ".join(ratios))
    lines += [line for r in rows if r.get("options") and (line := _against_plain(r, rows))]
    for word in ("skipped", "failed"):
        count = sum(1 for r in rows if str(r.get("note", "")).startswith(word))
        lines.append(f"- {word}: {count} of {len(rows)} rows")
    lines.append(f"- total: {seconds:.0f} s")
    return lines


def _against_plain(row: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """A row with options (packing) against the same config without them: tokens/s and peak memory ratios."""
    same = ("shape", "method", "seq", "batch", "ckpt", "lengths")
    plain = next((r for r in rows if not r.get("options") and all(r.get(k) == row.get(k) for k in same)), None)
    if plain is None or not row.get("tokens/s"):
        return None
    parts = [f"{row['tokens/s'] / plain[k]:.2f}x the tokens/s of {who}" for k, who in
             (("tokens/s", "nbtune"), ("bare tokens/s", "the bare Trainer")) if plain.get(k)]
    if row.get("allocated GiB") and plain.get("allocated GiB"):
        parts.append(f"peak allocated {100 * (row['allocated GiB'] / plain['allocated GiB'] - 1):+.0f} %")
    return f"- row {row['#']} ({row['data']}) against row {plain['#']} (padded): " + ", ".join(parts)


def prepare_wheels(folder: Path) -> int:
    """Download the lock's transformers, peft, trl (the simulated tier imports its kernels) and bitsandbytes for
    the device's Python 3.12, bitsandbytes cut to its CUDA 13 library (the device's torch is cu130), and the
    `gpu` extra's liger-kernel (pure Python; its Triton comes with the device's torch): what the device lacks
    or has at other versions. Not datasets: in-memory rows need it not, and trl imports it lazily."""
    pins = [line.split(";")[0].strip() for line in (ROOT / "requirements.lock").read_text().splitlines()]
    names = [pin for pin in pins if pin.split("==")[0] in ("transformers", "peft", "trl", "bitsandbytes")]
    names += gpu_extra()
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *names], check=True)
    for wheel in folder.glob("bitsandbytes-*.whl"):
        _keep_libraries(wheel, ("cpu", "cuda130"))
    print(f"{folder}: " + ", ".join(f"{w.name} ({w.stat().st_size / 2**20:.1f} MiB)" for w in folder.glob("*.whl")))
    return 0


def gpu_extra() -> list[str]:
    """The requirements of pyproject.toml's `gpu` extra (liger-kernel), outside the CPU lock."""
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"])


def _keep_libraries(wheel: Path, keep: tuple[str, ...]) -> None:
    """Rewrite a bitsandbytes wheel without the native libraries of other CUDA/ROCm/XPU versions (and their
    RECORD lines): 43 MB -> a few, within what a device call can carry."""
    def wanted(name: str) -> bool:
        library = name.rsplit("/", 1)[-1]
        return not library.startswith("libbitsandbytes_") or library.removeprefix("libbitsandbytes_").split(".")[0] in keep

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if not wanted(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if wanted(line.split(",")[0])).encode()
            target.writestr(item, data)
    slim.replace(wheel)


# ----- training.on_oom shrink on a real out-of-memory: one check, run after the matrix ---------------------------
OOM_ROW = Row("qwen-0.5b", "lora", 1024, 0, False, options=(("on_oom", "shrink"),))  # its batch: oom_micro_batch
OOM_OVERSHOOT = 1.3  # the first micro-batch's estimated peak over the GPU's free memory: sure not to fit
OOM_STEPS, OOM_S, DRY_OOM_S = 2, 90.0, 15.0  # steps; seconds kept back from the matrix for it (GPU, dry run)
DRY_OOM_BATCH, DRY_OOM_FITS = 8, 2  # --dry-run: no real out-of-memory on CPU; one is raised above micro-batch 2


def oom_micro_batch(row: Row, free_bytes: float, tiny: bool) -> int:
    """The smallest power-of-two micro-batch whose instant estimate exceeds OOM_OVERSHOOT x the free memory."""
    from nbtune.estimator import estimate_memory

    micro = 1
    while micro < 2**14:
        sized = dataclasses.replace(row, batch=micro)
        if estimate_memory(tune_config(sized, SHAPES[row.shape], OOM_STEPS),
                           shape_config(row.shape, tiny)).total_bytes >= OOM_OVERSHOOT * free_bytes:
            break
        micro *= 2
    return micro


def injected_oom(fits: int) -> Any:
    """--dry-run's stand-in for the GPU: CUDA's out-of-memory error as a step begins above micro-batch `fits`."""
    import torch
    from transformers import TrainerCallback

    class InjectedOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if args.per_device_train_batch_size > fits:
                raise torch.OutOfMemoryError("CUDA out of memory (injected by gpu_check --dry-run)")

    return InjectedOutOfMemory()


def check_oom_shrink(ctx: dict[str, Any], seconds_left: float) -> list[str]:
    """Train OOM_ROW with a first micro-batch sized not to fit (the estimate at OOM_OVERSHOOT x the free memory)
    and training.on_oom shrink: it must finish, shrunk, all its steps done, and memory back to baseline after.
    The report's section, in words."""
    from nbtune import training
    from nbtune.events import EventStream

    lines = ["", "## training.on_oom shrink on a real out-of-memory", ""]
    cuda, tiny = ctx["cuda"], ctx["tiny"]
    needed = DRY_OOM_S if tiny else OOM_S
    if needed > seconds_left:
        return [*lines, f"- skipped: needs ~{needed:.0f} s, {max(seconds_left, 0):.0f} s of the budget left"]
    row = dry(OOM_ROW) if tiny else OOM_ROW
    if cuda:
        import torch

        _free(cuda)
        free = torch.cuda.mem_get_info()[0]
        row = dataclasses.replace(row, batch=oom_micro_batch(row, free, tiny))
        lines.append(f"- first micro-batch {row.batch}: estimated over {OOM_OVERSHOOT:g} x the {free / GIB:.0f} GiB "
                     "free")
    else:
        row = dataclasses.replace(row, batch=DRY_OOM_BATCH)
        lines.append(f"- dry run: micro-batch {row.batch}, the out-of-memory injected above {DRY_OOM_FITS}")
    folder, run_dir, started = ctx["work"] / row.shape, ctx["work"] / "oom-run", time.perf_counter()
    if not folder.exists():
        build_shape(row.shape, folder, tiny, cuda)
    baseline = _allocated(cuda)
    config = tune_config(row, str(folder), OOM_STEPS, text_rows(row, OOM_STEPS * row.batch))
    try:
        summary = training.execute(config, run_dir, EventStream(),
                                   extra_callbacks=[] if cuda else [injected_oom(DRY_OOM_FITS)])
    except Exception as error:  # noqa: BLE001 - the report says it
        _free(cuda)
        return [*lines, f"- FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    measured = peaks(cuda, baseline)
    texts = [r["text"] for r in summary.recoveries]
    back = measured.get("left_mib", 0.0) <= LEFT_OVER_MIB
    passed = summary.state == "finished" and bool(texts) and summary.step == OOM_STEPS and back
    lines += [f"- recovered: {text}" for text in texts]
    lines.append(f"- {'passed' if passed else 'FAILED'}: {summary.state} at step {summary.step} of {OOM_STEPS}, "
                 f"micro-batch {summary.micro_batch_size} x accumulation {summary.gradient_accumulation_steps}"
                 + (f", peak allocated {measured['allocated']:.1f} GiB" if cuda else "")
                 + f", {measured.get('left_mib', 0.0):.0f} MiB left after it, {time.perf_counter() - started:.0f} s")
    return lines


FSDP_ROW = Row("qwen-0.5b", "lora", 1024, 4, False)  # trained by one process under distributed.strategy fsdp
FSDP_STEPS, FSDP_S = 3, 150.0  # steps; seconds kept back from the matrix for it (the launch starts a process)


def check_fsdp(ctx: dict[str, Any], seconds_left: float) -> list[str]:
    """Train FSDP_ROW with distributed.strategy fsdp on one process the way `nbtune run CONFIG --launch --execute`
    does (accelerate launch, FSDP2), and put its measured peak beside the per-GPU estimate. --dry-run writes
    the config and the launch command only: accelerate shards GPU processes only. The report's section."""
    from nbtune import distributed_cli
    from nbtune.estimator import estimate_memory

    lines = ["", "## One process under FSDP (accelerate launch), beside the per-GPU estimate", ""]
    cuda, tiny, work = ctx["cuda"], ctx["tiny"], ctx["work"]
    if cuda and seconds_left < FSDP_S:
        return [*lines, f"- skipped: needs ~{FSDP_S:.0f} s, {max(seconds_left, 0):.0f} s of the budget left"]
    row = dry(FSDP_ROW) if tiny else FSDP_ROW
    folder, rows_path, store = work / row.shape, work / "fsdp-rows.jsonl", work / "fsdp-store"
    if not folder.exists():
        build_shape(row.shape, folder, tiny, cuda)
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in text_rows(row, FSDP_STEPS * row.batch + 2)))
    config = tune_config(row, str(folder), FSDP_STEPS).replace(**{  # a file: the launched process reads it
        "data.source": str(rows_path), "data.eval_split": 0.1, "distributed.strategy": "fsdp"})
    config_path = work / "fsdp.yaml"
    config_path.write_text(config.to_yaml())
    instant = estimate_memory(config, shape_config(row.shape, tiny))
    accelerate_path = distributed_cli.write_accelerate_config(config_path, config)
    lines += [f"- `{distributed_cli.launch_command(config_path, accelerate_path, config, str(store))}`",
              f"- per-GPU estimate: {instant.allocated_bytes / GIB:.2f} GiB allocated, "
              f"{instant.reserved_bytes / GIB:.2f} GiB reserved"]
    if not cuda:
        return [*lines, "- dry run: not launched (accelerate shards GPU processes only)"]
    _free(cuda)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nbtune", "run", str(config_path), "--launch", "--execute",
                           "--store", str(store)], capture_output=True, text=True, timeout=max(seconds_left, 30))
    summaries = sorted(store.glob("runs/*/summary.json"))
    if done.returncode or not summaries:
        return [*lines, f"- FAILED (exit {done.returncode}): {(done.stderr or done.stdout)[-600:]!r}"]
    summary = json.loads(summaries[-1].read_text())
    peak = summary.get("peak_memory", {})
    allocated, reserved = peak.get("peak_allocated", 0) / GIB, peak.get("peak_reserved", 0) / GIB
    error = f"{100 * (instant.allocated_bytes / GIB / allocated - 1):+.1f} %" if allocated else "n/a"
    return [*lines, f"- {summary.get('state')} at step {summary.get('step')} of {FSDP_STEPS}, "
                    f"{time.perf_counter() - started:.0f} s: measured {allocated:.2f} GiB allocated, {reserved:.2f} GiB "
                    f"reserved (rank 0); instant estimate error {error}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the markdown report (default bench/results/gpu-<date>.md)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole matrix")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, one step a row, no CUDA")
    parser.add_argument("--rows", help="comma-separated row numbers to run (default: all, in order)")
    parser.add_argument("--estimate-workers", type=int, default=2, help="processes for the simulated tier (0: none)")
    parser.add_argument("--prepare-wheels", metavar="FOLDER", help="download the device's wheels, then exit")
    args = parser.parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(Path(args.prepare_wheels))
    kept = (DRY_OOM_S if args.dry_run else OOM_S + FSDP_S)  # kept back from the matrix for the checks after it
    budget = Budget(args.budget_s - kept)
    import torch

    from nbtune.estimator.gpus import peak_tflops

    cuda = torch.cuda.is_available() and not args.dry_run
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu-{datetime.date.today():%Y-%m-%d}.md")
    report = Report(out, environment(cuda, args.budget_s, args.dry_run))
    chosen = {int(n) for n in args.rows.split(",")} if args.rows else None
    rows = [(i, dry(row) if args.dry_run else row) for i, row in enumerate(MATRIX, 1) if chosen is None or i in chosen]
    gpu_name = torch.cuda.get_device_name(0) if cuda else ""
    peak = peak_tflops("h200" if "H200" in gpu_name else "h100" if "H100" in gpu_name else "none")
    ctx = {"cuda": cuda, "tiny": args.dry_run, "steps": 1 if args.dry_run else STEPS,
           "peak_flops": peak * 1e12 if peak else None,
           "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work, _pool(args.estimate_workers) as pool:
        ctx["work"] = Path(work)
        simulated = {i: simulated_estimate(row, args.dry_run, pool) for i, row in rows}  # all submitted at once
        for i, row in rows:
            report.add(check_row(i, row, ctx, budget, simulated[i]))
        for line in check_oom_shrink(ctx, args.budget_s - FSDP_S - (time.perf_counter() - budget.started)):
            report.write(line)
        for line in check_fsdp(ctx, args.budget_s - (time.perf_counter() - budget.started)):
            report.write(line)
    for line in summary_lines(report.rows, time.perf_counter() - budget.started):
        report.write(line)
    print(f"wrote {out}")
    return 0


def _pool(workers: int) -> Any:
    """Processes that run the simulated tier beside the GPU work (spawned: the parent holds CUDA)."""
    import contextlib
    import multiprocessing

    if workers <= 0:
        return contextlib.nullcontext()
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _or_none(function: Any, *args: Any, **kwargs: Any) -> Any:
    """function(*args, **kwargs), or None when it fails (the simulated tier is a column, not a condition)."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        print(f"simulated estimate failed: {type(error).__name__}: {error}", flush=True)
        return None


if __name__ == "__main__":
    sys.exit(main())
