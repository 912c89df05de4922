"""Check both estimator tiers against published peak-memory measurements (bench/data/vram_calibration_points.csv).

Each row becomes a TuneConfig and a model config from the built-in catalogue. Rows whose setup nbtune does not
train that way get an explicit, printed treatment (FSDP sharding, paged or in-backward optimizers, activation
offload, chunked cross-entropy) or are excluded with the reason printed. Beside both tiers it reports what
accelerate's `estimate-memory` (weights only, and its "training with Adam" figure) and the folk rule
"4 × inference memory" give. Writes bench/results/calibration-<date>.md.

    python bench/calibration.py [--no-simulate] [--out bench/results/calibration-2026-11-23.md]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "vram_calibration_points.csv"
GB = 1e9
GIB = 2**30
V100_ERA_CONTEXT = 1343 * 2**20  # stated by the source for its nvidia-smi figures (CUDA 11, no lazy loading)
MISSES = ['',
    '## Reading the misses',
    '', "- Every torchtune row ran torch.compile, which fuses RMSNorm, RoPE and SwiGLU and keeps fewer tensors for the backward than eager transformers code; both tiers model eager transformers. This shows most where activations dominate: the 8B LoRA row without checkpointing is over-estimated by +66 % (instant) and +141 % (simulated; on fake CPU tensors the simulated attention keeps more than CUDA's flash kernel does at 2 × 2048 tokens).", '- The 70B LoRA FSDP row (26.4 GB per GPU at batch 4 × 4096 with checkpointing) is far below what the checkpointed layer inputs alone take (80 layers × 16384 tokens × 8192 × 2 bytes ≈ 21 GB) plus the 17 GB weight shard, so the per-GPU batch of that measurement was probably smaller than the table says; it stays in the summary as a miss.', "- QLoRA rows with 128k vocabularies keep +34 % to +52 % (instant): torchtune's NF4 and chunked output differ from bitsandbytes + transformers; the simulated tier, which runs the real loss code, is within 13 %.", '- BERT rows are under-estimated by 8–19 % (instant): transformers v4.2x BERT kept more per layer than the Korthikanti-style LayerNorm/GELU terms; the simulated tier (transformers 5 code) is within 16 %.']  # written after reading the results of 2026-11-23
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    """One calibration row turned into something nbtune can estimate."""

    row: int
    label: str
    measured: float  # bytes
    model: str | None = None
    method: dict[str, Any] = field(default_factory=dict)
    task: str = "causal-lm"
    dtype: str = "bf16"
    precision: str = "bf16"
    optimizer: str = "adamw"
    batch: int = 1
    seq: int = 512
    accumulation: int = 1
    ckpt: bool = False
    attn: str = "sdpa"
    kind: str = "reserved"  # what was measured: "nvidia-smi", "reserved" or "allocated"
    fused: bool = False
    shards: int = 1
    paged: bool = False
    optimizer_in_backward: bool = False
    offload: bool = False
    chunked_ce: bool = False
    torchtune_qlora: bool = False
    excluded: str = ""
    treatment: list[str] = field(default_factory=list)


def cases() -> list[Case]:
    rows = list(csv.DictReader(DATA.open()))
    out = []
    chunked_from_here = False  # the 'Optimization flags' table is cumulative
    previous: Case | None = None
    for i, r in enumerate(rows, start=1):
        c = Case(row=i, label=f"{r['model'].split(' ')[0]} · {r['method']} · {r['precision']} · b{r['batch']} · "
                 f"s{r['seq_len'].split(' ')[0]} · ckpt {r['grad_ckpt']} · {r['optimizer']}",
                 measured=float(r["peak_gb"]) * GB)
        notes, method, opt = r["notes"], r["method"].lower(), r["optimizer"].lower()
        c.batch = int(r["batch"])
        c.seq = int(r["seq_len"]) if r["seq_len"].isdigit() else 512
        if not r["seq_len"].isdigit():
            c.treatment.append("alpaca batches: the longest is taken as 512 tokens")
        c.ckpt = r["grad_ckpt"] == "on"
        if "bert-large" in r["model"]:
            c.model, c.task, c.dtype, c.attn, c.kind = "google-bert/bert-large-uncased", "seq-cls", "fp32", "eager", "nvidia-smi"
            c.precision = "fp16" if "fp16" in r["precision"] else "fp32"
            c.treatment.append("transformers v4.2x BERT: eager attention; nvidia-smi figure incl. the source's "
                               "stated 1343 MiB CUDA context")
            if "bs1 + ga" in notes.lower() or "ga4" in notes.lower():
                c.accumulation = 4
            c.optimizer = "adafactor" if "adafactor" in opt else "adamw-8bit" if "8-bit" in opt or "8bit" in opt else "adamw"
            c.method = {"name": "full"}
            c.fused = True
            c.treatment.append("v4.2x Trainer default optimizer adamw_hf: a per-parameter loop, no foreach "
                               "temporaries")
        else:
            c.model = r["model"].split(" ")[0]
            c.fused = True
            c.treatment.append("torchtune: fused AdamW (no foreach temporaries), torch counters (no CUDA context)")
            c.kind = "allocated" if "Peak Memory Active" in notes else "reserved"
            if "qlora" in method:
                c.method = {"name": "qlora", "r": 8, "alpha": 16, "target_modules": LORA_ALL}
                c.torchtune_qlora = True
                c.treatment.append("torchtune QLoRA keeps embeddings, norms and activations in bf16 (no "
                                   "prepare_model_for_kbit_training): LoRA terms on the bf16 base with the Linear "
                                   "weights at NF4 size")
            elif "lora" in method:
                if "r8 q,v" in method:
                    c.method = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
                elif "r64" in method:
                    c.method = {"name": "lora", "r": 64, "alpha": 128, "target_modules": [*LORA_ALL, "lm_head"]}
                else:
                    c.method = {"name": "lora", "r": 8, "alpha": 16,
                                "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
            else:
                c.method = {"name": "full"}
            if "8 gpus" in method or "fsdp" in method:
                c.shards = 8
                c.treatment.append("FSDP over 8 GPUs: parameters, gradients and optimizer state / 8, plus two "
                                   "unsharded layers being gathered; activations per GPU")
            if "paged" in opt:
                c.paged = True
                c.optimizer = "paged-adamw-8bit" if "8bit" in opt else "paged-adamw"
                c.treatment.append("paged optimizer state lives in unified memory, outside torch's counters: "
                                   "not counted")
            elif "8bit" in opt:
                c.optimizer = "adamw-8bit"
            if "optimizer_in_bwd" in opt or "in-backward" in opt or "fused-in-backward" in opt:
                c.optimizer_in_backward = True
                c.treatment.append("optimizer in backward: gradients are freed parameter by parameter, never all "
                                   "held; no separate optimizer step")
            if "act. offload" in notes or "act. offload" in opt:
                c.offload = True
                c.treatment.append("activation offload: checkpointed layer inputs live on the CPU")
            if "+compile +chunked cross-entropy" in notes:
                chunked_from_here = True
            memory_table = "'Memory and training speed'" in notes  # those recipes default to CEWithChunkedOutputLoss
            if memory_table or chunked_from_here or "chunked ce" in notes.lower():
                c.chunked_ce = True
                c.treatment.append("chunked cross-entropy: the fp32 upcast and log-softmax exist 1/8 at a time")
            if "same flags" in notes and previous is not None:  # "QLoRA same flags": the LoRA row's treatments
                c.offload, c.chunked_ce = previous.offload, previous.chunked_ce
                c.treatment += [x for x in previous.treatment if x not in c.treatment and "QLoRA" not in x]
            if r["grad_ckpt"] == "?":
                if "presumably without" in notes:
                    c.treatment.append("checkpointing '?': the source presumes off; estimated off")
                else:
                    c.excluded = "activation checkpointing unknown ('?') and the source does not say"
            if "at model init" in notes:
                c.excluded = ("the source's peak reserved is set while loading the model (9.13 GB at init, before "
                              "training), not by the training step")
            if "unpacked" in notes and "most samples short" in notes:
                c.excluded = "unpacked variable-length batches: the sequence length at the peak is unknown"
        out.append(c)
        previous = c
    return out


def to_config(c: Case) -> Any:
    from nbtune import TuneConfig

    return TuneConfig(
        model={"name_or_path": c.model, "task": c.task, "dtype": c.dtype, "attn_implementation": c.attn},
        method=c.method, data={"max_length": c.seq},
        training={"micro_batch_size": c.batch, "gradient_accumulation_steps": c.accumulation,
                  "precision": c.precision, "optimizer": c.optimizer, "gradient_checkpointing": c.ckpt})


def adjusted(c: Case, est: Any, config: Any, mc: Any) -> float:
    """The estimate of what the source measured, with the row's treatments applied."""
    from nbtune.estimator.estimate import CUDA_CONTEXT, FRAGMENTATION, WORKSPACE, terms
    from nbtune.estimator.skeleton import facts

    f = facts(config, mc)
    t = terms(config, f, fused_optimizer=c.fused)
    if c.torchtune_qlora:
        lora = to_config(dataclasses.replace(c, method={**c.method, "name": "lora"}))
        fl = facts(lora, mc)
        t = {**terms(lora, fl, fused_optimizer=c.fused), "qconst": t["qconst"]}
        q = f.quantized_params
        t["frozen"] += q // 2 - 2 * q
        t["activations"] += 2 * 2 * f.largest_linear_elems  # one dequantized weight, forward and backward
        f = fl
    state = 0 if c.paged else t["optimizer_state"]
    static = t["frozen"] + t["trainable"] + t["qconst"] + state
    grads = t["grads"]
    acts, logits = t["activations"], t["logits"]
    layers = max(len(f.layers), 1)
    if c.offload and t["checkpointing"]:
        acts -= 2 * f.dims["h"] * t["tokens"] * layers  # stored layer inputs (16-bit) moved to the CPU
    if c.chunked_ce:
        logits = int(t["tokens"] * f.dims["V"] * (2 + 10 / 8))
    if c.shards > 1:
        gathered = 2 * (t["frozen"] + t["trainable"]) // max(f.total_layers, 1)
        static = static // c.shards + gathered
        grads = grads // c.shards
    if c.optimizer_in_backward:
        peaks = {"forward end": static + acts + logits, "backward": static + 2 * f.largest_trainable_elems * 2}
    else:
        ga = grads if c.accumulation > 1 else 0
        peaks = {"forward end": static + ga + acts + logits, "backward": static + grads + acts // max(layers, 1) * 2,
                 "optimizer step": static + grads + (t["step_temp"] if not c.paged else 0)}
    phase = max(peaks, key=peaks.get)
    allocated = peaks[phase] + WORKSPACE
    dynamic = (acts + logits) if phase == "forward end" else grads
    if c.kind == "allocated":
        return allocated
    reserved = allocated + FRAGMENTATION * dynamic
    if c.kind == "reserved":
        return reserved
    return reserved + (V100_ERA_CONTEXT if "bert" in (c.model or "") else CUDA_CONTEXT)


