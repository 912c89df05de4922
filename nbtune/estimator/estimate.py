"""The instant tier: an analytical peak-memory estimate of one training step, fast enough for every widget change.

Parameter counts are exact (from the meta-device skeleton in `skeleton.py`); activations, logits and overheads
follow the terms in /work/shared/VRAM_MODEL.md, checked against real steps (tests/test_estimator.py), against
fake-tensor simulation (`simulate.py`) and against published measurements (bench/calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nbtune._lazy import import_heavy
from nbtune.config import TuneConfig
from nbtune.estimator.gpus import GIB, GPUS, gpu_bytes
from nbtune.estimator.skeleton import DTYPE_BYTES, Facts, facts
from nbtune.precision import for_plan

# Physically motivated constants (documented in bench/results/calibration-*.md):
CUDA_CONTEXT = 600 * 2**20  # CUDA context + kernels of torch 2.x with lazy module loading; outside torch's counters
WORKSPACE = 64 * 2**20  # cuBLAS/cuDNN workspaces, allocated through torch's caching allocator
FRAGMENTATION = 0.10  # reserved above allocated, as a share of memory that is allocated and freed every step

CATEGORIES = ("weights", "trainable_weights", "gradients", "optimizer_state", "activations", "logits_loss",
              "quantization_constants", "fixed_overhead")
LABELS = {"weights": "frozen weights", "trainable_weights": "trainable weights", "gradients": "gradients",
          "optimizer_state": "optimizer state", "activations": "activations & temporaries",
          "logits_loss": "logits & loss", "quantization_constants": "quantization constants",
          "fixed_overhead": "CUDA context, workspace, allocator"}
PHASES = ("forward end", "backward", "optimizer step")


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one training step of a config, with its parts, its GPU verdict and cheaper options."""

    total_bytes: int
    breakdown: dict[str, int]  # at the peak, summing to total_bytes
    peak_phase: str  # "forward end", "backward" or "optimizer step"
    phases: dict[str, int]  # total at each phase
    trainable_params: int
    total_params: int
    allocated_bytes: int  # what torch.cuda.max_memory_allocated would show
    reserved_bytes: int  # what torch.cuda.max_memory_reserved would show
    tier: str = "instant"
    gpu: str | None = None
    notes: list[str] = field(default_factory=list)
    config: TuneConfig | None = field(default=None, repr=False)
    model_config: Any = field(default=None, repr=False)
    _suggestions: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def fits(self, gpu: str | int | float | None = None) -> bool:
        """Whether the peak fits the GPU's memory (a catalogue name, "custom:<GB>", or bytes)."""
        gpu = gpu if gpu is not None else self.gpu
        if gpu is None:
            raise ValueError("gpu is required: a name like 'a100-40gb', 'custom:48' or a size in bytes")
        return self.total_bytes <= gpu_bytes(gpu)[1]

    def verdict_for(self, gpu: str | int | float) -> str:
        title, size = gpu_bytes(gpu)
        share = self.total_bytes / size
        used = f"{self.total_gib:.1f} of {size / GIB:.1f} GiB ({share:.0%})"
        if share > 1:
            return f"does not fit on {title}: needs {used}"
        if share > 0.9:
            return f"fits on {title}, tightly: {used}"
        return f"fits on {title}: {used}"

    @property
    def verdict(self) -> str:
        """For the chosen GPU; without one, the smallest catalogue GPU that fits."""
        if self.gpu is not None:
            return self.verdict_for(self.gpu)
        for name, _ in sorted(GPUS.items(), key=lambda kv: kv[1]["bytes"]):  # type: ignore[arg-type,return-value]
            if self.fits(name):
                return self.verdict_for(name)
        return f"does not fit on any single GPU of the catalogue (needs {self.total_gib:.1f} GiB)"

    def verdicts(self) -> dict[str, str]:
        """The verdict for every GPU of the catalogue."""
        return {name: self.verdict_for(name) for name in GPUS}

    @property
    def suggestions(self) -> list[dict[str, Any]]:
        """The cheapest config changes that make the step fit the GPU, each with its own re-estimated total.

        Each is {"title", "changes" (dotted fields, as `TuneConfig.replace` takes them), "total_bytes", "fits"}.
        Computed on first access (changes of method build a new skeleton).
        """
        if self._suggestions is None:
            self._suggestions = _suggest(self) if self.config is not None and self.gpu is not None else []
        return self._suggestions

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier, "total_bytes": self.total_bytes, "total_gib": round(self.total_gib, 3),
            "allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
            "breakdown": dict(self.breakdown), "peak_phase": self.peak_phase, "phases": dict(self.phases),
            "trainable_params": self.trainable_params, "total_params": self.total_params, "gpu": self.gpu,
            "verdict": self.verdict, "notes": list(self.notes), "suggestions": self.suggestions,
        }

    def table(self) -> str:
        """The breakdown as aligned text rows."""
        rows = [f"{LABELS.get(k, k):<34}{v / GIB:>9.2f} GiB" for k, v in self.breakdown.items() if v]
        rows.append(f"{'total (peak at ' + self.peak_phase + ')':<34}{self.total_gib:>9.2f} GiB")
        return "\n".join(rows)

    def __str__(self) -> str:
        share = self.trainable_params / self.total_params if self.total_params else 0
        lines = [f"Memory estimate ({self.tier}): {self.total_gib:.2f} GiB, peak at {self.peak_phase}",
                 f"trainable parameters {self.trainable_params:,} of {self.total_params:,} ({share:.3%})",
                 self.table(), self.verdict]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_memory(config: TuneConfig | None = None, model_config: Any = None, gpu: str | int | float | None = None,
                    *, device: str = "cuda", fused_optimizer: bool = False) -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step of `config` (the instant tier).

    `model_config` is a transformers PretrainedConfig; without it the config's model is read from a local
    folder, the built-in catalogue or the hub. `gpu` names the card to check ("a100-40gb", "custom:48").
    `device="cpu"` models CPU kernels (dropout masks stored as full tensors) for comparing with CPU steps;
    `fused_optimizer=True` models a fused AdamW (no foreach temporaries).
    """
    from nbtune.estimator.catalogue import model_config_for

    import_heavy()
    config = config or TuneConfig()
    if gpu is not None:
        gpu_bytes(gpu)  # fail early on an unknown name
    if model_config is None:
        model_config = model_config_for(config)
    config, plan_notes = for_plan(config, model_config, gpu)  # "auto" as on the chosen GPU
    f = facts(config, model_config)
    estimate = _estimate(config, model_config, f, gpu, device, fused_optimizer)
    estimate.notes[:0] = plan_notes
    return estimate


def terms(config: TuneConfig, f: Facts, device: str = "cuda", fused_optimizer: bool = False) -> dict[str, Any]:
    """Every term of the estimate in bytes (the parts the tests compare with a real step)."""
    t = config.training
    d = f.dims
    h, inter, a, vocab = d["h"], d["I"], d["a"], d["V"]
    # prepare_model_for_kbit_training upcasts embeddings and norms to fp32: the hidden states follow them
    wb = f.residual_bytes or DTYPE_BYTES[config.model.dtype]
    autocast = t.precision in ("fp16", "bf16") and wb == 4
    act = 2 if (wb == 2 or autocast) else 4  # bytes of a matmul output
    b = t.micro_batch_size
    seq = config.data.max_length + f.virtual_tokens
    kv_seq = seq + f.prefix_tokens
    tokens = b * seq
    checkpointing = t.gradient_checkpointing or f.forced_checkpointing
    notes: list[str] = []

    # ----- weights -----
    trainable = f.trainable_bytes
    frozen = f.weight_bytes - trainable
    q = f.quantized_params
    if f.quant_bits == 4:
        qweights = q // 2
        qconst = q // f.quant_block + (q // f.quant_block // 256) * 4 if f.quant_double else q // f.quant_block * 4
    elif f.quant_bits == 8:
        qweights, qconst = q, q // max(h, 1) * 4
    else:
        qweights = qconst = 0
    frozen += qweights + f.teacher_bytes

    # ----- gradients and optimizer -----
    grads = trainable
    n = f.trainable_params
    opt = t.optimizer
    eight_bit = opt in ("adamw-8bit", "paged-adamw-8bit")
    if opt == "adamw":
        state = 2 * trainable
        step_temp = 0 if fused_optimizer else trainable  # foreach AdamW keeps one intermediate per parameter
    elif opt == "paged-adamw":
        state, step_temp = 8 * n, 0  # bitsandbytes 32-bit states are fp32
    elif eight_bit:
        big = n - f.small_trainable_elems
        state, step_temp = 2 * big + 2 * 4 * (big // 256) + 8 * f.small_trainable_elems, 0
    elif opt == "sgd":
        state, step_temp = trainable, 0  # momentum buffer
    else:  # adafactor: factored second moment, fp32 update of one tensor at a time
        state, step_temp = f.adafactor_state_elems * f.trainable_elem_bytes, 3 * 4 * f.largest_trainable_elems
    if opt.startswith("paged"):
        notes.append("paged optimizer state lives in CUDA unified memory and can be evicted to CPU under pressure")

    # ----- activations saved for the backward, per token -----
    def layer_bytes(layer: Any) -> float:
        # bitsandbytes' 4-bit matmul is outside autocast: its outputs keep the hidden states' dtype
        # (attention itself is autocast: sdpa runs in 16-bit; the MLP's elementwise ops stay in wb)
        act_l = wb if layer.quantized else act
        per = layer_core(layer, act, act_l)
        for d_in, r, p, lbytes in layer.lora:
            la = 2 if t.precision in ("fp16", "bf16") else lbytes  # lora_A runs under autocast
            mask = (1 if device == "cuda" else lbytes) if p > 0 else 0
            per += d_in * (la + mask) + r * la
        for d_in, d_out in layer.added:  # the input of an added Linear, and its bottleneck activation
            per += act * (d_in + min(d_in, d_out))
        per += act * layer.vectors  # IA3-style scaling vectors save the tensor they scale
        if config.model.attn_implementation == "eager":  # fp32 softmax output, its 16-bit copy for the matmul
            per += a * kv_seq * (4 + (act_l if act_l < 4 else 0))
            if d.get("attn_dropout"):  # attention dropout: its mask and its output (BERT, GPT-2)
                per += a * kv_seq * (1 if device == "cuda" else 4) + a * kv_seq * 4
        return per

    def layer_core(layer: Any, act: int, act_mlp: int) -> float:
        if f.family == "gated":
            per = 8 * h + act * 3 * h + act_mlp * 3 * inter  # RMSNorm fp32 copies; attention q/k/v/out; SwiGLU
            if layer.full:
                per += act * (4 * h + inter) + (10 * h if autocast else 0)  # inputs of trainable Linear layers
            # bitsandbytes >= 0.45 4-bit matmuls save only the packed weight, not their input
        else:  # LayerNorm, GELU MLP, dropout masks (Korthikanti et al. 2022)
            per = act * (5 * h + inter) + 2 * h
            if layer.full:
                per += act * (3 * h + inter)
        return per

    per_layer = [layer_bytes(layer) * tokens + 2 * act * h * f.prefix_tokens * b for layer in f.layers]
    one_layer = int(max(per_layer) if per_layer else 0)
    if checkpointing and per_layer:
        # Only each block's input is kept through the forward; one block's activations exist again while it is
        # recomputed in the backward, after the loss has freed the logits: the two never coexist
        residual = 4 if (autocast or wb == 4) else wb
        stored = residual * h * tokens * len(per_layer)
        layer_acts = stored + one_layer  # everything the step ever saves (what the CPU measurement sees)
    else:
        stored = layer_acts = sum(per_layer)
    final = ((4 + act) * h + (act * h if f.head_trainable else 0)) * tokens if f.layers or f.head_trainable else 0
    copies = 0
    if autocast and f.layers:
        copies = act * f.autocast_copy_elems
        if checkpointing:
            copies = act * f.autocast_copy_elems // max(len(f.layers), 1)
    activations = int(stored + final + copies)  # at the end of the forward
    dequant = 2 * 2 * f.largest_linear_elems if f.quant_bits else 0  # one dequantized weight, forward and backward
    activations += dequant
    # In the backward, one block's activations (recomputed under checkpointing) and its gradient transients sit on
    # top of whichever is larger: the stored block inputs (all still held at the top block) or the gradients (all
    # held at the bottom block); the inputs are freed as the gradients grow, so the two are not added
    recompute = int(2 * one_layer + dequant)
    stored_in_backward = int(stored) if checkpointing else 0

    # ----- logits and loss: at the start of the backward the fp32 log-softmax output the loss saved, the
    # gradient of the loss and the log-softmax gradient coexist (12 bytes per logit; transformers upcasts the
    # logits to fp32 before the cross-entropy) -----
    if config.model.task == "seq-cls":
        logits = 0
    else:
        logits = int(tokens * vocab * 12)
        if f.teacher_bytes:  # the teacher's logits, upcast, and the softened distributions of both
            logits += int(tokens * vocab * (act + 4 + 8))
    head_grad = vocab * h * f.trainable_elem_bytes if f.head_trainable else 0

    persistent = frozen + trainable + qconst + state + WORKSPACE
    grads_in_forward = grads if t.gradient_accumulation_steps > 1 else 0
    phases_alloc = {
        "forward end": persistent + grads_in_forward + activations + logits + min(head_grad, grads),
        "backward": persistent + max(grads, stored_in_backward) + recompute,
        "optimizer step": persistent + grads + step_temp,
    }
    dynamic = {
        "forward end": grads_in_forward + activations + logits,
        "backward": max(grads, stored_in_backward) + recompute,
        "optimizer step": grads + step_temp,
    }
    parts = {
        "forward end": {"gradients": grads_in_forward + min(head_grad, grads), "activations": activations,
                        "logits_loss": logits},
        "backward": {"gradients": grads, "activations": max(stored_in_backward - grads, 0) + recompute,
                     "logits_loss": 0},
        "optimizer step": {"gradients": grads, "activations": step_temp, "logits_loss": 0},
    }
    return {"frozen": frozen, "trainable": trainable, "qweights": qweights, "qconst": qconst, "grads": grads,
            "optimizer_state": state, "step_temp": step_temp, "activations": activations, "recompute": recompute,
            "stored_in_backward": stored_in_backward, "stored_activations": int(stored), "one_layer": one_layer, "saved_activations":
            int(layer_acts + final + copies), "logits": logits, "phases": phases_alloc, "dynamic": dynamic,
            "parts": parts, "checkpointing": checkpointing, "notes": notes, "tokens": tokens}


def _estimate(config: TuneConfig, model_config: Any, f: Facts, gpu: Any, device: str,
              fused_optimizer: bool) -> MemoryEstimate:
    tm = terms(config, f, device, fused_optimizer)
    overhead = {p: int(FRAGMENTATION * tm["dynamic"][p]) + CUDA_CONTEXT for p in PHASES}
    totals = {p: int(tm["phases"][p] + overhead[p]) for p in PHASES}
    peak = max(PHASES, key=lambda p: totals[p])
    parts = tm["parts"][peak]
    breakdown = {
        "weights": tm["frozen"], "trainable_weights": tm["trainable"], "gradients": parts["gradients"],
        "optimizer_state": tm["optimizer_state"], "activations": parts["activations"],
        "logits_loss": parts["logits_loss"], "quantization_constants": tm["qconst"],
        "fixed_overhead": WORKSPACE + overhead[peak],
    }
    notes = list(tm["notes"])
    if tm["checkpointing"] and not config.training.gradient_checkpointing:
        notes.append("the method turns gradient checkpointing on by itself")
    if f.trainable_params == 0:
        notes.append(f"method {config.method.name} leaves no trainable parameters on this model")
    elif config.method.name == "bitfit" and f.family == "gated":
        notes.append("this architecture has almost no biases, so BitFit trains very little")
    allocated = int(tm["phases"][peak])
    return MemoryEstimate(
        total_bytes=sum(breakdown.values()), breakdown=breakdown, peak_phase=peak, phases=totals,
        trainable_params=f.trainable_params, total_params=f.total_params, allocated_bytes=allocated,
        reserved_bytes=allocated + int(FRAGMENTATION * tm["dynamic"][peak]),
        gpu=str(gpu) if gpu is not None else None, notes=notes, config=config, model_config=model_config)


def apply_changes(config: TuneConfig, changes: dict[str, Any]) -> TuneConfig:
    """The config with dotted-field changes; "method.name" switches the method and drops its old parameters."""
    changes = dict(changes)
    if "method.name" in changes:
        config = config.replace(method=changes.pop("method.name"))
    return config.replace(**changes) if changes else config


def _suggest(est: MemoryEstimate) -> list[dict[str, Any]]:
    from nbtune.methods import registry

    config, mc, gpu = est.config, est.model_config, est.gpu
    assert config is not None
    if est.fits(gpu):
        return []
    t = config.training
    options: list[tuple[str, dict[str, Any]]] = []
    mb, ga = t.micro_batch_size, t.gradient_accumulation_steps
    smaller = mb // 2
    while smaller >= 1:
        options.append((f"micro-batch {smaller} with {ga * mb // smaller} accumulation steps (same effective batch)",
                        {"training.micro_batch_size": smaller, "training.gradient_accumulation_steps": ga * mb // smaller}))
        smaller //= 2
    if not t.gradient_checkpointing:
        options.append(("gradient checkpointing (about 30 % slower steps)", {"training.gradient_checkpointing": True}))
    if t.optimizer in ("adamw", "paged-adamw"):
        options.append(("8-bit AdamW (bitsandbytes)", {"training.optimizer": "adamw-8bit"}))
        options.append(("paged 8-bit AdamW", {"training.optimizer": "paged-adamw-8bit"}))
    if config.model.dtype == "fp32" and t.precision in ("bf16", "fp16"):
        options.append((f"load the weights in {t.precision}", {"model.dtype": t.precision}))
    for name in ("lora", "qlora"):
        if config.method.name not in (name, "qlora") and registry.find(name) is not None:
            options.append((f"switch the method to {name}", {"method.name": name}))
    length = config.data.max_length // 2
    while length >= 128:
        options.append((f"shorter sequences: max_length {length}", {"data.max_length": length}))
        length //= 2
    if not t.gradient_checkpointing and mb > 1:
        options.append(("gradient checkpointing and micro-batch 1",
                        {"training.gradient_checkpointing": True, "training.micro_batch_size": 1,
                         "training.gradient_accumulation_steps": ga * mb}))
    out = []
    for title, changes in options:
        try:
            changed = apply_changes(config, changes)
            total = estimate_memory(changed, mc).total_bytes
        except Exception:  # noqa: BLE001 - a change this model cannot take is simply not suggested
            continue
        out.append({"title": title, "changes": changes, "total_bytes": total,
                    "fits": total <= gpu_bytes(gpu)[1]})
    fitting, kinds = [], set()
    for s in out:  # per kind of change, only the mildest one that fits (largest batch, longest sequences)
        kind = tuple(sorted(s["changes"]))
        if s["fits"] and kind not in kinds:
            kinds.add(kind)
            fitting.append(s)
    # Cheapest first: the order above runs from "same result, a little slower" to "different training".
    return fitting[:5] if fitting else sorted(out, key=lambda s: s["total_bytes"])[:3]

