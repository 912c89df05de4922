"""Per-GPU memory under a distributed strategy (`distributed.*`, nbtune/distributed.py): what one process holds.

Every term of the single-process estimate is computed first (`estimate.terms`); this module says, once per
term, what each strategy does to it. Activations and logits stay per process: every process runs its own
micro-batch of `training.micro_batch_size` examples.

- ddp: each process holds the whole model, its gradients and its optimizer state, plus the reducer's buckets.
- fsdp, sharding full: parameters, gradients and optimizer state divided by the processes; gathered whole
  for the forward and backward: the root unit and two blocks. gradients-and-optimizer (ZeRO-2-like) gathers
  every parameter at the forward and keeps them until the backward ends, so at the peak only gradients and
  optimizer state are divided; hybrid divides by the processes of one node (copies across nodes).
- zero2 / zero3: DeepSpeed's stages with its default buffer sizes (below).
- distributed.cpu_offload: the shards it names leave the GPU for CPU memory, reported as their own figure.

For a PEFT method only the trainable parameters have gradients and optimizer state; the frozen base weights
are divided too under fsdp and zero3 (4-bit weights as their packed storage). Quantization constants stay whole
in every process (bitsandbytes keeps each weight's quant_state on its module, outside what FSDP shards).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nbtune import distributed
from nbtune.estimator.skeleton import UnitParams

if TYPE_CHECKING:
    from nbtune.config import TuneConfig
    from nbtune.estimator.estimate import OptimizerTerms, WeightTerms
    from nbtune.estimator.skeleton import Facts

# torch DDP's reducer copies every trainable parameter's gradient into flat all-reduce buckets of bucket_cap_mb
# (25 MiB; the first 1 MiB), allocated once when the model is wrapped and kept: together one more copy of the
# gradients, since transformers and accelerate leave gradient_as_bucket_view off (torch/nn/parallel/distributed.py)
DDP_BUCKET_CAP_MB = 25
# FSDP gathers the block being computed and prefetches the next one; the root unit (what lies outside the
# blocks: embeddings, final norm, head) is gathered at the start of the forward and, being the root, kept
# until the end of the backward (torch's fully_shard; accelerate wraps each transformer block as a unit)
FSDP_GATHERED_BLOCKS = 2
# DeepSpeed's own defaults, what a config that leaves them out gets (deepspeed/runtime/zero/config.py), in
# elements: reduce_bucket_size (ZeRO-2 allocates it for each backward, overlap_comm off; ZeRO-3 once, kept),
# stage3_max_live_parameters (gathered parameters kept while they will be used again within
# stage3_max_reuse_distance, also 1e9) and stage3_prefetch_bucket_size (fetched ahead of use)
ZERO_REDUCE_BUCKET = 500_000_000
ZERO3_MAX_LIVE = 1_000_000_000
ZERO3_PREFETCH_BUCKET = 50_000_000


@dataclass(frozen=True)
class ShardTerms:
    """What the strategy adds to one process's GPU memory, and what it moves to CPU memory."""

    processes: int = 1  # processes training the run (the world size)
    weight_shards: int = 1  # processes the weights are divided among (1: each holds them whole)
    state_shards: int = 1  # processes gradients and optimizer state are divided among
    gathered: int = 0  # parameters gathered whole for the forward and the backward
    gathered_gradients: int = 0  # in the backward: whole gradients of a unit before they are reduce-scattered
    buckets: int = 0  # communication buffers held through the whole step
    backward_buckets: int = 0  # communication buffers held through the backward only
    step_buffers: int = 0  # at the optimizer step: ZeRO's fp32 copy of this process's gradient partition
    cpu: dict[str, int] = field(default_factory=dict)  # bytes in CPU memory (per process), by category
    notes: tuple[str, ...] = ()


def mixed(config: TuneConfig) -> bool:
    """Whether the step runs in 16-bit mixed precision (accelerate and DeepSpeed then cast parameters)."""
    return config.training.precision in ("bf16", "fp16")


def shard_counts(config: TuneConfig) -> tuple[int, int]:
    """(processes the weights are divided among, processes gradients and optimizer state are divided among)."""
    d, n = config.distributed, distributed.world_size(config)
    if d.strategy == "fsdp":
        group = d.processes if d.sharding == "hybrid" else n
        return group, group
    if d.strategy in ("zero2", "zero3"):
        return (n if d.strategy == "zero3" else 1), n
    return 1, 1


