"""The simulated tier: one real training step of the actual model code on fake tensors, with its memory tracked.

The model and method are built on the meta device; inside torch's FakeTensorMode every parameter and buffer is
replaced by an empty fake tensor of the same shape, dtype and requires_grad, and a dispatch mode counts each
storage's bytes from the op that first returns it until its last tensor is collected. Two steps run (forward,
backward, gradient clipping, optimizer step), so the second sees steady-state optimizer state; no real memory
is used, so a 7B step "runs" on a laptop in seconds.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from nbtune.config import TuneConfig
from nbtune.estimator.estimate import CUDA_CONTEXT, FRAGMENTATION, WORKSPACE, MemoryEstimate
from nbtune.estimator.gpus import gpu_bytes
from nbtune.estimator.skeleton import build_model, facts
from nbtune.precision import for_plan


def _tracker_class() -> type:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

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

    return StorageTracker


def _optimizer(config: TuneConfig, params: list[Any], fused: bool) -> tuple[Any, list[str]]:
    import torch

    t, notes = config.training, []
    lr = 1e-4
    if t.optimizer == "adamw":
        return (torch.optim.AdamW(params, lr=lr, fused=True) if fused else
                torch.optim.AdamW(params, lr=lr, foreach=True)), notes
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True), notes
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False), notes
    # bitsandbytes kernels cannot run on fake tensors: an AdamW stand-in with states of bitsandbytes' sizes
    notes.append(f"{t.optimizer}: bitsandbytes kernels cannot run on fake tensors; its states are allocated at "
                 "bitsandbytes' sizes and the update is not simulated")
    return None, notes


def _bnb_states(config: TuneConfig, params: list[Any]) -> list[Any]:
    import torch

    states = []
    for p in params:
        if "8bit" in config.training.optimizer and p.numel() >= 4096:
            states += [torch.empty(p.shape, dtype=torch.uint8), torch.empty(p.shape, dtype=torch.uint8),
                       torch.empty(2 * (p.numel() // 256 + 1), dtype=torch.float32)]
        else:
            states += [torch.empty(p.shape, dtype=torch.float32), torch.empty(p.shape, dtype=torch.float32)]
    return states


def simulate_memory(config: TuneConfig | None = None, model_config: Any = None, gpu: str | int | float | None = None,
                    *, steps: int = 2, fused_optimizer: bool = False) -> MemoryEstimate:
    """Peak memory of real training steps of `config`, simulated on fake tensors (the simulated tier).

    QLoRA runs with 16-bit stand-ins for the 4-bit weights (bitsandbytes kernels need real memory); their bytes
    are counted at 4-bit size plus quantization constants, and the inputs its matmuls save are not seen.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nbtune.estimator.catalogue import model_config_for

    started = time.perf_counter()
    config = config or TuneConfig()
    if model_config is None:
        model_config = model_config_for(config)
    config, plan_notes = for_plan(config, model_config, gpu)  # "auto" as on the chosen GPU
    f = facts(config, model_config)
    model, info = build_model(config, model_config, "meta")
    model.train()
    t = config.training
    if t.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = info["ctx"].extras.get("teacher")
    notes: list[str] = list(plan_notes)
    Tracker = _tracker_class()
    tracker = Tracker()
    quantized_ids = info["quantized_ids"]
    # The Trainer autocasts whenever bf16/fp16 is set, 16-bit weights included: peft keeps adapters in fp32, and
    # without autocast their inputs would be fp32 copies (measure.py's real steps autocast the same way)
    autocast = t.precision in ("fp16", "bf16")
    b, s = t.micro_batch_size, config.data.max_length
    vocab = int(model_config.vocab_size)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, tracker, _cuda_dropout():
        swapped: dict[int, Any] = {}
        quant_keys: set[int] = set()
        tracker.category = "weights"
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
        trainable = [p for p in swapped.values() if p.requires_grad]
        optimizer, opt_notes = _optimizer(config, trainable, fused_optimizer)
        notes += opt_notes
        tracker.category = "activations"
        ids = torch.zeros((b, s), dtype=torch.long)
        # An all-ones mask is dropped by transformers on real tensors (SDPA then runs causal, without a 4D mask and
        # with GQA inside the kernel); a fake tensor's values cannot be inspected, so pass none for causal LMs
        mask = torch.ones((b, s), dtype=torch.long) if config.model.task != "causal-lm" else None
        task = config.model.task
        labels = torch.zeros((b,), dtype=torch.long) if task == "seq-cls" else ids
        tracker.logits_numel = b * s * vocab if task != "seq-cls" else 0
        state_keys: set[int] = set()
        grad_keys: set[int] = set()
        for step in range(steps):
            if step == steps - 1:
                tracker.phase = "forward end"
                tracker.reset_peak()
            tracker.category = "activations"
            ctx = torch.autocast("cpu", dtype=torch.bfloat16 if t.precision == "bf16" else torch.float16) \
                if autocast else _null()
            with ctx:
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
            tracker.phase = "backward"
            loss.backward()
            del loss
            grad_keys = {tracker.key(p.grad) for p in trainable if p.grad is not None}
            tracker.phase = "optimizer step"
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm, foreach=True)
            if optimizer is not None:
                optimizer.step()
                state_keys = {tracker.key(v) for st in optimizer.state.values() for v in st.values()
                              if isinstance(v, torch.Tensor) and v.dim() > 0}
            else:
                if step == 0:
                    tracker.category = "optimizer_state"
                    bnb_states = _bnb_states(config, trainable)
                    state_keys = {tracker.key(v) for v in bnb_states}
            if step < steps - 1:
                for p in trainable:
                    p.grad = None
        peak, keys, phase = tracker.peak, dict(tracker.peak_keys), tracker.peak_phase
        live_cats = dict(tracker.peak_cats)
    del fake_mode

    breakdown = dict.fromkeys(("weights", "trainable_weights", "gradients", "optimizer_state", "activations",
                               "logits_loss", "quantization_constants", "fixed_overhead"), 0)
    for key, nbytes in keys.items():
        if key in grad_keys:
            cat = "gradients"
        elif key in state_keys:
            cat = "optimizer_state"
        else:
            cat = live_cats.get(key, "activations")
        breakdown[cat if cat in breakdown else "activations"] += nbytes
    if quant_keys and f.quant_bits:
        standin = sum(keys.get(k, 0) for k in quant_keys)
        q = f.quantized_params
        real = q // 2 if f.quant_bits == 4 else q
        breakdown["weights"] -= standin - real
        breakdown["quantization_constants"] = (q // 64 + q // 64 // 256 * 4) if f.quant_double else q // 64 * 4
        peak += real - standin + breakdown["quantization_constants"]
        notes.append("4-bit weights simulated by 16-bit stand-ins, counted at 4-bit size")
    dynamic = breakdown["gradients"] + breakdown["activations"] + breakdown["logits_loss"]
    breakdown["fixed_overhead"] = WORKSPACE + CUDA_CONTEXT + int(FRAGMENTATION * dynamic)
    allocated = int(peak + WORKSPACE)
    notes.append(f"simulated {steps} steps in {time.perf_counter() - started:.1f} s")
    if gpu is not None:
        gpu_bytes(gpu)
    return MemoryEstimate(
        total_bytes=sum(breakdown.values()), breakdown=breakdown, peak_phase=phase, phases={},
        trainable_params=f.trainable_params, total_params=f.total_params, allocated_bytes=allocated,
        reserved_bytes=allocated + int(FRAGMENTATION * dynamic), tier="simulated",
        gpu=str(gpu) if gpu is not None else None, notes=notes, config=config, model_config=model_config)


class _cuda_dropout:
    """Dropout as CUDA runs it: one fused kernel that saves a 1-byte mask.

    On CPU, torch decomposes dropout into a noise tensor of the input's dtype that the backward keeps (4 bytes per
    element in fp32); the simulation models the GPU, so while it runs F.dropout goes through aten.native_dropout.
    """

    def __enter__(self) -> None:
        import torch
        import torch.nn.functional as F

        self.original = F.dropout

        def dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
            if not training or p == 0:
                return input
            return torch.native_dropout(input, p, True)[0]

        F.dropout = dropout

    def __exit__(self, *exc: Any) -> None:
        import torch.nn.functional as F

        F.dropout = self.original


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
