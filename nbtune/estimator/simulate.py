"""The simulated tier: one real training step of the actual model code on fake tensors, with its memory tracked.

The model and method are built on the meta device; inside torch's FakeTensorMode every parameter and buffer is
replaced by an empty fake tensor of the same shape, dtype and requires_grad, and a dispatch mode counts each
storage's bytes from the op that first returns it until its last tensor is collected. Two steps run (forward,
backward, gradient clipping, optimizer step), so the second sees steady-state optimizer state; no real memory
is used, so a 7B step "runs" on a laptop in seconds. This module imports torch: `nbtune.estimator` reaches it
only when `simulate_memory` is first used.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nbtune import losses, stages
from nbtune.config import TuneConfig
from nbtune.estimator.estimate import (
    CATEGORIES,
    CUDA_CONTEXT,
    FRAGMENTATION,
    WORKSPACE,
    MemoryEstimate,
    plan,
    quantized_bytes,
    sequence_tokens,
    sequences_per_micro_batch,
    terms,
)
from nbtune.estimator.measure import make_optimizer
from nbtune.estimator.skeleton import Facts, build_model
from nbtune.optimizers import OPTIMIZERS
from nbtune.tasks import TASKS


class StorageTracker(TorchDispatchMode):
    """Counts live storage bytes; remembers which storages were live at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[Any]] = {}  # storage key -> [bytes, live tensors, category, serial]
        self.serial = 0  # storage addresses are reused; serials name a storage once and for all
        self.tensors: dict[int, int] = {}  # id(tensor) -> storage key
        self.current = self.peak = 0
        self.peak_keys: dict[int, int] = {}  # serial -> bytes of the storages live at the peak
        self.peak_cats: dict[int, str] = {}
        self.peak_phase = ""
        self.phase = "forward end"
        self.category = "activations"
        self.logits_numel = 0

    def track(self, t: Any, category: str | None = None) -> None:
        if id(t) in self.tensors:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        self.tensors[id(t)] = key
        weakref.finalize(t, self._release, id(t), key)
        entry = self.live.get(key)
        if entry is not None:
            entry[1] += 1
            return
        cat = category or self.category
        if cat == "activations" and self.logits_numel and t.numel() >= self.logits_numel:
            cat = "logits_loss"
        self.serial += 1
        self.live[key] = [storage.nbytes(), 1, cat, self.serial]
        self.current += storage.nbytes()
        if self.current > self.peak:
            self.peak = self.current
            if self.current > 1.002 * sum(self.peak_keys.values()) or self.phase != self.peak_phase:
                self.peak_keys = {v[3]: v[0] for v in self.live.values()}
                self.peak_cats = {v[3]: v[2] for v in self.live.values()}
                self.peak_phase = self.phase

    def _release(self, tensor_id: int, key: int) -> None:
        self.tensors.pop(tensor_id, None)
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_keys = {v[3]: v[0] for v in self.live.values()}
        self.peak_cats = {v[3]: v[2] for v in self.live.values()}
        self.peak_phase = self.phase

    def key(self, t: Any) -> int:
        """The serial of the live storage under a tensor."""
        entry = self.live.get(t.untyped_storage()._cdata)
        return entry[3] if entry is not None else -1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def _optimizer(config: TuneConfig, params: list[Any], fused: bool) -> tuple[Any, list[str]]:
    name = config.training.optimizer
    if OPTIMIZERS[name].bitsandbytes_class is None:
        return make_optimizer(config, params, foreach=True, fused=fused), []
    # bitsandbytes kernels cannot run on fake tensors: an AdamW stand-in with states of bitsandbytes' sizes
    return None, [f"{name}: bitsandbytes kernels cannot run on fake tensors; its states are allocated at "
                  "bitsandbytes' sizes and the update is not simulated"]


