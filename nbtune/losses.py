"""The causal-LM loss of a supervised run (`training.loss_implementation`): transformers' own over the full
logits ("standard"), nbtune's chunked cross-entropy ("chunked"), or Liger's fused kernels ("liger", CUDA).

"chunked" takes the final hidden states from the model's own forward (asked for no logits: `logits_to_keep`
an empty index) and scores them a chunk of positions at a time through the LM head; each chunk runs under
torch.utils.checkpoint, so its logits are freed at once and recomputed, one chunk at a time, in the backward.
The (tokens x vocab) logits never exist, and the loss and gradients are the standard path's: the same label
shift, -100 ignored, the mean over the micro-batch's trained tokens (or over the accumulated batch's,
`num_items_in_batch`, as transformers divides). "liger" is
liger-kernel's fused linear cross-entropy with its RMSNorm, RoPE and SwiGLU kernels, applied by transformers'
Trainer (`use_liger_kernel`); without liger-kernel, without CUDA or for a model family it has no kernels for,
the run computes the loss chunked instead and says why (`choose`). Importing this module imports no torch.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbtune import stages

if TYPE_CHECKING:
    from nbtune.config import TuneConfig

IMPLEMENTATIONS = ("standard", "chunked", "liger")
IGNORE_INDEX = -100  # the label of a position no loss is computed for (nbtune/data.py, transformers)


@dataclass(frozen=True)
class Choice:
    """What training.loss_implementation became for this run, and why, when that is not what was asked."""

    value: str
    reason: str | None = None  # a fallback in words ("liger-kernel is not installed ..."), None otherwise


def requested(config: TuneConfig) -> str:
    """The loss implementation a config asks for: its training.loss_implementation where the stage reads it
    (sft), "standard" for the stages scored by TRL's own loss."""
    if "loss_implementation" in stages.for_config(config).reads:
        return config.training.loss_implementation
    return "standard"


def chunk_tokens(tokens: int, vocab: int, hidden: int, implementation: str = "chunked") -> int:
    """Tokens scored per chunk: the tokens split into ceil(vocab / hidden) chunks, so one chunk's logits hold
    about as many numbers as the hidden states (Liger's rule, liger_kernel/ops/fused_linear_cross_entropy.py,
    which rounds the chunk up to a power of two, at most all the tokens)."""
    if tokens <= 0:
        return 0
    size = math.ceil(tokens / max(1, math.ceil(vocab / max(hidden, 1))))
    return min(1 << (size - 1).bit_length(), tokens) if implementation == "liger" else size


def choose(requested: str, model: Any, on_gpu: bool) -> Choice:
    """The loss this run computes for `requested` (validated for the config already): liger where liger-kernel
    imports, the run is on CUDA and liger has kernels for the model's family; chunked otherwise, with why."""
    if requested == "standard":
        return Choice("standard")
    why_not = _liger_unavailable(model, on_gpu) if requested == "liger" else None
    if requested == "liger" and why_not is None:
        return Choice("liger")
    _check_chunkable(model)
    if why_not is None:
        return Choice("chunked")
    return Choice("chunked", f"training.loss_implementation liger: {why_not}; the loss is computed chunked")


def _liger_unavailable(model: Any, on_gpu: bool) -> str | None:
    """Why liger's kernels cannot train this model here, or None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'nbtune[gpu]')"
    if not on_gpu:
        return "its Triton kernels need a CUDA GPU and this run is on CPU"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as err:  # a broken install (e.g. no triton) must not fail the run: it trains chunked
        return f"liger-kernel did not import ({type(err).__name__}: {err})"
    model_type = getattr(_base(model).config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type {model_type}"
    return None


def _base(model: Any) -> Any:
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_chunkable(model: Any) -> None:
    """Refuse, naming the field, a model whose forward cannot hand over its final hidden states without logits."""
    base = _base(model)
    text = base.config.get_text_config()
    problem = None
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        problem = f"{type(base).__name__}'s forward takes no logits_to_keep, so it would compute every logit"
    elif getattr(text, "tie_last_hidden_states", True) is False:
        problem = f"{type(base).__name__}'s last hidden states are not the ones its LM head reads"
    if problem:
        raise ValueError(f"training.loss_implementation chunked cannot train this model: {problem}; "
                         "set training.loss_implementation to standard")


def chunked_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, dict[str, Any]]:
    """The causal-LM loss of `inputs` (with "labels") computed chunked; (loss, outputs without logits)."""
    import torch

    labels = inputs["labels"]
    nothing = torch.empty(0, dtype=torch.long, device=labels.device)  # no position's logits from the model
    # Only the last hidden states: under mixed precision accelerate copies every 16-bit output of the forward to
    # fp32 (convert_outputs_to_fp32), all the layers' too if they were asked for (a transformers before the index
    # selection reads [-1] as true, and returns them all: the same loss, more memory)
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=nothing,
                    output_hidden_states=[-1])
    base = _base(model)
    scale, softcap = head_transform(base.config.get_text_config())
    loss = chunked_cross_entropy(outputs.hidden_states[-1], labels, base.get_output_embeddings(),
                                 num_items_in_batch, scale=scale, softcap=softcap)
    return loss, {"loss": loss}


def head_transform(text_config: Any) -> tuple[float, float | None]:
    """(scale, softcap) a model's forward applies to its LM head's output, read from its config as TRL's fused
    head reads them (trl.trainer.utils.add_fused_lm_head): Cohere's logit_scale, Granite's 1/logits_scaling,
    Falcon-H1's lm_head_multiplier, Gemma 2/3's final_logit_softcapping."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


def chunked_cross_entropy(hidden: Any, labels: Any, head: Any, num_items_in_batch: Any = None, *,
                          scale: float = 1.0, softcap: float | None = None) -> Any:
    """Next-token cross-entropy of `labels` from the final `hidden` states (batch, positions, hidden) through
    the LM `head`, a chunk of positions at a time. Positions the labels do not cover (virtual tokens a prompt
    method prepends) are not trained, as PEFT labels them. Every position is scored, as the standard loss does:
    selecting the trained ones would need their count on the host (a sync per step, and no fake tensors)."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[1] > labels.shape[1]:
        labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)  # position t predicts label t+1
    flat = hidden.reshape(-1, hidden.shape[-1])
    size = chunk_tokens(flat.shape[0], head.weight.shape[0], flat.shape[1])
    total = sum(checkpoint(_chunk_loss, part, target, head, scale, softcap, use_reentrant=False)
                for part, target in zip(flat.split(size), targets.split(size), strict=True))
    divisor = targets.ne(IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return total / (divisor.to(total.device) if hasattr(divisor, "to") else divisor)


def _chunk_loss(hidden: Any, target: Any, head: Any, scale: float, softcap: float | None) -> Any:
    """Summed cross-entropy of one chunk, its logits upcast to fp32 as transformers' ForCausalLMLoss does."""
    import torch
    import torch.nn.functional as F

    logits = head(hidden)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), target, reduction="sum", ignore_index=IGNORE_INDEX)
