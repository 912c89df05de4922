"""The instant tier: an analytical peak-memory estimate of one training step, fast enough for every widget change.

Parameter counts are exact (from the meta-device skeleton in `skeleton.py`); activations, logits and overheads
follow the terms in /work/shared/VRAM_MODEL.md, checked against real steps (tests/test_estimator.py), against
fake-tensor simulation (`simulate.py`) and against published measurements (bench/calibration.py). `terms`
composes one small record per category (weights, gradients and optimizer, activations, logits) into the memory
held at each phase of the step; `estimate_memory` adds the fixed overheads and picks the peak. The stage's
entry in `nbtune/stages.py` adds its terms: sequences per example (DPO's pairs), TRL's fused head, a reference
copy of the base, and a generation phase (KV cache) for a stage that samples completions. Image-to-text models
(a vision encoder and a text decoder with cross-attention) have their blocks' terms in `vision_text.py`;
text-to-image models (a Stable Diffusion UNet over VAE latents) theirs in `unet.py`, with an "encoding" phase
first (the frozen VAE and text encoder under no_grad).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from nbtune import distributed, losses, packed_attention, stages
from nbtune._lazy import import_heavy
from nbtune.config import TuneConfig
from nbtune.dtypes import BYTES
from nbtune.estimator import sharding
from nbtune.estimator.gpus import GIB, GPUS, gpu_bytes
from nbtune.estimator.skeleton import DIFFUSION, VISION_TEXT, Facts, LayerFacts, facts
from nbtune.methods import registry
from nbtune.optimizers import OPTIMIZERS
from nbtune.precision import for_plan
from nbtune.tasks import TASKS

# Physically motivated constants (documented in bench/results/calibration-*.md):
CUDA_CONTEXT = 600 * 2**20  # CUDA context + kernels of torch 2.x with lazy module loading; outside torch's counters
WORKSPACE = 64 * 2**20  # cuBLAS/cuDNN workspaces, allocated through torch's caching allocator
FRAGMENTATION = 0.10  # reserved above allocated, as a share of memory that is allocated and freed every step

# "activations" scale with batch × sequence (and checkpointing); "optimizer_step" is what the optimizer step
# allocates for a moment (foreach AdamW's intermediates, Adafactor's update), the same whatever the batch;
# "reference_model" is a stage's frozen copy of the base; "generation" what sampling completions holds;
# "gathered_weights" and "communication" are a distributed strategy's (sharding.py)
CATEGORIES = ("weights", "trainable_weights", "gathered_weights", "gradients", "communication", "optimizer_state",
              "optimizer_step", "activations", "logits_loss", "quantization_constants", "reference_model",
              "generation", "fixed_overhead")
LABELS = {"weights": "frozen weights", "trainable_weights": "trainable weights",
          "gathered_weights": "weights gathered from other GPUs", "gradients": "gradients",
          "communication": "gradient communication buffers",
          "optimizer_state": "optimizer state", "optimizer_step": "optimizer-step buffer",
          "activations": "activations & temporaries",
          "logits_loss": "logits & loss", "quantization_constants": "quantization constants",
          "reference_model": "reference model", "generation": "generation (KV cache)",
          "fixed_overhead": "CUDA context, workspace, allocator"}
# and first "generation" for a stage that generates, "encoding" for a text-to-image model (its frozen encoders)
PHASES = ("forward end", "backward", "optimizer step")
# TRL's fused LM head scores tokens in one buffer of (at most this many tokens) × this many vocabulary entries,
# whatever the vocabulary's size (trl/kernels/chunked_logprob.py)
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB = 4096, 32768


@dataclass(frozen=True)
class Suggestion:
    """A config change (one, or a few together) that lowers the peak memory, with the peak it would have and
    what it costs."""

    description: str  # what to change, in words: "gradient checkpointing + switch the method to qlora"
    changes: dict[str, Any]  # dotted fields, as `TuneConfig.replace` takes them
    total_bytes: int | None = None  # the re-estimated peak; None when it could not be estimated
    fits: bool | None = None  # whether that peak fits the GPU; None when no GPU was named
    cost: str = ""  # what it costs in speed or quality: "about 30 % slower steps" ("" in older run summaries)
    rank: float = 0.0  # lower is cheaper; a combination's is the sum of its parts' (see COSTS)

    def to_dict(self) -> dict[str, Any]:
        """As a run summary and `--json` write it."""
        return {**dataclasses.asdict(self), "changes": dict(self.changes)}


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
    processes: int = 1  # processes (GPUs) of the run: the breakdown is one GPU's (distributed.*)
    cpu_bytes: int = 0  # CPU memory one process's offloaded shards take (distributed.cpu_offload)
    cpu_breakdown: dict[str, int] = field(default_factory=dict)  # those bytes by category
    config: TuneConfig | None = field(default=None, repr=False)
    model_config: Any = field(default=None, repr=False)
    _suggestions: list[Suggestion] | None = field(default=None, repr=False)
    _tried: list[Suggestion] | None = field(default=None, repr=False)  # every change tried, re-estimated once

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
        if self.processes > 1:  # the figure is one GPU's of several
            title, used = f"{self.processes} × {title}", f"{used} per GPU"
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

    @property
    def suggestions(self) -> list[Suggestion]:
        """Config changes, single or combined, that lower the peak: those that fit the GPU first, cheapest
        first (by `rank`), then those that do not, smallest peak first; each with its re-estimated total.

        Computed on first access (changes of method build a new skeleton); empty when the step fits already,
        and without a config and a GPU.
        """
        if self._suggestions is None:
            wanted = self.config is not None and self.gpu is not None and not self.fits()
            self._suggestions = _ordered(self._candidates(), gpu_bytes(self.gpu)[1]) if wanted else []
        return self._suggestions

    def fit(self, margin: float = 0.1) -> Suggestion | None:
        """The cheapest suggestion whose peak uses at most (1 - margin) of the GPU's memory.

        None when this config already leaves that margin free, or when no change tried gets there.
        """
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be at least 0 and below 1 (got {margin})")
        if self.gpu is None or self.config is None:
            raise ValueError("fit needs an estimate of a config on a gpu: estimate_memory(config, gpu='t4')")
        limit = int((1 - margin) * gpu_bytes(self.gpu)[1])
        if self.total_bytes <= limit:
            return None
        best = _ordered(self._candidates(), limit)
        return best[0] if best and (best[0].total_bytes or 0) <= limit else None

    def _candidates(self) -> list[Suggestion]:
        """Every change the suggestions are chosen from, re-estimated (once per estimate)."""
        if self._tried is None:
            self._tried = _tried(self)
        return self._tried

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier, "total_bytes": self.total_bytes, "total_gib": round(self.total_gib, 3),
            "allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
            "breakdown": dict(self.breakdown), "peak_phase": self.peak_phase, "phases": dict(self.phases),
            "trainable_params": self.trainable_params, "total_params": self.total_params, "gpu": self.gpu,
            "processes": self.processes, "cpu_bytes": self.cpu_bytes, "cpu_breakdown": dict(self.cpu_breakdown),
            "verdict": self.verdict, "notes": list(self.notes),
            "suggestions": [s.to_dict() for s in self.suggestions],
        }

    def table(self) -> str:
        """The breakdown as aligned text rows."""
        rows = [f"{LABELS.get(k, k):<34}{v / GIB:>9.2f} GiB" for k, v in self.breakdown.items() if v]
        per_gpu = " per GPU" if self.processes > 1 else ""
        rows.append(f"{'total (peak at ' + self.peak_phase + ')':<34}{self.total_gib:>9.2f} GiB{per_gpu}")
        if self.cpu_bytes:
            rows.append(f"{'CPU memory (offloaded)':<34}{self.cpu_bytes / GIB:>9.2f} GiB {self.cpu_words()}")
        return "\n".join(rows)

    def cpu_words(self) -> str:
        """What the CPU figure holds, in words: "(optimizer state, gradients; per process)"."""
        parts = ", ".join(LABELS.get(k, k) for k, v in self.cpu_breakdown.items() if v)
        return f"({parts}; per process)" if parts else ""

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
    import_heavy()
    config, model_config, f, plan_notes = plan(config, model_config, gpu)
    estimate = _estimate(config, model_config, f, gpu, device, fused_optimizer)
    estimate.notes[:0] = plan_notes
    if config.training.compile:  # fusion saves fewer intermediates, by an amount not modelled from first principles
        estimate.notes.append("training.compile is estimated as eager (measured on GPU by bench/gpu_check.py)")
    return estimate


def plan(config: TuneConfig | None, model_config: Any, gpu: str | int | float | None,
         ) -> tuple[TuneConfig, Any, Facts, list[str]]:
    """What both tiers start from: the config with "auto" resolved as on the planned GPU, its model config (read
    when not given), the skeleton's facts, and notes on what "auto" became."""
    from nbtune.estimator.catalogue import model_config_for

    config = config or TuneConfig()
    if gpu is not None:
        gpu_bytes(gpu)  # fail early on an unknown name
    if model_config is None:
        model_config = model_config_for(config)
    config, notes = for_plan(config, model_config, gpu)
    return config, model_config, facts(config, model_config), list(notes)