def held_facts(config: TuneConfig, f: Facts) -> Facts:
    """The facts with parameters at the element sizes the strategy holds them in. FSDP under 16-bit mixed
    precision: accelerate upcasts 16-bit trainable parameters to fp32 (accelerator.py, fsdp_utils.py), gathering
    them in 16-bit. DeepSpeed under 16-bit mixed precision casts the whole module to 16-bit (its fp32 master copy
    is optimizer state: `optimizer_facts`)."""
    n = f.trainable_params
    strategy = config.distributed.strategy
    if not mixed(config) or strategy in ("none", "ddp"):
        return f
    if strategy == "fsdp":
        if not upcasts(config, f):
            return f
        return dataclasses.replace(f, weight_bytes=f.weight_bytes - f.trainable_bytes + 4 * n,
                                   trainable_bytes=4 * n, trainable_elem_bytes=4)
    return dataclasses.replace(f, weight_bytes=2 * f.weight_elems, trainable_bytes=2 * n, trainable_elem_bytes=2)


def upcasts(config: TuneConfig, f: Facts) -> bool:
    """Whether accelerate upcasts the trainable parameters to fp32 for FSDP (16-bit ones, under mixed
    precision)."""
    return config.distributed.strategy == "fsdp" and mixed(config) and f.trainable_elem_bytes < 4 \
        and f.trainable_params > 0


def optimizer_facts(config: TuneConfig, held: Facts) -> Facts:
    """The facts the optimizer's state is computed from: DeepSpeed steps on an fp32 copy of each trainable
    partition, so its states are those of fp32 parameters."""
    if config.distributed.strategy not in ("zero2", "zero3"):
        return held
    return dataclasses.replace(held, trainable_bytes=4 * held.trainable_params, trainable_elem_bytes=4)


def per_process(config: TuneConfig, f: Facts, held: Facts, weights: WeightTerms, optimizer: OptimizerTerms,
                ) -> tuple[WeightTerms, OptimizerTerms, ShardTerms]:
    """One process's weights and optimizer terms under `config.distributed` (computed from `held`, the facts
    `f` at the sizes the strategy holds parameters in), and what the strategy adds."""
    strategy = config.distributed.strategy
    if strategy == "none":
        return weights, optimizer, ShardTerms()
    n = distributed.world_size(config)
    by_weights, by_state = shard_counts(config)
    if strategy in ("zero2", "zero3"):  # gradients in the 16-bit weights' dtype; the fp32 master copy DeepSpeed
        # keeps of every trainable partition, which its optimizer steps (so the states are fp32 ones)
        optimizer = dataclasses.replace(optimizer, gradients=held.trainable_bytes,
                                        state=optimizer.state + 4 * held.trainable_params)
    teacher = held.teacher_bytes  # a distillation teacher is not wrapped: each process holds it whole
    weights = dataclasses.replace(
        weights, frozen=_part(weights.frozen - teacher, by_weights) + teacher,
        trainable=_part(weights.trainable, by_weights), quantized=_part(weights.quantized, by_weights),
        reference=_part(weights.reference, by_weights))
    optimizer = dataclasses.replace(optimizer, gradients=_part(optimizer.gradients, by_state),
                                    state=_part(optimizer.state, by_state),
                                    step_temp=_part(optimizer.step_temp, by_state))
    shard = ShardTerms(processes=n, weight_shards=by_weights, state_shards=by_state,
                       **_strategy_buffers(config, held, n), notes=_notes(config, f, n))
    if config.distributed.cpu_offload:
        return _offloaded(config, held, weights, optimizer, shard)
    return weights, optimizer, shard


def _strategy_buffers(config: TuneConfig, held: Facts, processes: int) -> dict[str, int]:
    """The buffers each strategy adds: gathered parameters, whole gradients in flight, communication buckets."""
    d = config.distributed
    grad_elem = 2 if mixed(config) else held.trainable_elem_bytes  # gradients are reduced in the compute dtype
    block, root = held.largest_block, held.outside_blocks
    if d.strategy == "ddp":
        return {"buckets": held.trainable_bytes if processes > 1 else 0}  # accelerate wraps no DDP for one
    if d.strategy == "fsdp":
        if d.sharding == "gradients-and-optimizer":  # every unit stays gathered from its forward to its backward
            whole = UnitParams(held.weight_elems, held.weight_bytes, held.quantized_params)
            gathered = _gathered_bytes(config, held, whole)
        else:
            gathered = _gathered_bytes(config, held, root) + FSDP_GATHERED_BLOCKS * _gathered_bytes(config, held, block)
        return {"gathered": gathered, "gathered_gradients": (block.trainable + root.trainable) * grad_elem}
    bucket = ZERO_REDUCE_BUCKET * grad_elem
    step = _part(4 * held.trainable_params, processes)  # the fp32 gradient partition the step reads
    if d.strategy == "zero2":
        return {"backward_buckets": bucket, "step_buffers": step}
    total = held.weight_elems + held.quantized_params
    live = min(total, max(block.elems + block.quantized, ZERO3_MAX_LIVE + ZERO3_PREFETCH_BUCKET))
    per_elem = (held.weight_bytes + _packed(held, held.quantized_params)) / max(total, 1)
    return {"gathered": int(live * per_elem), "gathered_gradients": block.trainable * grad_elem, "buckets": bucket,
            "step_buffers": step}