def adjusted_simulated(c: Case, sim: Any, est: Any, est_adjusted: float) -> float:
    """The simulated peak with the same treatments: the instant tier's adjustment applied to the simulated total."""
    return est_adjusted + (sim.allocated_bytes - est.allocated_bytes) / c.shards


def baselines(c: Case, est: Any) -> tuple[float, float, float]:
    """accelerate weights-only, accelerate 'training with Adam' (largest single term), folk 4 × inference memory."""
    params = est.total_params
    size = 4 * params  # accelerate starts from the fp32 size
    weights = size if c.dtype == "fp32" else size / 2
    # fp32: step = 4 x fp32 size; mixed precision: the largest term, optimizer = 2 x fp32 size
    training = 4 * size if c.precision == "fp32" and c.dtype == "fp32" else max(size, size * 1.5, size * 2)
    inference = params * (2 if c.dtype != "fp32" else 4)
    if c.method.get("name") == "qlora":
        inference = params * 0.5
    return weights / c.shards, training / c.shards, 4 * inference / c.shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-simulate", action="store_true", help="instant tier only")
    parser.add_argument("--out", default=str(HERE / "results" / f"calibration-{datetime.date.today()}.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from nbtune.estimator import estimate_memory, simulate_memory
    from nbtune.estimator.catalogue import from_catalogue

    lines, errors = [], {"instant": [], "simulated": [], "accelerate": [], "accelerate-adam": [], "4x": []}
    excluded = []
    for c in cases():
        if c.excluded:
            excluded.append(c)
            print(f"row {c.row:2d} EXCLUDED: {c.label}: {c.excluded}")
            continue
        mc = from_catalogue(c.model)
        config = to_config(c)
        est = estimate_memory(config, mc)
        instant = adjusted(c, est, config, mc)
        simulated = None
        if not args.no_simulate:
            try:
                sim = simulate_memory(config, mc, steps=2, fused_optimizer=c.fused) if c.shards == 1 else None
                simulated = adjusted_simulated(c, sim, estimate_memory(config, mc, fused_optimizer=c.fused), instant) \
                    if sim is not None else None
            except Exception as error:  # noqa: BLE001
                print(f"row {c.row}: simulation failed: {type(error).__name__}: {error}")
        acc_w, acc_t, folk = baselines(c, est)

        def err(value: float | None, measured: float = c.measured) -> float | None:
            return None if value is None else 100 * (value / measured - 1)

        values = {"instant": err(instant), "simulated": err(simulated), "accelerate": err(acc_w),
                  "accelerate-adam": err(acc_t), "4x": err(folk)}
        for k, v in values.items():
            if v is not None:
                errors[k].append(v)

        def cell(v: float | None) -> str:
            return "–" if v is None else f"{v:+.0f} %"

        def gb(x: float | None) -> str:
            return "–" if x is None else f"{x / GB:.1f}"
        lines.append(f"| {c.row} | {c.label} | {c.kind} | {c.measured / GB:.2f} | {gb(instant)} ({cell(values['instant'])}) "
                     f"| {gb(simulated)} ({cell(values['simulated'])}) | {gb(acc_w)} ({cell(values['accelerate'])}) "
                     f"| {gb(acc_t)} ({cell(values['accelerate-adam'])}) | {gb(folk)} ({cell(values['4x'])}) "
                     f"| {'; '.join(c.treatment)} |")
        print(f"row {c.row:2d} measured {c.measured / GB:6.2f} GB  instant {instant / GB:6.2f} ({cell(values['instant'])})  "
              f"simulated {gb(simulated)} ({cell(values['simulated'])})  accelerate-adam {cell(values['accelerate-adam'])}  "
              f"4x {cell(values['4x'])}  {c.label}", flush=True)

    def summary(name: str) -> str:
        e = [abs(x) for x in errors[name]]
        if not e:
            return f"| {name} | – | – | 0 |"
        return f"| {name} | {statistics.median(e):.1f} % | {max(e):.1f} % | {len(e)} | {sum(x <= 25 for x in e)} |"

    summaries = [summary(k) for k in errors]
    for s in summaries:
        print(s)
    import torch
    import transformers

    text = [
        f"# Memory estimator calibration — {datetime.date.today()}",
        "",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, no GPU); torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Produced by `python bench/calibration.py`.",
        "",
        "Measured peaks are the published figures of bench/data/vram_calibration_points.csv (decimal GB). Each "
        "estimate is compared with the quantity the source measured: nvidia-smi (everything, CUDA context "
        "included), torch's peak reserved, or torch's peak allocated ('active').",
        "",
        "## Summary (absolute % error)",
        "",
        "| tier / baseline | median | worst | rows | rows within 25 % |",
        "| --- | --- | --- | --- | --- |",
        *summaries,
        "",
        "## Constants (the same for every row, physically motivated, not fitted per row)",
        "",
        "- CUDA context 600 MiB (torch 2.x, lazy module loading; nvidia-smi only). The BERT rows use the 1343 MiB the "
        "source itself states for its V100 / CUDA 11 setup.",
        "- Workspace 64 MiB (cuBLAS/cuDNN, inside torch's allocator).",
        "- Allocator fragmentation: reserved = allocated + 10 % of the memory that is allocated and freed every "
        "step (activations, logits, gradients).",
        "",
        "## Rows",
        "",
        "| row | config | measured as | measured GB | instant GB (err) | simulated GB (err) | accelerate weights | "
        "accelerate 'training with Adam' | 4 × inference | treatment |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *lines,
        "",
        "## Excluded rows",
        "",
        *[f"- row {c.row} ({c.label}, {c.measured / GB:.2f} GB): {c.excluded}" for c in excluded],
        "",
        "## Known differences between the sources' code and nbtune's",
        "",
        "- torchtune rows run torchtune's own Llama code (and torch.compile), not transformers'; nbtune estimates "
        "transformers + peft. torchtune's QLoRA keeps embeddings and norms in bf16, while nbtune's qlora (peft's "
        "prepare_model_for_kbit_training) upcasts them to fp32, which the estimate includes.",
        "- The simulated tier runs transformers' code on fake CPU tensors with the same treatments added on top; "
        "bitsandbytes kernels are not simulated (4-bit weights are 16-bit stand-ins counted at 4-bit size, "
        "8-bit/paged optimizers are states of bitsandbytes' sizes).",
        *MISSES,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