# ----- the terms of one step, one category at a time ---------------------------------------------------------

@dataclass(frozen=True)
class StepShape:
    """How many tokens one micro-batch holds and in which element sizes its tensors live."""

    hidden_bytes: int  # element size of the hidden states (the residual stream)
    autocast: bool  # 16-bit mixed precision over fp32 weights
    matmul_bytes: int  # element size of a matmul output
    batch: int  # sequences per micro-batch (DPO: two per pair)
    tokens: int  # batch × (sequence + virtual tokens)
    kv_length: int  # keys/values per sequence (prefix tuning lengthens them, not the sequence)
    checkpointing: bool  # asked for, or turned on by the method


@dataclass(frozen=True)
class WeightTerms:
    """Bytes of the weights, held through the whole step."""

    frozen: int  # frozen weights, quantized ones at their packed size, and a distillation teacher
    trainable: int
    quantized: int  # the packed 4- or 8-bit weights (part of `frozen`)
    constants: int  # quantization constants
    reference: int = 0  # a stage's frozen reference copy of the base (no gradients, no optimizer state)


@dataclass(frozen=True)
class OptimizerTerms:
    """Bytes of the gradients and the optimizer."""

    gradients: int
    state: int  # held through the whole step
    step_temp: int  # transients of the optimizer step
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ActivationTerms:
    """Bytes the forward saves for the backward, and what the backward adds on top."""

    forward_end: int  # everything saved, at the end of the forward
    recompute: int  # in the backward: one block's activations (recomputed under checkpointing) and transients
    stored_in_backward: int  # under checkpointing, the block inputs still held when the backward starts
    stored: int  # the saved block activations (only the block inputs under checkpointing)
    one_layer: int  # the largest block's activations
    saved: int  # everything the step ever saves (what a CPU measurement of saved tensors sees)


@dataclass(frozen=True)
class LogitTerms:
    """Bytes of the logits and the loss at the start of the backward."""

    logits: int
    head_gradient: int  # the output head's gradient, already there at the forward end when the head trains
    backward: int = 0  # what the head's backward holds (TRL's fused head: a tile and an fp32 hidden gradient)
    reference_forward: int = 0  # a reference's no-grad forward after the model's own: one block in flight


@dataclass(frozen=True)
class Phase:
    """Memory torch allocates at one phase of the step, and the parts of it a breakdown names."""

    allocated: int
    dynamic: int  # what is allocated and freed every step (fragmentation scales with it)
    gradients: int
    activations: int
    logits_loss: int
    optimizer_step: int = 0  # the optimizer step's transients (only at the optimizer step)
    generation: int = 0  # the KV cache and sampling logits (only while generating)
    gathered_weights: int = 0  # a sharded strategy's parameters gathered whole (forward and backward)
    communication: int = 0  # a distributed strategy's buckets and gradients in flight


@dataclass(frozen=True)
class StepTerms:
    """Every term of the estimate in bytes (the parts the tests compare with a real step)."""

    shape: StepShape
    weights: WeightTerms
    optimizer: OptimizerTerms
    activations: ActivationTerms
    logits: LogitTerms
    generation: GenerationTerms
    phases: dict[str, Phase]
    shard: sharding.ShardTerms = sharding.ShardTerms()  # what the distributed strategy adds (none: nothing)


@dataclass(frozen=True)
class GenerationTerms:
    """Bytes sampling completions holds (a stage that generates), before the step's forward: no activations."""

    completions: int  # sequences generated at once (TRL's generation batch)
    kv_cache: int  # keys and values of every block for prompt + completion tokens
    logits: int  # the last position's logits, their fp32 copy and the sampling probabilities
    prefill: int  # one block's tensors in flight while the prompts are read

    @property
    def total(self) -> int:
        return self.kv_cache + self.logits + self.prefill


def terms(config: TuneConfig, f: Facts, device: str = "cuda", fused_optimizer: bool = False) -> StepTerms:
    """Every term of one training step of `config` on the model described by `f`, and the phases they make: one
    process's (one GPU's) under a distributed strategy (`sharding.py`), whose micro-batch is its own."""
    shape = step_shape(config, f)
    held = sharding.held_facts(config, f)
    weights = weight_terms(config, held)
    optimizer = optimizer_terms(config, sharding.optimizer_facts(config, held), fused_optimizer)
    weights, optimizer, shard = sharding.per_process(config, f, held, weights, optimizer)
    activations = activation_terms(config, f, shape, device)
    logits = logit_terms(config, f, shape)
    generation = generation_terms(config, f, shape)
    phases = phase_terms(config, weights, optimizer, activations, logits, generation, shard)
    if f.family == DIFFUSION:
        phases = encoding_phase(config, f, shape, device, phases, optimizer, shard) | phases
    return StepTerms(shape, weights, optimizer, activations, logits, generation, phases, shard)


def encoding_phase(config: TuneConfig, f: Facts, shape: StepShape, device: str, phases: dict[str, Phase],
                   optimizer: OptimizerTerms, shard: sharding.ShardTerms) -> dict[str, Phase]:
    """A text-to-image step's first moment: the frozen VAE encoder (and text encoder) under no_grad, before the
    UNet saves anything, beside the weights, the optimizer state and accumulated gradients."""
    from nbtune.estimator import unet

    forward = phases["forward end"]
    persistent = forward.allocated - forward.dynamic
    grads = optimizer.gradients if config.training.gradient_accumulation_steps > 1 else 0
    transient = unet.encoder_transient(config, f, shape, device)
    return {"encoding": Phase(persistent + grads + transient + shard.gathered, grads + transient + shard.gathered,
                              grads, transient, 0, gathered_weights=shard.gathered, communication=shard.buckets)}