def _bnb_states(config: TuneConfig, params: list[Any]) -> list[Any]:
    states = []
    for p in params:
        if OPTIMIZERS[config.training.optimizer].eight_bit and p.numel() >= 4096:
            states += [torch.empty(p.shape, dtype=torch.uint8), torch.empty(p.shape, dtype=torch.uint8),
                       torch.empty(2 * (p.numel() // 256 + 1), dtype=torch.float32)]
        else:
            states += [torch.empty(p.shape, dtype=torch.float32), torch.empty(p.shape, dtype=torch.float32)]
    return states


def simulate_memory(config: TuneConfig | None = None, model_config: Any = None, gpu: str | int | float | None = None,
                    *, steps: int = 2, fused_optimizer: bool = False) -> MemoryEstimate:
    """Peak memory of real training steps of `config`, simulated on fake tensors (the simulated tier).

    QLoRA runs with 16-bit stand-ins for the 4-bit weights (bitsandbytes kernels need real memory); their bytes
    are counted at 4-bit size plus quantization constants, and the inputs its matmuls save are not seen. A stage
    scored through TRL's fused head runs it, and its reference's no-grad forward; a reference copy and the
    generation of completions are not simulated: their bytes are the instant tier's, counted beside the step.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    config, model_config, f, notes = plan(config, model_config, gpu)
    if TASKS[config.model.task].inputs != "text":
        raise ValueError(f"the simulated tier runs text models; model.task {config.model.task} is estimated by the "
                         "instant tier (estimate_memory), which tests check against real CPU steps")
    if losses.requested(config) == "liger":
        notes.append("liger's fused loss is simulated as the chunked loss (its Triton kernels need real tensors)")
    if config.distributed.strategy != "none":
        notes.append(f"simulated as one process holding the whole model: the per-GPU terms of distributed.strategy "
                     f"{config.distributed.strategy} are the instant tier's")
    model, info = build_model(config, model_config, "meta")
    model.train()
    if config.training.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = info["ctx"].extras.get("teacher")
    if stages.for_config(config).fused_log_probs:
        _add_fused_head(model)
    tracker = StorageTracker()
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, tracker, _cuda_dropout(), _triton_tiles():
        trainable, quant_keys = _fake_parameters(model, teacher, tracker, info["quantized_ids"])
        optimizer, opt_notes = _optimizer(config, trainable, fused_optimizer)
        notes += opt_notes
        seen = _run_steps(config, model, teacher, optimizer, trainable, tracker, int(model_config.vocab_size), steps)
    del fake_mode
    breakdown, peak = _breakdown(tracker, seen), tracker.peak
    if quant_keys and f.quant_bits:
        peak += _count_quantized_at_real_size(breakdown, f, sum(tracker.peak_keys.get(k, 0) for k in quant_keys))
        notes.append("4-bit weights simulated by 16-bit stand-ins, counted at 4-bit size")
    peak += _count_stage_extras(config, f, breakdown)
    dynamic = sum(breakdown[c] for c in ("gradients", "optimizer_step", "activations", "logits_loss", "generation"))
    breakdown["fixed_overhead"] = WORKSPACE + CUDA_CONTEXT + int(FRAGMENTATION * dynamic)
    allocated = int(peak + WORKSPACE)
    notes.append(f"simulated {steps} steps in {time.perf_counter() - started:.1f} s")
    return MemoryEstimate(
        total_bytes=sum(breakdown.values()), breakdown=breakdown, peak_phase=tracker.peak_phase, phases={},
        trainable_params=f.trainable_params, total_params=f.total_params, allocated_bytes=allocated,
        reserved_bytes=allocated + int(FRAGMENTATION * dynamic), tier="simulated",
        gpu=str(gpu) if gpu is not None else None, notes=notes, config=config, model_config=model_config)


def _add_fused_head(model: Any) -> None:
    """TRL's fused LM head, on the model as DPOTrainer patches it (the base model under a PEFT wrapper)."""
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model() if is_peft_model(model) else model,
                      outputs=("log_probs", "entropy", "mean_logits", "is_top1"))


def _count_stage_extras(config: TuneConfig, f: Facts, breakdown: dict[str, int]) -> int:
    """The stage's reference copy, held through the step, and its generation phase when that is higher than
    the simulated peak (it holds no activations): the instant tier's terms. Returns the peak's change."""
    t = terms(config, f)
    breakdown["reference_model"] = t.weights.reference
    added = t.weights.reference
    dynamic = ("gradients", "optimizer_step", "activations", "logits_loss")
    if t.generation.total > sum(breakdown[c] for c in dynamic):
        added += t.generation.total - sum(breakdown[c] for c in dynamic)
        breakdown.update(dict.fromkeys(dynamic, 0), generation=t.generation.total)
    return added


def _fake_parameters(model: Any, teacher: Any, tracker: Any, quantized_ids: set[int]) -> tuple[list[Any], set[int]]:
    """Replace every parameter and buffer (of the model and a teacher) by an empty fake tensor of its shape.

    Returns the trainable parameters and the storage keys of the stand-ins for weights bitsandbytes quantizes.
    """
    swapped: dict[int, Any] = {}
    quant_keys: set[int] = set()
    modules = list(model.modules()) + (list(teacher.modules()) if teacher is not None else [])
    for module in modules:
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in swapped:
                tracker.category = "trainable_weights" if p.requires_grad else "weights"
                new = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                swapped[id(p)] = new
                if id(p) in quantized_ids:
                    quant_keys.add(tracker.key(new))
            module._parameters[name] = swapped[id(p)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                tracker.category = "weights"
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype)
    return [p for p in swapped.values() if p.requires_grad], quant_keys


@dataclass
class _Seen:
    """The storages of the last step that are gradients and optimizer state (for the breakdown)."""

    gradients: set[int] = field(default_factory=set)
    optimizer_state: set[int] = field(default_factory=set)


def _run_steps(config: TuneConfig, model: Any, teacher: Any, optimizer: Any, trainable: list[Any], tracker: Any,
               vocab: int, steps: int) -> _Seen:
    """Forward, backward, clipping and optimizer step, `steps` times; the peak is reset before the last one."""
    t = config.training
    task = config.model.task
    b, s = sequences_per_micro_batch(config), sequence_tokens(config)
    tracker.category = "activations"
    ids = torch.zeros((b, s), dtype=torch.long)
    # An all-ones mask is dropped by transformers on real tensors (SDPA then runs causal, without a 4D mask and
    # with GQA inside the kernel); a fake tensor's values cannot be inspected, so pass none for causal LMs
    mask = torch.ones((b, s), dtype=torch.long) if task != "causal-lm" else None
    labels = torch.zeros((b,), dtype=torch.long) if task == "seq-cls" else ids
    tracker.logits_numel = b * s * vocab if task != "seq-cls" else 0
    seen = _Seen()
    for step in range(steps):
        if step == steps - 1:
            tracker.phase = "forward end"
            tracker.reset_peak()
        tracker.category = "activations"
        loss = _forward(config, model, teacher, ids, mask, labels)
        tracker.phase = "backward"
        loss.backward()
        del loss
        seen.gradients = {tracker.key(p.grad) for p in trainable if p.grad is not None}
        tracker.phase = "optimizer step"
        # what clipping and the step allocate is the optimizer-step buffer; the state it creates on the first
        # step and keeps is told apart afterwards (_breakdown reads `seen.optimizer_state`)
        tracker.category = "optimizer_step"
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm, foreach=True)
        if optimizer is not None:
            optimizer.step()
            seen.optimizer_state = {tracker.key(v) for st in optimizer.state.values() for v in st.values()
                                    if isinstance(v, torch.Tensor) and v.dim() > 0}
        elif step == 0:
            tracker.category = "optimizer_state"
            bnb_states = _bnb_states(config, trainable)
            seen.optimizer_state = {tracker.key(v) for v in bnb_states}
        if step < steps - 1:
            for p in trainable:
                p.grad = None
    return seen


def _forward(config: TuneConfig, model: Any, teacher: Any, ids: Any, mask: Any, labels: Any) -> Any:
    """The loss of one forward, under the autocast the Trainer uses, with a teacher's distillation term."""
    precision = config.training.precision
    # The Trainer autocasts whenever bf16/fp16 is set, 16-bit weights included: peft keeps adapters in fp32, and
    # without autocast their inputs would be fp32 copies (measure.py's real steps autocast the same way)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16) \
        if precision in ("fp16", "bf16") else contextlib.nullcontext()
    with autocast:
        if stages.for_config(config).fused_log_probs:
            return _scored_loss(config, model, ids, labels)
        if losses.requested(config) != "standard" and config.model.task == "causal-lm":
            # chunked as a CPU run computes it; liger's Triton kernels cannot run on fake tensors
            return losses.chunked_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})[0]
        outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = outputs.loss
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
            soft = torch.nn.functional.kl_div(
                torch.log_softmax(outputs.logits.float(), -1), torch.log_softmax(teacher_logits.float(), -1),
                reduction="batchmean", log_target=True)
            loss = loss + soft
            del teacher_logits, soft
    del outputs
    return loss