def _gathered_bytes(config: TuneConfig, held: Facts, unit: UnitParams) -> int:
    """A unit's parameters gathered whole: in the 16-bit compute dtype under mixed precision (FSDP's
    param_dtype), else as stored; quantized weights as their packed storage."""
    plain = 2 * unit.elems if mixed(config) else unit.bytes
    return plain + _packed(held, unit.quantized)


def _packed(f: Facts, elems: int) -> int:
    """Bytes of `elems` quantized weights as bitsandbytes packs them (4-bit: two a byte; LLM.int8: one)."""
    return elems * f.quant_bits // 8 if f.quant_bits else 0


def _offloaded(config: TuneConfig, held: Facts, weights: WeightTerms, optimizer: OptimizerTerms,
               shard: ShardTerms) -> tuple[WeightTerms, OptimizerTerms, ShardTerms]:
    """distributed.cpu_offload: every strategy moves the optimizer state and the gradient partition to CPU
    memory and steps there; fsdp and zero3 move the weight shards too (a teacher stays on the GPU)."""
    cpu = {"gradients": optimizer.gradients, "optimizer_state": optimizer.state,
           "optimizer_step": shard.step_buffers}
    optimizer = dataclasses.replace(optimizer, gradients=0, state=0, step_temp=0)
    shard = dataclasses.replace(shard, step_buffers=0)
    if config.distributed.strategy in distributed.SHARDED:
        teacher = held.teacher_bytes
        cpu |= {"weights": weights.frozen - teacher, "trainable_weights": weights.trainable,
                "reference_model": weights.reference}
        weights = dataclasses.replace(weights, frozen=teacher, trainable=0, quantized=0, reference=0)
    return weights, optimizer, dataclasses.replace(shard, cpu={k: v for k, v in cpu.items() if v})


def _notes(config: TuneConfig, f: Facts, processes: int) -> tuple[str, ...]:
    """What the per-GPU figure assumes, in the user's words."""
    d = config.distributed
    words = {"ddp": "each holds the whole model" + ("; the gradient buckets of the all-reduce are one more copy "
                                                    "of the gradients" if processes > 1 else ""),
             "fsdp": {"full": "weights, gradients and optimizer state are this GPU's shard; the embeddings and "
                              "head (the root unit) and two blocks are gathered whole in the forward and backward",
                      "gradients-and-optimizer": "gradients and optimizer state are this GPU's shard; the weights "
                                                 "are gathered whole from the forward to the end of the backward",
                      "hybrid": f"weights, gradients and optimizer state are divided among the {d.processes} "
                                "processes of a node; the root unit and two blocks are gathered whole"}[d.sharding],
             "zero2": "gradients and optimizer state (with DeepSpeed's fp32 master copy) are this GPU's "
                      "partition; reduce_bucket_size 5e8 (DeepSpeed's default)",
             "zero3": "weights, gradients and optimizer state (with DeepSpeed's fp32 master copy) are this GPU's "
                      "partition; up to stage3_max_live_parameters 1e9 + stage3_prefetch_bucket_size 5e7 "
                      "parameters gathered, reduce_bucket_size 5e8 (DeepSpeed's defaults)"}[d.strategy]
    notes = [f"per GPU of {processes} process{'es' if processes != 1 else ''} ({d.strategy}): {words}; "
             "activations are each process's own micro-batch"]
    if upcasts(config, f):
        notes.append("under FSDP mixed precision accelerate upcasts the 16-bit trainable parameters to fp32 "
                     "(their shards, gradients and optimizer state) and gathers them in 16-bit")
    return tuple(notes)


def _part(total: int, processes: int) -> int:
    """One process's share of `total` bytes divided among `processes` (rounded up: shards are padded)."""
    return math.ceil(total / processes) if processes > 1 else total