def sequences_per_micro_batch(config: TuneConfig) -> int:
    """Sequences one forward of the stage runs per micro-batch: the examples, times two for DPO's pairs (TRL
    concatenates chosen and rejected in one forward). A generating stage's micro-batch counts completions."""
    return config.training.micro_batch_size * stages.for_config(config).sequences_per_example


def sequence_tokens(config: TuneConfig) -> int:
    """Tokens of one sequence: data.max_length, plus max_completion_length for a stage that generates (its
    prompts are taken to be at most data.max_length tokens)."""
    generates = stages.for_config(config).generates
    return config.data.max_length + (config.training.max_completion_length if generates else 0)


def packs(config: TuneConfig) -> bool:
    """Whether a step packs its examples (`training.packing`, read by the stage): a worst-case micro-batch, every
    example data.max_length tokens long, then fills its rows with no padding, so its tokens are unchanged (in
    one row where attention runs per example, nbtune/packed_attention.py PACKED)."""
    return packed_attention.packs(config)


def step_shape(config: TuneConfig, f: Facts) -> StepShape:
    """Tokens and element sizes of one micro-batch."""
    t = config.training
    # prepare_model_for_kbit_training upcasts embeddings and norms to fp32: the hidden states follow them
    hidden = f.residual_bytes or BYTES[config.model.dtype]
    autocast = t.precision in ("fp16", "bf16") and hidden == 4
    # an image's tokens are its patches and class token; an image-to-text model's decoder reads the caption
    # (its encoder's image tokens are vision_text.encoder_tokens)
    task = TASKS[config.model.task]
    seq = f.dims.get("image_tokens") if task.inputs == "image" and not task.captions else None
    seq = caption_tokens(config, f) if task.captions else seq
    seq, batch = (seq or sequence_tokens(config)) + f.virtual_tokens, sequences_per_micro_batch(config)
    kv_length = seq + f.prefix_tokens
    if f.family == DIFFUSION:  # a UNet's "tokens" are its latent positions; its cross-attention reads the prompt
        seq, kv_length = f.dims["latent"] ** 2, f.dims["text_tokens"]
    checkpointing = (t.gradient_checkpointing and checkpoints(config.model.task)) or f.forced_checkpointing
    return StepShape(hidden_bytes=hidden, autocast=autocast, matmul_bytes=2 if (hidden == 2 or autocast) else 4,
                     batch=batch, tokens=batch * seq, kv_length=kv_length, checkpointing=checkpointing)


def checkpoints(task: str) -> bool:
    """Whether the estimate applies training.gradient_checkpointing to the task's model: not to a text-to-image
    model, whose UNet's checkpointed terms are not modelled (and which cannot be checkpointed yet:
    `diffusion_checkpoints`)."""
    return not TASKS[task].draws


def diffusion_checkpoints() -> bool:
    """Whether the Trainer can turn checkpointing on for a DiffusionModel: it calls the model's
    activation_checkpointing_enable (or gradient_checkpointing_enable), which nbtune/diffusion.py does not define
    yet, so train() fails with AttributeError (measured, transformers 5.24)."""
    from nbtune import diffusion

    return any(hasattr(diffusion.DiffusionModel, n) for n in ("activation_checkpointing_enable",
                                                              "gradient_checkpointing_enable"))


def caption_tokens(config: TuneConfig, f: Facts) -> int:
    """Tokens of an image-to-text model's caption, the decoder's sequence: data.max_length (nbtune/captions.py
    cuts captions there), or the decoder's position limit where that is shorter (no longer caption can run)."""
    positions = f.dims.get("positions") or config.data.max_length
    return min(config.data.max_length, positions)


def weight_terms(config: TuneConfig, f: Facts) -> WeightTerms:
    """Frozen, trainable and quantized weights with their quantization constants, and the stage's reference
    copy of the base when it holds one (TRL's choice: none for PEFT methods, which disable the adapter)."""
    packed, constants = quantized_bytes(f)
    trainable = f.trainable_bytes
    frozen = f.weight_bytes - trainable + packed + f.teacher_bytes
    holds_copy = stages.for_config(config).uses_reference(config)
    return WeightTerms(frozen=frozen, trainable=trainable, quantized=packed, constants=constants,
                       reference=f.reference_copy_bytes if holds_copy else 0)


def quantized_bytes(f: Facts) -> tuple[int, int]:
    """(packed weights, quantization constants) of the weights bitsandbytes quantizes: 4-bit weight by weight,
    LLM.int8 one byte a weight and an fp32 scale per row."""
    q = f.quantized_params
    if f.quant_bits == 4:
        parts = [four_bit_bytes(n, f.quant_double, f.quant_block) for n in f.quantized_tensor_elems or (q,)]
        return sum(p for p, _ in parts), sum(c for _, c in parts)
    if f.quant_bits == 8:
        return q, q // max(f.dims["h"], 1) * 4
    return 0, 0


def four_bit_bytes(elems: int, double_quant: bool, block: int = 64) -> tuple[int, int]:
    """(packed weight, quantization state) bytes bitsandbytes keeps for one 4-bit weight of `elems` elements
    (functional.quantize_4bit; Params4bit): two weights a byte, and per block of `block` weights an fp32 absmax,
    or with double quantization a uint8 absmax plus an fp32 one per 256 of those (state2, blocksize 256) and the
    fp32 offset; and the code tables each weight holds (16 fp32 NF4/FP4 values; 256 for the nested code)."""
    blocks = math.ceil(elems / block)
    if double_quant:
        return (elems + 1) // 2, blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4
    return (elems + 1) // 2, 4 * blocks + 16 * 4