def _scored_loss(config: TuneConfig, model: Any, ids: Any, labels: Any) -> Any:
    """A loss through TRL's fused head, as DPOTrainer computes it: the model's summed log-probabilities, then the
    reference's under no_grad (the model with its adapter disabled; a copy runs the same forward). A generating
    stage scores its reference while preparing the batch, before this forward: not here."""
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import use_adapter

    stage = stages.for_config(config)
    logps = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
    if stage.uses_reference(config) and not stage.generates:
        adapter = use_adapter(model, adapter_name=None) if is_peft_model(model) else contextlib.nullcontext()
        with torch.no_grad(), adapter:
            reference = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)
        logps = logps - reference
    return -torch.nn.functional.logsigmoid(logps).mean()


def _breakdown(tracker: Any, seen: _Seen) -> dict[str, int]:
    """The storages live at the peak, by category (fixed overhead still 0)."""
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for key, nbytes in tracker.peak_keys.items():
        if key in seen.gradients:
            cat = "gradients"
        elif key in seen.optimizer_state:
            cat = "optimizer_state"
        else:
            cat = tracker.peak_cats.get(key, "activations")
        breakdown[cat if cat in breakdown else "activations"] += nbytes
    return breakdown


def _count_quantized_at_real_size(breakdown: dict[str, int], f: Facts, standin: int) -> int:
    """Count the 16-bit stand-ins of quantized weights at their packed size plus constants; the peak's change."""
    real, breakdown["quantization_constants"] = quantized_bytes(f)
    breakdown["weights"] -= standin - real
    return real - standin + breakdown["quantization_constants"]


