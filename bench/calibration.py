"""Check both estimator tiers against published peak-memory measurements (bench/data/vram_calibration_points.csv).

Each row becomes a TuneConfig and a model config from the built-in catalogue. Rows whose setup nbtune does not
train that way get an explicit, printed treatment (paged or in-backward optimizers, activation offload, chunked
cross-entropy) or are excluded with the reason printed. Multi-GPU rows are configs with a `distributed` section
(FSDP over 8 processes): their per-GPU terms are the estimator's own (nbtune/estimator/sharding.py). Beside both
tiers it reports what accelerate's `estimate-memory` (weights only, and its "training with Adam" figure) and the
folk rule "4 × inference memory" give. Writes bench/results/calibration-<date>.md.

    python bench/calibration.py [--no-simulate] [--out bench/results/calibration-2026-12-02.md]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
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
MISSES = [
    "",
    "## Changes in this revision (against bench/results/calibration-2026-11-23.md, which lists the revision before: "
    "instant median 7.8 % → 8.2 %, worst +49 % → +49 %, 24/26 → 24/26 within 25 % (with the two rows below the "
    "physical bound kept: 8.0 % → 8.3 %, worst +136 % → +116 %, 24/28); simulated median 8.0 % → 8.0 %, worst "
    "+47 % → +47 %, 22/23 → 22/23 within 25 %; the multi-GPU rows are not simulated)",
    "",
    "- The multi-GPU rows are configs with `distributed.strategy: fsdp`, `distributed.processes: 8`, and their "
    "per-GPU terms are the estimator's (nbtune/estimator/sharding.py) instead of the bench's own (every whole-model "
    "term / 8 plus two average layers gathered). The estimator gathers FSDP's root unit (embeddings, final norm, "
    "head: held from the forward to the end of the backward) and two blocks, and in the backward holds a unit's "
    "whole gradients until they are reduce-scattered; these are allocated and freed every step, so they count "
    "towards fragmentation. Instant tier, the previous bench on today's estimator → this bench: row 17 (70B full) "
    "53.8 GB (−24 %) → 58.3 GB (−17 %): 4.5 GB gathered (was 3.5 GB) and 2.8 GB of whole gradients in flight; the "
    "row trains at precision fp32 on its bf16 weights (torchtune's pure bf16), because under bf16 mixed precision "
    "accelerate upcasts FSDP's trainable shards to fp32 (89.9 GB, +28 %, if it did). Row 23 (Llama-3.1-70B LoRA) "
    "29.7 GB (+0 %) → 34.6 GB (+17 %): with a 128k vocabulary the root unit alone is 4.2 GB (embeddings and untied "
    "head in bf16), 7.6 GB gathered in all. Row 24 (405B QLoRA) 56.2 GB (+17 %) → 65.6 GB (+36 %): root unit 8.4 GB "
    "plus two NF4 blocks, 11.6 GB gathered. Its quantization constants are still divided by the 8 GPUs, now as a "
    "printed torchtune treatment: torchao splits an NF4 tensor's scales with its data, where the estimator keeps "
    "bitsandbytes' quant_state whole on every GPU (6.4 GB here, which would put the row below its physical bound). "
    "Row 16 (excluded) has a bound of 38.9 GB, where it was 42.3 GB: the bound is the weight shard, optimizer state "
    "and stored block inputs, and no longer counts two gathered layers. The simulated tier still skips the "
    "multi-GPU rows (simulate_memory runs one process holding the whole model), and the baselines are still split "
    "evenly over the GPUs.",
    "- Rows that moved with the estimator since 2026-11-23 (the same on the previous bench, so not this change): "
    "under checkpointing the backward recomputes one block plus the MLP's gradient transients, where it counted two "
    "blocks (measured on CPU: bench/results/estimator-bias-2026-12-02.md), which lowers the checkpointed rows, most "
    "of all the long batches (row 17 −16 % → −24 % before the change above, row 29 −11 % → −16 %, row 18 "
    "+12 % → +9 %, row 20 +12 % → +9 %); torchtune QLoRA's dequantized weight is one 16-bit buffer in the backward "
    "(it was 4 bytes a weight at the forward end and in the backward): rows 13 (−12 % → −17 %), 22 (+19 % → +8 %), "
    "24 (+27 % → +17 % before the change above) and 31. The simulated tier moved with them (row 29 −15 % → −20 %, "
    "row 22 +19 % → +8 %).",
    "",
    "## Reading the misses",
    "",
    "- 8B LoRA without checkpointing (+49 % instant, +47 % simulated; checkpointing is '?' in the source and "
    "only presumed off): both tiers model eager transformers + peft under autocast, about 24h + 8I bytes per token "
    "per block (fp32 RMSNorm copies, a 16-bit autocast copy of the input for each LoRA module). torchtune runs bf16 "
    "adapters without autocast (q/v and gate/up share one saved input) and torch.compile fuses RMSNorm and SwiGLU, "
    "about 12h + 4kv + 4I to 6I, which is what the published figure implies. nbtune does not train that way, so "
    "this stays a miss rather than a per-row constant.",
    "- 405B QLoRA FSDP (+36 % instant): the peak is in the backward: 27.4 GB of shards, 11.6 GB gathered (8.4 GB of "
    "it the root's bf16 embeddings and head), 16.9 GB of stored block inputs and 6.1 GB for one recomputed block and "
    "a dequantized weight. torchtune's configs offer custom_sharded_layers ['tok_embeddings', 'output'] for large "
    "vocabularies (commented out in its 70B LoRA config; the README does not say what its run used); sharded as "
    "their own units they are gathered only while used, about 9 GB less here (near +17 %). accelerate's FSDP, which "
    "nbtune's distributed section names, keeps them in the root, so this stays a miss.",
    "- Llama-3.1-70B LoRA FSDP (+17 %): the same root unit, 4.2 GB at this size.",
    "- 70B full FSDP (−17 %): the paged optimizer's resident part is not counted (its state lives in unified "
    "memory), nor are FSDP's communication buffers beyond the gathered units and a unit's whole gradients.",
    "- 8B LoRA and QLoRA with checkpointing (+9 % / +8 %): one eager block recomputed at 4096 tokens is ~1 GB of "
    "the estimate; torchtune's compiled block is smaller.",
]  # written after reading the results of 2026-12-02
# torchtune's chunked cross-entropy under torch.compile: the 8 chunks of 16-bit logits are all computed before the
# loss and saved for its backward (2 bytes per logit); the compiled loss saves no fp32 log-softmax (its backward
# recomputes it from the 16-bit chunk and the per-row logsumexp) and writes each chunk's gradient in 16-bit,
# one chunk at a time (2/8)
CHUNKED_CE_BYTES = 2 + 2 / 8
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
    distributed: dict[str, Any] = field(default_factory=dict)  # the config's distributed section ({}: one GPU)
    paged: bool = False
    optimizer_in_backward: bool = False
    offload: bool = False
    chunked_ce: bool = False
    torchtune_qlora: bool = False
    grads_kept: bool = False
    bound: float = 0.0  # the physical lower bound of the stated setup (set by `adjusted`)
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
            c.grads_kept = True
            c.treatment.append("v4.2x Trainer on torch 1.x: model.zero_grad() zeroes gradients in place "
                               "(set_to_none=False), so they stay allocated through every forward")
        else:
            c.model = r["model"].split(" ")[0]
            c.fused = True
            c.treatment.append("torchtune: fused AdamW (no foreach temporaries), torch counters (no CUDA context)")
            c.kind = "allocated" if "Peak Memory Active" in notes else "reserved"
            llama3_table = "'Memory and training speed'" in notes or "'Optimization flags'" in notes
            if "unit GiB" in notes and f"{float(r['peak_gb']):g} GB" in notes:  # the table's figure, not converted
                c.measured = float(r["peak_gb"]) * GIB
                c.treatment.append(f"the table's unit is GiB (as for its other rows): {float(r['peak_gb']):g} GiB = "
                                   f"{c.measured / GB:.2f} GB")
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
            if llama3_table and "lora" in method:
                c.method["dropout"] = 0.0
                c.treatment.append("torchtune's Llama 3.x LoRA configs set lora_dropout: 0.0 (no dropout masks)")
            if "8 gpus" in method or "fsdp" in method:
                c.distributed = {"strategy": "fsdp", "processes": 8}
                c.treatment.append("FSDP over 8 GPUs: distributed.strategy fsdp, distributed.processes 8 (the "
                                   "estimator's per-GPU terms)")
                if c.method["name"] == "full":
                    c.precision = "fp32"
                    c.treatment.append("torchtune's FSDP recipe trains pure bf16 (no autocast, no fp32 copy of "
                                       "the weights): precision fp32 on the bf16 weights, so accelerate's fp32 "
                                       "upcast of FSDP's trainable shards does not apply")
                if c.torchtune_qlora:
                    c.treatment.append("torchao's NF4 weights are sharded with their scales (quantized_scalers and "
                                       "quantization_factor split with the data), where bitsandbytes keeps each "
                                       "quant_state whole on every GPU: the quantization constants are this GPU's "
                                       "shard")
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
                c.treatment.append("chunked cross-entropy, compiled: 16-bit logits of all chunks saved, no fp32 "
                                   "log-softmax kept, 16-bit gradient one chunk at a time (2 + 2/8 bytes per logit)")
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
                  "precision": c.precision, "optimizer": c.optimizer, "gradient_checkpointing": c.ckpt},
        distributed=c.distributed)


def adjusted(c: Case, est: Any, config: Any, mc: Any) -> float:
    """The estimate of what the source measured, with the row's treatments applied. Under a distributed strategy
    every term is one GPU's (`terms` divides the shards); what the strategy adds is the estimator's too."""
    from nbtune.estimator.estimate import CUDA_CONTEXT, FRAGMENTATION, WORKSPACE, terms
    from nbtune.estimator.skeleton import facts

    f = facts(config, mc)
    t = terms(config, f, fused_optimizer=c.fused)
    # the gathered units are the qlora config's: torchtune's FSDP gathers NF4 weights packed, as bitsandbytes'
    shard = t.shard
    constants = t.weights.constants
    frozen, acts, recompute = t.weights.frozen, t.activations.forward_end, t.activations.recompute
    if c.torchtune_qlora:
        lora = to_config(dataclasses.replace(c, method={**c.method, "name": "lora"}))
        fl = facts(lora, mc)
        t = terms(lora, fl, fused_optimizer=c.fused)
        q = f.quantized_params
        # torchao's NF4 linear dequantizes the whole weight to bf16 inside each matmul, forward and backward, one
        # at a time: a buffer in the backward beside the recomputed block, none left at the forward end (as for
        # bitsandbytes: estimate.activation_terms)
        dequant = 2 * f.largest_linear_elems
        frozen = t.weights.frozen + (q // 2 - 2 * q) // shard.weight_shards  # this GPU's shard of the Linear weights
        constants = -(-constants // shard.weight_shards)  # torchao shards the NF4 scales with the data
        acts, recompute = t.activations.forward_end, t.activations.recompute + dequant
        f = fl
    state = 0 if c.paged else t.optimizer.state
    static = frozen + t.weights.trainable + constants + state
    grads = t.optimizer.gradients
    logits = t.logits.logits
    stored_back = t.activations.stored_in_backward
    if c.offload and t.shape.checkpointing:  # stored block inputs moved to the CPU
        acts -= t.activations.stored
        stored_back = 0
    if c.chunked_ce:
        logits = int(t.shape.tokens * f.dims["V"] * CHUNKED_CE_BYTES)
    static += shard.buckets
    # parameters gathered whole in the forward and the backward; the backward's whole gradients of a unit waiting to
    # be reduce-scattered and its communication buckets
    forward_extra = shard.gathered
    backward_extra = shard.gathered + shard.gathered_gradients + shard.backward_buckets
    if c.grads_kept:  # zero_grad() zeroes in place: the gradients stay allocated through every forward
        static += grads
        grads = 0
    # What no implementation of the stated setup can go below: the weights and optimizer state, plus either every
    # gradient (all held at the optimizer step unless it runs inside the backward) or the stored block inputs
    # (all held when the backward starts)
    c.bound = static + max(0 if c.optimizer_in_backward else grads, stored_back)
    if c.optimizer_in_backward:
        peaks = {"forward end": static + acts + logits + forward_extra,
                 "backward": static + stored_back + recompute + 2 * f.largest_trainable_elems * f.trainable_elem_bytes
                 + backward_extra}
    else:
        ga = grads if c.accumulation > 1 else 0
        peaks = {"forward end": static + ga + acts + logits + forward_extra,
                 "backward": static + max(grads, stored_back) + recompute + backward_extra,
                 "optimizer step": static + grads + (t.optimizer.step_temp if not c.paged else 0) + shard.step_buffers}
    phase = max(peaks, key=peaks.get)
    allocated = peaks[phase] + WORKSPACE
    dynamic = {"forward end": acts + logits + forward_extra,
               "backward": max(grads, stored_back) + recompute + backward_extra}.get(phase, grads)
    if c.kind == "allocated":
        return allocated
    reserved = allocated + FRAGMENTATION * dynamic
    if c.kind == "reserved":
        return reserved
    return reserved + (V100_ERA_CONTEXT if "bert" in (c.model or "") else CUDA_CONTEXT)


def adjusted_simulated(c: Case, sim: Any, est: Any, est_adjusted: float) -> float:
    """The simulated peak with the same treatments: the instant tier's adjustment applied to the simulated total."""
    return est_adjusted + sim.allocated_bytes - est.allocated_bytes


