"""Projection of a compared config to the user's real model and GPU: its peak memory (the instant estimator) and
an estimated step time from the FLOPs of one step and the GPU's peak compute.

The tiny embedded model measures quality; the projection measures cost. `project(config, target_model, gpu)`
swaps the model and keeps everything else; `project_all` does it for every variant of a comparison. Step times
are estimates from assumed constants (below), never measurements, and every projection says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbtune.config import TuneConfig
from nbtune.dtypes import BYTES
from nbtune.estimator.gpus import gpu_bytes, peak_tflops

if TYPE_CHECKING:
    from nbtune.estimator.estimate import MemoryEstimate
    from nbtune.estimator.skeleton import Facts

# Model FLOPs utilisation: the share of the GPU's peak a fine-tuning step reaches. An assumption, not a
# measurement: 30-50 % is what well-tuned transformer training reports (PaLM's paper: 46 %; Llama-style
# fine-tuning with Hugging Face kernels is usually lower), so 35 % is a middle guess.
MFU = 0.35
# bitsandbytes' 4- and 8-bit layers dequantize every weight before each matmul, forward and backward; QLoRA
# steps are commonly reported 30-50 % slower than LoRA's at the same batch. An assumption, not a measurement.
QUANTIZED_SLOWDOWN = 1.4


@dataclass
class Projection:
    """One config projected to a target model and GPU: peak memory, fits or not, and an estimated speed."""

    target_model: str
    gpu: str
    config: TuneConfig | None = field(default=None, repr=False)  # the config with the target model
    peak_bytes: int | None = None  # estimate_memory(config, gpu=gpu).total_bytes
    fits: bool | None = None
    flops_per_token: float | None = None  # training FLOPs of one token: forward, backward, recomputation
    step_time_s: float | None = None  # one optimizer step: micro-batch × accumulation × max_length tokens
    tokens_per_s: float | None = None
    assumptions: list[str] = field(default_factory=list)  # plain words: what is estimated, not measured
    error: str | None = None  # why this config cannot apply to the target (then the figures are None)

    def to_dict(self) -> dict[str, Any]:
        """As JSON holds it (the config as its dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict() if self.config is not None else None
        return d


def project(config: TuneConfig, target_model: str, gpu: str, model_config: Any = None) -> Projection:
    """`config` with its model replaced by `target_model` (a catalogue hub id or a local folder), on `gpu`.

    The peak is the instant estimator's; the step time is FLOPs per step / (peak 16-bit TFLOPs × MFU). A config
    that cannot apply to the target (a method the model has no layers for) gives a Projection with `error`.
    `model_config` (the target's PretrainedConfig) saves reading it again when projecting many configs.
    """
    from nbtune.estimator import estimate_memory
    from nbtune.estimator.skeleton import facts

    gpu_bytes(gpu)  # an unknown GPU name is the caller's mistake: it raises, naming the allowed ones
    out = Projection(target_model, gpu, config=config.replace(**{"model.name_or_path": target_model}))
    try:
        estimate = estimate_memory(out.config, model_config, gpu=gpu)
    except Exception as error:  # noqa: BLE001 - a method that cannot apply to the target is a row, not a crash
        out.error = str(error) or type(error).__name__
        return out
    f = facts(estimate.config, estimate.model_config)  # cached: the estimate built this skeleton
    out.peak_bytes, out.fits = estimate.total_bytes, estimate.fits(gpu)
    out.flops_per_token, out.assumptions = step_flops(estimate, f)
    _add_speed(out, estimate.config, f)
    out.assumptions += estimate.notes
    return out


def project_all(configs: Mapping[str, TuneConfig], target_model: str, gpu: str) -> dict[str, Projection]:
    """Every config projected to the same target and GPU, the target's model config read once; a config that
    cannot apply, or a target that cannot be read, gives a Projection with `error` instead of raising."""
    from nbtune.estimator.catalogue import model_config_for

    if not configs:
        return {}
    try:
        model_config = model_config_for(next(iter(configs.values())).replace(**{"model.name_or_path": target_model}))
    except ValueError as error:
        return {name: Projection(target_model, gpu, error=str(error)) for name in configs}
    return {name: project(config, target_model, gpu, model_config) for name, config in configs.items()}


def step_flops(estimate: MemoryEstimate, f: Facts) -> tuple[float, list[str]]:
    """Training FLOPs per token of an estimated config (`f`: its skeleton's facts), with their assumptions.

    Forward 2·N (N every parameter, the adapter's included), activation gradients 2·N through the blocks the
    backward runs through, weight gradients 2·N_trainable, recomputation 2·N under gradient checkpointing,
    attention scores and their backward (PaLM's count, over the whole sequence), and a teacher's forward.
    Virtual tokens (prompt tuning) cost compute but are not counted as tokens.
    """
    config = estimate.config
    assert config is not None  # an estimate of a config carries it
    n, n_trainable = estimate.total_params, estimate.trainable_params
    share = len(f.layers) / f.total_layers if f.total_layers else 0.0  # blocks the backward runs through
    checkpointing = config.training.gradient_checkpointing or f.forced_checkpointing
    length = config.data.max_length + f.virtual_tokens
    attention = 4 * f.total_layers * (length + f.prefix_tokens) * f.dims["q"]  # QKᵀ and AV, forward
    recompute = share if checkpointing else 0.0
    # a matmul's backward: the input's gradient (as the forward) and, only where the weight trains, its own;
    # attention has no weights but both of its inputs need gradients
    weights = 2 * n * (1 + share + recompute) + 2 * n_trainable
    teacher = 2 * f.teacher_bytes / BYTES[config.model.dtype] if f.teacher_bytes else 0
    per_token = weights + attention * (1 + 2 * share + recompute) + teacher
    notes = [f"estimate: step time from FLOPs (parameter counts) at MFU {MFU:.0%} of the GPU's peak, assumed, "
             "not measured",
             f"every sequence counted at max_length {config.data.max_length} (padding included)"]
    if checkpointing:
        notes.append("gradient checkpointing recomputes the forward of every block the backward runs through")
    return per_token * length / config.data.max_length, notes


def _add_speed(out: Projection, config: TuneConfig, f: Facts) -> None:
    """Step time and tokens per second from the FLOPs, the GPU's peak and the assumed MFU (None when unknown)."""
    peak = peak_tflops(out.gpu)
    if peak is None:
        out.assumptions.append(f"no step time: the peak compute of {out.gpu} is unknown")
        return
    if config.training.precision == "fp32":
        out.assumptions.append("no step time: fp32 training, and the GPU table holds only 16-bit peaks")
        return
    t = config.training
    tokens = t.micro_batch_size * t.gradient_accumulation_steps * config.data.max_length
    seconds = tokens * (out.flops_per_token or 0.0) / (peak * 1e12 * MFU)
    if f.quant_bits:
        seconds *= QUANTIZED_SLOWDOWN
        out.assumptions.append(f"quantized base: steps assumed {QUANTIZED_SLOWDOWN - 1:.0%} slower "
                               "(dequantization), not measured")
    out.step_time_s, out.tokens_per_s = seconds, tokens / seconds