class _cuda_dropout:
    """Dropout as CUDA runs it: one fused kernel that saves a 1-byte mask.

    On CPU, torch decomposes dropout into a noise tensor of the input's dtype that the backward keeps (4 bytes per
    element in fp32); the simulation models the GPU, so while it runs F.dropout goes through aten.native_dropout.
    """

    def __enter__(self) -> None:
        self.original = torch.nn.functional.dropout

        def dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
            if not training or p == 0:
                return input
            return torch.native_dropout(input, p, True)[0]

        torch.nn.functional.dropout = dropout

    def __exit__(self, *exc: Any) -> None:
        torch.nn.functional.dropout = self.original


class _triton_tiles:
    """TRL's fused head as its Triton kernels run it: each logits tile is folded in place, with no temporaries.

    Without Triton (on CPU), TRL folds a tile with torch ops that hold several fp32 copies of it; the simulation
    models the GPU, so while it runs the folds only leave the tile, whose values a fake tensor does not have.
    """

    def __enter__(self) -> None:
        from trl.kernels import chunked_logprob

        self.module, self.original = chunked_logprob, (chunked_logprob._forward_tile, chunked_logprob._backward_tile)
        chunked_logprob._forward_tile = chunked_logprob._backward_tile = lambda *args, **kwargs: None

    def __exit__(self, *exc: Any) -> None:
        self.module._forward_tile, self.module._backward_tile = self.original