def baselines(c: Case, est: Any) -> tuple[float, float, float]:
    """accelerate weights-only, accelerate 'training with Adam' (largest single term), folk 4 × inference memory.
    They are whole-model figures: a multi-GPU row's are split evenly over the estimate's processes."""
    params = est.total_params
    size = 4 * params  # accelerate starts from the fp32 size
    weights = size if c.dtype == "fp32" else size / 2
    # fp32: step = 4 x fp32 size; mixed precision: the largest term, optimizer = 2 x fp32 size
    training = 4 * size if c.precision == "fp32" and c.dtype == "fp32" else max(size, size * 1.5, size * 2)
    inference = params * (2 if c.dtype != "fp32" else 4)
    if c.method.get("name") == "qlora":
        inference = params * 0.5
    return weights / est.processes, training / est.processes, 4 * inference / est.processes


def cpu_model() -> str:
    """This machine's CPU as lscpu names it ("Model name"), or platform's word for it where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    return names[0] if names else platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as uptime prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-simulate", action="store_true", help="instant tier only")
    parser.add_argument("--out", default=str(HERE / "results" / f"calibration-{datetime.date.today()}.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = load_average()

    from nbtune.estimator import estimate_memory, simulate_memory
    from nbtune.estimator.catalogue import from_catalogue

    lines, errors = [], {"instant": [], "simulated": [], "accelerate": [], "accelerate-adam": [], "4x": []}
    excluded = []
    impossible: list[float] = []  # instant-tier errors of the rows excluded by the physical bound
    for c in cases():
        if c.excluded:
            excluded.append(c)
            print(f"row {c.row:2d} EXCLUDED: {c.label}: {c.excluded}")
            continue
        mc = from_catalogue(c.model)
        config = to_config(c)
        est = estimate_memory(config, mc)
        instant = adjusted(c, est, config, mc)
        if c.bound > c.measured:
            c.excluded = (f"physically impossible as stated: weights, optimizer state and the larger of all gradients "
                          f"or the stored block inputs already take {c.bound / GB:.1f} GB per GPU (instant estimate "
                          f"{instant / GB:.1f} GB)")
            excluded.append(c)
            impossible.append(100 * (instant / c.measured - 1))
            print(f"row {c.row:2d} EXCLUDED: {c.label}: {c.excluded}")
            continue
        simulated = None
        if not args.no_simulate:
            try:
                # torchtune QLoRA is treated as LoRA on the bf16 base with NF4-sized Linear weights in both tiers:
                # the simulated step is that LoRA step (peft's fp32-upcast QLoRA is not what torchtune runs)
                sim_config = to_config(dataclasses.replace(c, method={**c.method, "name": "lora"})) \
                    if c.torchtune_qlora else config
                # simulate_memory runs one process holding the whole model: not a GPU of a distributed run
                sim = simulate_memory(sim_config, mc, steps=2, fused_optimizer=c.fused) if not c.distributed else None
                simulated = adjusted_simulated(c, sim, estimate_memory(sim_config, mc, fused_optimizer=c.fused),
                                               instant) if sim is not None else None
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
            return f"| {name} | – | – | 0 | 0 |"
        return f"| {name} | {statistics.median(e):.1f} % | {max(e):.1f} % | {len(e)} | {sum(x <= 25 for x in e)} |"

    summaries = [summary(k) for k in errors]
    if impossible:
        errors["instant, incl. rows below the physical bound"] = errors["instant"] + impossible
        summaries.append(summary("instant, incl. rows below the physical bound"))
    for s in summaries:
        print(s)
    import torch
    import transformers

    text = [
        f"# Memory estimator calibration — {datetime.date.today()}",
        "",
        f"Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs: {cpu_model()}, no GPU; load "
        f"average {load_before} at the start, {load_average()} at the end); torch {torch.__version__}, "
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
        "transformers + peft under the Trainer's autocast. torchtune's QLoRA keeps embeddings and norms in bf16, "
        "while nbtune's qlora (peft's prepare_model_for_kbit_training) upcasts them to fp32: for those rows both "
        "tiers estimate LoRA on the bf16 base with the Linear weights at NF4 size.",
        "- The simulated tier runs transformers' code on fake CPU tensors, under autocast when bf16/fp16 is set, "
        "with CUDA-style dropout (1-byte masks), and the same treatments added on top (the instant tier's treatment "
        "plus the difference between the simulated and instant peaks of the same config); bitsandbytes kernels are "
        "not simulated (4-bit weights are 16-bit stand-ins counted at 4-bit size, 8-bit/paged optimizers are states "
        "of bitsandbytes' sizes). FSDP rows are not simulated.",
        *MISSES,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