def optimizer_terms(config: TuneConfig, f: Facts, fused: bool) -> OptimizerTerms:
    """Gradients, the optimizer's state and its step's transients, from what the optimizer keeps per parameter."""
    optimizer = OPTIMIZERS[config.training.optimizer]
    # a parameter that never gets a gradient (a vision encoder-decoder's pooler) has no optimizer state either
    trainable = f.trainable_bytes - f.gradless_elems * f.trainable_elem_bytes
    n = f.trainable_params - f.gradless_elems
    if optimizer.eight_bit:  # blockwise 8-bit moments; small tensors keep 32-bit states
        big = n - f.small_trainable_elems
        state, step_temp = 2 * big + 2 * 4 * (big // 256) + 8 * f.small_trainable_elems, 0
    elif optimizer.bitsandbytes_class:
        state, step_temp = 8 * n, 0  # bitsandbytes 32-bit states are fp32
    elif optimizer.state == "adam":
        state = 2 * trainable
        step_temp = 0 if fused else trainable  # foreach AdamW keeps one intermediate per parameter
    elif optimizer.state == "momentum":
        state, step_temp = trainable, 0
    else:  # factored (Adafactor): factored second moment, fp32 update of one tensor at a time
        state, step_temp = f.adafactor_state_elems * f.trainable_elem_bytes, 3 * 4 * f.largest_trainable_elems
    notes = ("paged optimizer state lives in CUDA unified memory and can be evicted to CPU under pressure",) \
        if optimizer.paged else ()
    return OptimizerTerms(gradients=trainable, state=state, step_temp=step_temp, notes=notes)


def activation_terms(config: TuneConfig, f: Facts, shape: StepShape, device: str) -> ActivationTerms:
    """What the blocks save for the backward, with and without checkpointing."""
    if f.family == DIFFUSION:
        from nbtune.estimator import unet

        return unet.activation_terms(config, f, shape, device)
    h, act = f.dims["h"], shape.matmul_bytes
    per_layer = _per_layer(config, f, shape, device)
    one_layer = int(max(per_layer) if per_layer else 0)
    if shape.checkpointing and per_layer:
        # Only each block's input is kept through the forward; one block's activations exist again while it is
        # recomputed in the backward, after the loss has freed the logits: the two never coexist
        residual = 4 if (shape.autocast or shape.hidden_bytes == 4) else shape.hidden_bytes
        stored = residual * sum(width * tokens for width, tokens in _block_inputs(f, shape))
        layer_acts = stored + one_layer  # everything the step ever saves (what the CPU measurement sees)
    else:
        stored = layer_acts = sum(per_layer)
    held = 0  # what stays beside the stored block inputs through the backward (T5's checkpoint inputs)
    if f.family == "t5":
        final, held = _t5_stack_bytes(f, shape, device)
    elif f.family == VISION_TEXT:
        from nbtune.estimator import vision_text

        final, held = vision_text.outside_bytes(config, f, shape, device)
    else:
        final = ((4 + act) * h + (act * h if f.head_trainable else 0)) * shape.tokens \
            if f.layers or f.head_trainable else 0
    if packs(config) and not packed_attention.PACKED[config.model.attn_implementation].one_row:
        final += shape.tokens * shape.kv_length  # the boolean (row, row) mask of each packed row, built once
    elif packs(config):  # one row: the rotary cos and sin span all its tokens, not one sequence's positions
        final += 2 * shape.hidden_bytes * f.dims["head_dim"] * (shape.tokens - shape.tokens // shape.batch)
    head_copy, block_copies = _autocast_copies(f, shape)
    # One dequantized weight at a time, in the compute dtype, and only in the backward: MatMul4Bit.backward
    # computes grad_A = grad_output @ dequantize_4bit(B) (bitsandbytes/autograd/_functions.py). The forward's
    # gemm_4bit (bitsandbytes/backends/cuda/ops.py) either needs no buffer (the fused kernel) or frees its
    # dequantize + F.linear fallback's before the next matmul: none is left at the forward end, where the
    # logits (larger than any one weight for a real vocabulary) are
    dequant = f.quant_compute_bytes * f.largest_linear_elems if f.quant_bits else 0
    # In the backward, one block's activations (recomputed under checkpointing, with its weights' autocast copies)
    # and its gradient transients sit on top of whichever is larger: the stored block inputs (all still held at
    # the top block) or the gradients (all held at the bottom block); the inputs are freed as the gradients
    # grow, so the two are not added. A recomputed tensor is freed once its gradient op has read it, so the
    # transients are gradients, not a second copy of the block: the gradient reaching the MLP's widest tensor
    # and the one its backward produces (measured on CPU: bench/results/estimator-bias-2026-12-02.md)
    transients = 2 * _widest(f, shape) * _mlp_bytes(f, shape)
    recomputed = (block_copies // max(len(f.layers), 1)) if shape.checkpointing else 0
    copies = head_copy + (0 if shape.checkpointing else block_copies)
    return ActivationTerms(
        forward_end=int(stored + final + copies + _cache_bytes(config, f, shape)),
        recompute=int(one_layer + recomputed + transients + dequant),
        stored_in_backward=int(stored + held) if shape.checkpointing else 0, stored=int(stored),
        one_layer=one_layer, saved=int(layer_acts + final + copies + recomputed))


def _per_layer(config: TuneConfig, f: Facts, shape: StepShape, device: str) -> list[float]:
    """Bytes each block on the gradient path saves for the backward over the micro-batch."""
    if f.family == VISION_TEXT:
        from nbtune.estimator import vision_text

        return [vision_text.block_bytes(config, f, shape, layer, device) for layer in f.layers]
    h, act = f.dims["h"], shape.matmul_bytes
    return [_layer_bytes(config, f, shape, layer, device) * shape.tokens
            + 2 * act * h * f.prefix_tokens * shape.batch for layer in f.layers]


def _block_inputs(f: Facts, shape: StepShape) -> list[tuple[int, int]]:
    """(width, tokens) of each block's input on the gradient path: a vision encoder-decoder's encoder blocks
    run over the image tokens, at the encoder's width."""
    encoder = (f.dims.get("enc_h", 0), shape.batch * f.dims.get("image_tokens", 0))
    return [encoder if layer.stack == "encoder" else (f.dims["h"], shape.tokens) for layer in f.layers]


def _widest(f: Facts, shape: StepShape) -> int:
    """Elements of the widest MLP tensor of a block on the gradient path (tokens × the MLP's width)."""
    encoder = shape.batch * f.dims.get("image_tokens", 0) * max(f.dims.get("enc_I", 0), f.dims.get("enc_h", 0))
    widest = shape.tokens * max(f.dims["I"], f.dims["h"])
    return max(widest, encoder) if any(layer.stack == "encoder" for layer in f.layers) else widest


def _autocast_copies(f: Facts, shape: StepShape) -> tuple[int, int]:
    """Bytes of the 16-bit copies autocast makes of fp32 Linear weights, saved by each matmul for the backward:
    (outside the blocks, inside them). The head's lives from its forward to its backward, checkpointing or not;
    a block's exist again only while that block is recomputed."""
    if not (shape.autocast and f.layers):
        return 0, 0
    act = shape.matmul_bytes
    return act * f.head_copy_elems, act * (f.autocast_copy_elems - f.head_copy_elems)


def _cache_bytes(config: TuneConfig, f: Facts, shape: StepShape) -> int:
    """Keys and values the forward puts in its cache, beyond what attention saves. Without checkpointing the
    Trainer's forward still builds one (use_cache defaults to the config's True; transformers turns it off only
    under checkpointing, TRL's trainers and nbtune's packed batches pass False) and the model's output holds it
    until the loss is taken. Its tensors are the ones attention saves, except after a 4-bit projection:
    bitsandbytes returns the fp32 hidden dtype and sdpa saves its 16-bit autocast copies, so the fp32 keys and
    values are held twice (measured on CPU)."""
    no_cache = shape.checkpointing or packs(config) or stages.for_config(config).fused_log_probs
    if no_cache or not shape.autocast or shape.hidden_bytes <= shape.matmul_bytes:
        return 0
    quantized = sum(1 for layer in f.layers if layer.quantized)
    return 2 * f.dims["kv"] * shape.hidden_bytes * shape.tokens * quantized


def _mlp_bytes(f: Facts, shape: StepShape) -> int:
    """Element size of the MLP's intermediate tensors and their gradients: bitsandbytes' 4-bit Linear returns
    its input's dtype (`.to(inp_dtype)` in Linear4bit.forward), the fp32 hidden states after peft's upcast."""
    quantized = any(layer.quantized for layer in f.layers)
    return shape.hidden_bytes if quantized else shape.matmul_bytes


def _layer_bytes(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """Activations one block saves for the backward, per token."""
    a, kv_length, act = f.dims["a"], shape.kv_length, shape.matmul_bytes
    # bitsandbytes' 4-bit matmul is outside autocast: its outputs keep the hidden states' dtype
    # (attention itself is autocast: sdpa runs in 16-bit; the MLP's elementwise ops stay in hidden_bytes)
    act_l = shape.hidden_bytes if layer.quantized else act
    per = _t5_block_bytes(config, f, shape, layer, device) if f.family == "t5" else _layer_core(f, shape, layer, act_l)
    per += method_bytes(config, shape, layer, device)
    per_example = packed_attention.PACKED[config.model.attn_implementation].loads_as == packed_attention.NAME
    if packs(config) and per_example and layer.full:
        # attention per example (nbtune/packed_attention.py): no mask, grouped keys/values stay grouped; the
        # output projection saves the examples' outputs joined, a tensor beside the ones sdpa saved (padded,
        # sdpa's output is that input itself; measured on CPU, torch 2.13)
        per += act * f.dims["q"]
    if config.model.attn_implementation == "eager" and f.family != "t5":  # fp32 softmax output, its 16-bit copy
        per += a * kv_length * (4 + (act_l if act_l < 4 else 0))
        if f.dims.get("attn_dropout"):  # attention dropout: its mask and its output (BERT, GPT-2)
            per += a * kv_length * (1 if device == "cuda" else 4) + a * kv_length * 4
    return per


def method_bytes(config: TuneConfig, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """Per token, what the method's modules in a block save: LoRA's, added Linear layers' (adapters) and scaling
    vectors' (IA3)."""
    act = shape.matmul_bytes
    per = lora_bytes(config, layer.lora, device)
    for d_in, d_out in layer.added:  # the input of an added Linear, and its bottleneck activation
        per += act * (d_in + min(d_in, d_out))
    return per + act * layer.vectors  # IA3-style scaling vectors save the tensor they scale


def lora_bytes(config: TuneConfig, lora: tuple[tuple[int, int, float, int], ...], device: str) -> float:
    """Per token of their input, what LoRA-style modules save: lora_A's input (and its dropout's mask) and
    lora_B's."""
    mixed = config.training.precision in ("fp16", "bf16")
    per = 0.0
    for d_in, r, p, lbytes in lora:
        la = 2 if mixed else lbytes  # lora_A runs under autocast
        mask = (1 if device == "cuda" else lbytes) if p > 0 else 0
        per += d_in * (la + mask) + r * la
    return per


def _layer_core(f: Facts, shape: StepShape, layer: LayerFacts, act_mlp: int) -> float:
    h, inter, act = f.dims["h"], f.dims["I"], shape.matmul_bytes
    if f.family == "gated":
        per = 8 * h + act * 3 * h + act_mlp * 3 * inter  # RMSNorm fp32 copies; attention q/k/v/out; SwiGLU
        if layer.full:
            per += act * (4 * h + inter) + (10 * h if shape.autocast else 0)  # inputs of trainable Linear layers
        # bitsandbytes >= 0.45 4-bit matmuls save only the packed weight, not their input
    else:  # LayerNorm, GELU MLP, dropout masks (Korthikanti et al. 2022)
        per = act * (5 * h + inter) + 2 * h
        if layer.full:
            per += act * (3 * h + inter)
    return per


# ----- T5 (transformers/models/t5/modeling_t5.py): per token of the micro-batch. nbtune truncates inputs and targets
# to data.max_length, so the encoder and the decoder are both counted at that length (the worst case).

def _t5_block_bytes(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """A T5 block: self-attention, a decoder block's cross-attention over the encoder's output, and the
    feed-forward, each behind its own T5LayerNorm and followed by dropout."""
    per = _t5_norm(f, shape, layer) + _t5_attention(config, f, shape, layer, device, readers=3)
    if layer.cross_attention:  # its query reads the norm; keys and values read the encoder's output
        per += _t5_norm(f, shape, layer) + _t5_attention(config, f, shape, layer, device, readers=1)
        if layer.full and shape.autocast:  # each of k and v saves its own 16-bit copy of the encoder's output
            per += 2 * shape.matmul_bytes * f.dims["h"]
    return per + _t5_norm(f, shape, layer) + _t5_feed_forward(config, f, shape, layer, device)


def _t5_norm(f: Facts, shape: StepShape, layer: LayerFacts) -> float:
    """T5LayerNorm: `pow` saves its fp32 input (the residual itself in fp32, a copy of 16-bit states), the
    scaling saves the residual, and a trainable weight saves the normalized states (fp32, or cast to the
    weight's 16-bit dtype)."""
    hid = shape.hidden_bytes
    per = hid + (4 if hid < 4 else 0)
    if layer.full:
        per += 4 if hid == 4 else hid
    return per * f.dims["h"]


def _t5_inputs(f: Facts, shape: StepShape, layer: LayerFacts, readers: int) -> float:
    """The norm's output as the trainable Linear layers reading it save it: one tensor shared by all of them,
    or under autocast a 16-bit copy per Linear; none when their weights are frozen."""
    if not layer.full:
        return 0
    return shape.matmul_bytes * f.dims["h"] * (readers if shape.autocast else 1)


def _dropout_mask(device: str, elem: int) -> int:
    """Bytes per element a dropout saves: CUDA's fused kernel a 1-byte mask, CPU a noise tensor of its input's
    dtype."""
    return 1 if device == "cuda" else elem


def _t5_attention(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str,
                  readers: int) -> float:
    """One T5 attention: its projections' outputs, the attention core, the output projection's input and the
    dropout after it. Scores are not scaled; the position bias is added to them (modeling_t5.py)."""
    d, act = f.dims, shape.matmul_bytes
    a, s, q = d["a"], shape.kv_length, d["q"]
    mixed = config.training.precision in ("fp16", "bf16")
    per = _t5_inputs(f, shape, layer, readers)
    if config.model.attn_implementation == "eager":
        # queries, keys and values, as the batched matmuls' contiguous copies; the fp32 position bias (or
        # CUDA autocast) makes the softmax fp32; its dropout keeps a mask, and the matmul with the values
        # keeps the dropout's output in its own dtype
        soft = 4 if (shape.hidden_bytes == 4 or (mixed and device == "cuda")) else act
        core = soft + (_dropout_mask(device, soft) + act if d["attn_dropout"] else (act if act != soft else 0))
        per += 3 * act * q + a * s * core
    elif device == "cpu":
        # sdpa with a float mask (the position bias) and dropout runs torch's math kernel on CPU, in fp32:
        # fp32 queries, keys and values, the softmax output, the dropout's noise and output (measured, torch 2.13)
        per += 12 * q + 12 * a * s
    else:
        # CUDA sdpa: the float bias mask rules out flash attention; the memory-efficient kernel saves queries,
        # keys, values, its output and the fp32 log-sum-exp, and the bias mask itself, which
        # create_position_bias_mask (transformers/integrations/sdpa_attention.py) builds in every layer:
        # (batch, heads, q, k) once a padding mask is merged in, in the kernel's dtype
        per += 4 * act * q + 4 * a + a * s * act
    if layer.full:
        per += act * q  # the output projection's input (the attention output made contiguous)
    return per + _dropout_mask(device, act) * d["h"]


def _t5_feed_forward(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """T5LayerFF: wi (or wi_0 and wi_1 in v1.1's gated form), the activation, dropout, wo, dropout."""
    h, inter, act = f.dims["h"], f.dims["I"], shape.matmul_bytes
    # CUDA autocast runs pow in fp32 and the ops after it follow: NewGELU's chain is fp32 there (not on CPU)
    chain = 4 if config.training.precision in ("fp16", "bf16") and device == "cuda" else act
    per = _t5_inputs(f, shape, layer, 2 if f.gated_mlp else 1)
    if f.activation == "gelu_new":  # NewGELUActivation in Python ops: its input, tanh, 1 + tanh and input / 2
        per += inter * (3 * chain + act)
        out = chain
    else:  # relu, gelu, silu: one tensor of the MLP's width
        per += inter * act
        out = act
    if f.gated_mlp:  # the product saves both factors
        per += inter * (out + act)
    per += inter * _dropout_mask(device, out)
    if layer.full:
        per += inter * act  # wo's input: the dropout's output, or its 16-bit autocast copy
    return per + _dropout_mask(device, act) * h


def _t5_stack_bytes(f: Facts, shape: StepShape, device: str) -> tuple[int, int]:
    """What T5's two stacks save outside their blocks: per stack the embedding's dropout mask, the final norm
    and its dropout mask; the encoder's output, read by every cross-attention's keys and values (one tensor in
    fp32; under autocast the blocks count their copies); the head's input; and each trainable position bias
    table's bucket indices, (q, k) int64 once per table (EmbeddingBackward saves them). Under checkpointing the
    encoder's output and the position biases (1, heads, q, k), passed from block to block, are checkpoint
    inputs and stay through the backward. Returns (all of it, what checkpointing holds through the backward)."""
    h, hid, act, s = f.dims["h"], shape.hidden_bytes, shape.matmul_bytes, shape.kv_length
    norm = hid + (4 if hid < 4 else 0) + ((4 if hid == 4 else hid) if f.head_trainable else 0)
    per = 2 * (2 * _dropout_mask(device, hid) + norm) * h
    held = 0
    if shape.checkpointing:  # the encoder's output; the encoder, decoder and (zero) cross-attention biases
        held = hid * h * shape.tokens + 3 * hid * f.dims["a"] * s * s
    elif not shape.autocast and any(x.full for x in f.layers if x.cross_attention):
        per += hid * h
    if f.head_trainable:
        per += (act if shape.autocast else hid) * h
    return int(per * shape.tokens + 8 * s * s * f.position_bias_tables + held), int(held)


def logit_terms(config: TuneConfig, f: Facts, shape: StepShape) -> LogitTerms:
    """The logits with the loss's fp32 copies (none for classification), and an early head gradient; for a stage
    scored through TRL's fused head, its tile instead, and a reference's no-grad forward."""
    # At the start of the backward the fp32 log-softmax output the loss saved, the gradient of the loss and the
    # log-softmax gradient coexist (12 bytes per logit; transformers upcasts the logits to fp32 before the
    # cross-entropy)
    vocab, tokens, h = f.dims["V"], shape.tokens, f.dims["h"]
    if f.family == DIFFUSION:  # no logits: the UNet's noise-prediction loss is among its activations
        return LogitTerms(logits=0, head_gradient=0)
    stage = stages.for_config(config)
    head = vocab * h * f.trainable_elem_bytes if f.head_trainable else 0
    if stage.fused_log_probs:  # tiles of the logits, never all of them; fp32 statistics per token
        tile = min(tokens, FUSED_TILE_TOKENS) * FUSED_TILE_VOCAB * shape.matmul_bytes
        backward = tile + 4 * tokens * h + (4 * vocab * h if f.head_trainable else 0)  # fp32 accumulators
        # the reference scores the same sequences after the model's forward, under no_grad (the generating
        # stage scores them while preparing the batch, when no activations are held)
        after = stage.uses_reference(config) and not stage.generates
        return LogitTerms(logits=tile + 32 * tokens, head_gradient=head, backward=backward,
                          reference_forward=inference_block_bytes(f, tokens, shape.matmul_bytes) if after else 0)
    if losses.requested(config) != "standard" and config.model.task == "causal-lm":
        return chunked_logit_terms(losses.requested(config), f, shape, head)
    if TASKS[config.model.task].classifies:
        logits = 0
    else:
        logits = int(tokens * vocab * 12)
        if f.teacher_bytes:  # the teacher's logits, upcast, and the softened distributions of both
            logits += int(tokens * vocab * (shape.matmul_bytes + 4 + 8))
    return LogitTerms(logits=logits, head_gradient=head)


def chunked_logit_terms(implementation: str, f: Facts, shape: StepShape, head: int) -> LogitTerms:
    """training.loss_implementation chunked or liger (nbtune/losses.py): one chunk of the logits at a time, never
    all of them. Chunked recomputes a chunk in the backward, while every activation is still held: its logits in
    the matmul dtype, their fp32 copy, the log-softmax it saves and two fp32 gradients (18 bytes per logit in
    bf16), beside the hidden states' gradient, gathered from the chunks, then joined (twice its size). Liger
    computes the gradients in its forward: a chunk's logits in the matmul dtype, overwritten by their gradient,
    and the hidden states' gradient, held from the forward to the backward; an fp32 loss per token."""
    vocab, tokens, h = f.dims["V"], shape.tokens, f.dims["h"]
    chunk = losses.chunk_tokens(tokens, vocab, h, implementation)
    if implementation == "liger":
        logits = chunk * vocab * shape.matmul_bytes + tokens * h * shape.matmul_bytes + 4 * tokens
    else:
        logits = chunk * vocab * (shape.matmul_bytes + 16) + 2 * tokens * h * shape.hidden_bytes
    return LogitTerms(logits=int(logits), head_gradient=head)


def inference_block_bytes(f: Facts, tokens: int, elem: int) -> int:
    """The tensors one block holds at once in a no-grad forward over `tokens` tokens: residual and normed
    input, queries, keys, values and attention output, and the MLP's up, gate and activated projections."""
    return int(tokens * (4 * f.dims["h"] + 3 * f.dims["I"]) * elem)


def generation_terms(config: TuneConfig, f: Facts, shape: StepShape) -> GenerationTerms:
    """What sampling the step's completions holds (none for a stage that does not generate): TRL generates
    for micro-batch × accumulation steps completions at once, outside autocast, with a KV cache of every block."""
    if not stages.for_config(config).generates:
        return GenerationTerms(0, 0, 0, 0)
    completions = shape.batch * config.training.gradient_accumulation_steps
    elem, d = shape.hidden_bytes, f.dims
    positions = sequence_tokens(config) + f.virtual_tokens + f.prefix_tokens
    kv_cache = completions * positions * f.total_layers * 2 * d["kv"] * elem
    logits = completions * d["V"] * (elem + 4 + 4)
    prefill = inference_block_bytes(f, completions * (config.data.max_length + f.virtual_tokens), elem)
    return GenerationTerms(completions, kv_cache, logits, prefill)


def phase_terms(config: TuneConfig, weights: WeightTerms, optimizer: OptimizerTerms, acts: ActivationTerms,
                logits: LogitTerms, generation: GenerationTerms, shard: sharding.ShardTerms) -> dict[str, Phase]:
    """What is allocated at the forward end, in the backward and at the optimizer step (and, first, while a
    generating stage samples its completions: gradients are freed by then, activations not yet saved). A
    distributed strategy's buckets are held throughout; its gathered weights in the forward and the backward,
    where whole gradients of a unit wait to be reduced; ZeRO's fp32 gradient partition at the step."""
    persistent = weights.frozen + weights.trainable + weights.constants + weights.reference + optimizer.state \
        + WORKSPACE + shard.buckets
    grads = optimizer.gradients
    grads_in_forward = grads if config.training.gradient_accumulation_steps > 1 else 0
    early_head = min(logits.head_gradient, grads)
    in_flight = shard.gathered_gradients + shard.backward_buckets  # the backward's communication
    backward = max(grads, acts.stored_in_backward) + acts.recompute + logits.backward + shard.gathered + in_flight
    forward = grads_in_forward + acts.forward_end + logits.reference_forward + logits.logits + shard.gathered
    step_temp = optimizer.step_temp + shard.step_buffers
    step = grads + step_temp
    phases = {"generation": Phase(persistent + generation.total, generation.total, 0, 0, 0,
                                  generation=generation.total, communication=shard.buckets)} \
        if generation.total else {}
    return phases | {
        "forward end": Phase(persistent + forward + early_head, forward, grads_in_forward + early_head,
                             acts.forward_end + logits.reference_forward, logits.logits,
                             gathered_weights=shard.gathered, communication=shard.buckets),
        "backward": Phase(persistent + backward, backward, grads,
                          max(acts.stored_in_backward - grads, 0) + acts.recompute, logits.backward,
                          gathered_weights=shard.gathered, communication=shard.buckets + in_flight),
        "optimizer step": Phase(persistent + step, step, grads, 0, 0, optimizer_step=step_temp,
                                communication=shard.buckets),
    }


def _estimate(config: TuneConfig, model_config: Any, f: Facts, gpu: Any, device: str,
              fused_optimizer: bool) -> MemoryEstimate:
    tm = terms(config, f, device, fused_optimizer)
    overhead = {p: int(FRAGMENTATION * phase.dynamic) + CUDA_CONTEXT for p, phase in tm.phases.items()}
    totals = {p: int(phase.allocated + overhead[p]) for p, phase in tm.phases.items()}
    peak = max(totals, key=lambda p: totals[p])
    at_peak = tm.phases[peak]
    breakdown = {
        "weights": tm.weights.frozen, "trainable_weights": tm.weights.trainable,
        "gathered_weights": at_peak.gathered_weights, "gradients": at_peak.gradients,
        "communication": at_peak.communication,
        "optimizer_state": tm.optimizer.state, "optimizer_step": at_peak.optimizer_step,
        "activations": at_peak.activations,
        "logits_loss": at_peak.logits_loss, "quantization_constants": tm.weights.constants,
        "reference_model": tm.weights.reference, "generation": at_peak.generation,
        "fixed_overhead": WORKSPACE + overhead[peak],
    }
    notes = list(tm.optimizer.notes) + list(tm.shard.notes)
    if f.family == "t5":  # data.py truncates targets at data.max_length too
        notes.append(f"the decoder is counted at {config.data.max_length} target tokens (data.max_length), its "
                     "longest; shorter targets need less")
    if f.family == VISION_TEXT:
        notes.append(_caption_note(config, f))
    if f.family == DIFFUSION:
        from nbtune.estimator import unet

        notes.append(unet.note(f))
        if config.training.gradient_checkpointing:
            why = "the UNet's checkpointing is not modelled" if diffusion_checkpoints() else \
                "nbtune's DiffusionModel cannot enable it: such a run fails"
            notes.append(f"training.gradient_checkpointing is estimated as off for a text-to-image model ({why})")
    if tm.shape.checkpointing and not config.training.gradient_checkpointing:
        notes.append("the method turns gradient checkpointing on by itself")
    method = registry.get(config.method.name)
    if f.trainable_params == 0:
        notes.append(f"method {config.method.name} leaves no trainable parameters on this model")
    elif method.trains_only_biases and f.family == "gated":
        notes.append(f"this architecture has almost no biases, so {method.title} trains very little")
    allocated = int(at_peak.allocated)
    return MemoryEstimate(
        total_bytes=sum(breakdown.values()), breakdown=breakdown, peak_phase=peak, phases=totals,
        trainable_params=f.trainable_params, total_params=f.total_params, allocated_bytes=allocated,
        reserved_bytes=allocated + int(FRAGMENTATION * at_peak.dynamic),
        gpu=str(gpu) if gpu is not None else None, notes=notes, processes=tm.shard.processes,
        cpu_bytes=sum(tm.shard.cpu.values()), cpu_breakdown=dict(tm.shard.cpu), config=config,
        model_config=model_config)


def _caption_note(config: TuneConfig, f: Facts) -> str:
    """How an image-to-text estimate counts its two sequences."""
    tokens = caption_tokens(config, f)
    why = "data.max_length" if tokens == config.data.max_length else "the decoder's position limit"
    return (f"the encoder is counted at {f.dims['image_tokens']} tokens an image (its patches and the class "
            f"token), the decoder at {tokens} caption tokens ({why}), their longest; shorter captions need less")


# ----- suggestions ---------------------------------------------------------------------------------------------

# What each kind of change costs in speed or quality, said once. `rank` orders them, lower is cheaper; a
# combination's rank is the sum of its parts'. Micro-batch and sequence-length ranks count per halving.
COSTS: dict[str, tuple[str, float]] = {
    "micro_batch": ("same quality, more steps per update", 1.0),
    "dtype": ("16-bit weights: slightly less precise", 1.0),
    "optimizer": ("8-bit optimizer states: about the same quality", 2.0),
    "checkpointing": ("about 30 % slower steps", 3.0),
    "loss": ("the LM head runs again in the backward: slower steps where the head is a large part of the model",
             2.5),
    "method lora": ("trains an adapter, not every weight: may reach lower quality", 4.0),
    "method qlora": ("4-bit base: slightly lower quality", 5.0),
    "method": ("a lighter method: may reach lower quality", 5.0),
    "max_length": ("examples longer than {max_length} tokens are cut", 6.0),
    # 2 GPUs; one more per further doubling (4 GPUs 7, 8 GPUs 8): more hardware is the dearest change
    "gpus": ("needs {gpus} GPUs, launched with accelerate; every step exchanges the weight and gradient shards "
             "between them{batch}", 6.0),
}
GPU_COUNTS = (2, 4, 8)  # the GPU counts "use N GPUs with FSDP" tries, smallest first
COMBINED = ("micro_batch", "dtype", "optimizer", "checkpointing", "loss", "method")  # shorter sequences only alone
LISTED = 5  # how many suggestions are listed: those that fit first, then the closest of those that do not


@dataclass(frozen=True)
class _Option:
    """One change to try: its kind (a combination takes at most one of each), its words, fields and cost."""

    kind: str
    description: str
    changes: dict[str, Any]
    cost: str
    rank: float


def apply_changes(config: TuneConfig, changes: dict[str, Any]) -> TuneConfig:
    """The config with dotted-field changes; "method.name" switches the method and drops its old parameters."""
    changes = dict(changes)
    if "method.name" in changes:
        config = config.replace(method=changes.pop("method.name"))
    return config.replace(**changes) if changes else config


def fit_to_gpu(config: TuneConfig, gpu: str | int | float, margin: float = 0.1) -> Suggestion | None:
    """The cheapest change that leaves `margin` of the GPU's memory free, or None: `MemoryEstimate.fit`."""
    return estimate_memory(config, gpu=gpu).fit(margin)


def _ordered(tried: list[Suggestion], limit: int) -> list[Suggestion]:
    """Those whose peak is at most `limit`, cheapest first, then the others, smallest peak first.

    Under the limit, one that changes the fields a cheaper one changes (a smaller micro-batch, another
    method), perhaps with more (a combination containing it), costs more for nothing and is left out; over it,
    only the smallest peak per set of fields changed is kept.
    """
    under = sorted((s for s in tried if (s.total_bytes or 0) <= limit), key=lambda s: (s.rank, s.total_bytes))
    over = sorted((s for s in tried if (s.total_bytes or 0) > limit), key=lambda s: s.total_bytes or 0)
    kept: list[Suggestion] = []
    for s in under:
        if not any(k.changes.keys() <= s.changes.keys() for k in kept):
            kept.append(s)
    closest: list[Suggestion] = []
    for s in over:
        if not any(k.changes.keys() == s.changes.keys() for k in closest):
            closest.append(s)
    return (kept + closest)[:LISTED]


def _tried(est: MemoryEstimate) -> list[Suggestion]:
    """The single changes and the few combinations of them that lower the peak, re-estimated (instant
    tier)."""
    config, capacity = est.config, gpu_bytes(est.gpu)[1]  # type: ignore[arg-type]
    assert config is not None
    singles = [(o, _reestimate(config, o.changes, est.model_config)) for o in _options(config)]
    measured = [(o, total) for o, total in singles if total is not None]
    combined = [_combine(parts) for parts in _combinations(measured)]
    measured += [(o, _reestimate(config, o.changes, est.model_config)) for o in combined]
    measured += _more_gpus(config, capacity, est.model_config)
    return [Suggestion(o.description, o.changes, total, total <= capacity, cost=o.cost, rank=o.rank)
            for o, total in measured if total is not None and total < est.total_bytes]


def _more_gpus(config: TuneConfig, capacity: int, model_config: Any) -> list[tuple[_Option, int | None]]:
    """"Use N GPUs with FSDP" for a run on one GPU: the smallest N of GPU_COUNTS whose per-GPU peak fits, or the
    largest when none does. Each GPU trains its own micro-batches, so the accumulation steps are divided by N
    where they divide (the same effective batch); otherwise the effective batch grows N times, and the cost
    says so."""
    if distributed.world_size(config) > 1 or TASKS[config.model.task].draws:  # FSDP units are transformer blocks
        return []
    tried: tuple[_Option, int | None] | None = None
    for n in GPU_COUNTS:
        option = _gpus_option(config, n)
        tried = (option, _reestimate(config, option.changes, model_config))
        if tried[1] is not None and tried[1] <= capacity:
            break
    return [tried] if tried is not None else []


def _gpus_option(config: TuneConfig, n: int) -> _Option:
    """FSDP over `n` GPUs, with the accumulation steps divided by `n` where they divide."""
    ga = config.training.gradient_accumulation_steps
    same = ga % n == 0
    changes: dict[str, Any] = {"distributed.strategy": "fsdp", "distributed.processes": n}
    if same:
        changes["training.gradient_accumulation_steps"] = ga // n
    description = f"use {n} GPUs with FSDP (weights, gradients and optimizer state sharded" + (
        f"; {ga // n} accumulation steps: same effective batch)" if same else ")")
    cost, rank = COSTS["gpus"]
    batch = "" if same else f"; the effective batch is {n} times larger"
    return _Option("gpus", description, changes, cost.format(gpus=n, batch=batch), rank + math.log2(n) - 1)


def _reestimate(config: TuneConfig, changes: dict[str, Any], model_config: Any) -> int | None:
    try:
        return estimate_memory(apply_changes(config, changes), model_config).total_bytes
    except Exception:  # noqa: BLE001 - a change this model cannot take is simply not suggested
        return None


def _combinations(singles: list[tuple[_Option, int]]) -> list[tuple[_Option, ...]]:
    """A small search: pairs (each method, and the strongest change of every other kind), the three kinds that
    save the most alone, together, and the strongest of every kind together (the most the changes reach)."""
    strongest: dict[str, tuple[_Option, int]] = {}
    for o, total in singles:
        if o.kind in COMBINED and (o.kind not in strongest or total < strongest[o.kind][1]):
            strongest[o.kind] = (o, total)
    picks = [o for o, _ in singles if o.kind == "method"]
    picks += [o for kind, (o, _) in strongest.items() if kind != "method"]
    pairs = [(a, b) for a, b in itertools.combinations(picks, 2) if a.kind != b.kind]
    best = tuple(o for o, _ in sorted(strongest.values(), key=lambda pair: pair[1]))
    return pairs + [best[:3]] * (len(best) >= 3) + [best] * (len(best) > 3)


def _combine(parts: tuple[_Option, ...]) -> _Option:
    parts = tuple(sorted(parts, key=lambda o: o.rank))
    changes: dict[str, Any] = {}
    for o in parts:
        changes.update(o.changes)
    return _Option("+".join(o.kind for o in parts), " + ".join(o.description for o in parts), changes,
                   "; ".join(o.cost for o in parts), sum(o.rank for o in parts))


def _option(kind: str, description: str, changes: dict[str, Any], halvings: float = 1,
            **words: Any) -> _Option:
    """An option with its cost from COSTS (by kind, or "method <name>")."""
    cost, rank = COSTS.get(kind) or COSTS[kind.split()[0]]
    return _Option(kind.split()[0], description, changes, cost.format(**words), rank * halvings)


def _options(config: TuneConfig) -> list[_Option]:
    """Single changes that lower the peak, each with its cost."""
    t = config.training
    mb, ga = t.micro_batch_size, t.gradient_accumulation_steps
    # only micro-batches that divide the current one keep micro-batch × accumulation exactly
    smaller = [m for m in sorted({mb >> k for k in range(1, mb.bit_length())} | {1}, reverse=True)
               if m < mb and mb % m == 0]
    options = [_option("micro_batch", f"micro-batch {m} with {ga * mb // m} accumulation steps (same "
                       "effective batch)", {"training.micro_batch_size": m,
                                            "training.gradient_accumulation_steps": ga * mb // m},
                       math.log2(mb / m)) for m in smaller]
    if not t.gradient_checkpointing and not registry.get(config.method.name).no_gradient_checkpointing and \
            checkpoints(config.model.task):
        options.append(_option("checkpointing", "gradient checkpointing",
                               {"training.gradient_checkpointing": True}))
    causal = config.model.task == "causal-lm"  # the chunked loss is over a vocabulary's logits
    if t.loss_implementation == "standard" and "loss_implementation" in stages.for_config(config).reads and causal:
        options.append(_option("loss", "chunked loss (the logits a chunk of tokens at a time)",
                               {"training.loss_implementation": "chunked"}))
    if OPTIMIZERS[t.optimizer].state == "adam" and not OPTIMIZERS[t.optimizer].eight_bit:
        options += [_option("optimizer", f"optimizer {o.description}", {"training.optimizer": o.name})
                    for o in OPTIMIZERS.values() if o.state == "adam" and o.eight_bit]
    if config.model.dtype == "fp32" and t.precision in ("bf16", "fp16"):
        options.append(_option("dtype", f"load the weights in {t.precision}", {"model.dtype": t.precision}))
    lighter = registry.get(config.method.name).lighter_methods
    options += [_option(f"method {name}", f"switch the method to {name}", {"method.name": name})
                for name in lighter if registry.find(name) is not None]
    length, halvings = config.data.max_length // 2, 1
    task = TASKS[config.model.task]  # an image's tokens are its patches; a captioner's decoder reads max_length
    while length >= 128 and (task.inputs == "text" or task.captions):
        options.append(_option("max_length", f"shorter sequences: max_length {length}",
                               {"data.max_length": length}, halvings, max_length=length))
        length, halvings = length // 2, halvings + 1
    return options
