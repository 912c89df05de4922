"""Attention per packed example on any device: what `training.packing` runs under `model.attn_implementation`
sdpa, and the one table (`PACKED`) of what packing does under each attention implementation.

Under sdpa a packed micro-batch is one row of examples end to end. transformers would give sdpa that row's full
(row x row) mask, so attention would cost the row's square; here the model is loaded with an attention
function of its own (registered with transformers' AttentionInterface and AttentionMaskInterface) that runs
torch's scaled_dot_product_attention causally on each example, examples of equal length batched together, so
attention costs sum(len_i^2) as flash-attention's varlen kernel does on a GPU. No (row x row) mask is built:
the mask step hands the attention a (rows, tokens) tensor naming each token's example. Everything else (a
padding mask, a cache, generation, sliding windows, overlays, fake tensors, torch.compile) goes to
transformers' own sdpa, unchanged.

The library offers nothing that does this on CPU with torch 2.13 (measured 2026-12-02):
`torch.nn.attention.varlen.varlen_attn` calls aten::_flash_attention_forward, which has no CPU kernel;
FlexAttention (attn_implementation "flex_attention", a document mask) has no CPU backward ("FlexAttention does
not support backward on CPU"); nested (jagged) tensors reach sdpa only without is_causal.

Examples of one length share a call without any copy (the collator's row is longest first, so they are
adjacent). Sharing calls between nearly equal lengths, right-padded, was measured slower on nbtune:chat (the
gathers cost more than the calls they save): 4.4 ms per layer's forward and backward exact, 5.1-6.0 padded to
4-32 tokens, 5.1 for the padded batch's own sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbtune.config import TuneConfig

NAME = "nbtune_packed_sdpa"  # the attn_implementation transformers knows the per-example attention by


@dataclass(frozen=True)
class PackedAttention:
    """What `training.packing` does under one `model.attn_implementation`."""

    loads_as: str  # the attn_implementation the model is loaded with while it packs
    one_row: bool  # the whole micro-batch in one row; else rows as long as its longest example
    attention_cost: str  # what a packed micro-batch's attention computes, in words


PACKED = {
    "sdpa": PackedAttention(NAME, True, "each example's own causal square (sum of len^2), torch sdpa per group of "
                                        "equal-length examples"),
    "eager": PackedAttention("eager", False, "each row's full masked square: rows no longer than the longest "
                                             "example, so no row costs more than the padded batch"),
    "flash_attention_2": PackedAttention("flash_attention_2", True, "each example's own causal square (sum of "
                                                                    "len^2), flash-attention varlen"),
}


def packs(config: TuneConfig) -> bool:
    """Whether training packs its examples: `training.packing`, and the stage reads it (sft)."""
    from nbtune import stages

    return config.training.packing and "packing" in stages.for_config(config).reads


def attn_implementation(config: TuneConfig) -> str:
    """The attn_implementation the config's model is loaded with: `model.attn_implementation`, or, when it
    packs, what PACKED says (the per-example attention registered here for sdpa)."""
    chosen = config.model.attn_implementation
    if not packs(config):
        return chosen
    loads_as = PACKED[chosen].loads_as
    if loads_as == NAME:
        register()
    return loads_as


def register() -> None:
    """Make NAME known to transformers (its attention function and its mask step); repeating it is harmless."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)


def packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                     mask_function: Any = None, attention_mask: Any = None, local_size: int | None = None,
                     allow_is_causal_skip: bool = True, use_vmap: bool = False, device: Any = "cpu",
                     **kwargs: Any) -> Any:
    """The mask step: for packed rows of plain causal self-attention, each token's example (`example_ids`);
    for anything else, sdpa's own mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    # transformers lets sdpa skip the mask (is_causal) unless it found position-id restarts or overlays
    plain_causal_packed = (attention_mask is None and not allow_is_causal_skip and not use_vmap
                           and local_size is None and _is_zero(q_offset) and _is_zero(kv_offset)
                           and q_length == kv_length > 1)
    ids = example_ids(mask_function, batch_size, q_length, device) if plain_causal_packed else None
    if ids is not None:
        return ids
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap,
                     device=device, **kwargs)


def example_ids(mask_function: Any, rows: int, length: int, device: Any) -> Any:
    """(rows, length) int64: which example of its row each token is in (0, 1, ...), read from the mask function
    transformers made (causal, and the same sequence by position-id restarts); None when the mask is not
    purely causal within examples, or no row holds more than one example."""
    import torch
    from transformers.utils.import_utils import is_tracing

    b = torch.arange(rows, device=device)[:, None]
    if is_tracing(b):  # torch.compile, export, fake tensors: values cannot be read
        return None
    head = torch.zeros((), dtype=torch.long, device=device)
    q = torch.arange(1, length, device=device)[None, :]
    sees_previous = mask_function(b, head, q, q - 1).expand(rows, length - 1)
    sees_next = mask_function(b, head, q - 1, q)
    if bool(sees_next.any()) or bool(sees_previous.all()):
        return None  # attends forward (not causal), or one example per row: sdpa's own mask or is_causal
    starts = torch.cat([torch.ones((rows, 1), dtype=torch.long, device=device), (~sees_previous).long()], dim=1)
    return starts.cumsum(dim=1) - 1


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """The attention function: causal sdpa on each example when the mask step named the examples, else
    transformers' sdpa as is. Shapes as transformers' attention functions: (batch, heads, tokens, dim) in,
    (batch, tokens, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _names_examples(attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"training.packing cannot run {type(module).__name__} under model.attn_implementation "
                         "sdpa: its attention softcaps its scores or adds a position bias, which sdpa does not "
                         "compute; choose model.attn_implementation eager")
    return attend_per_example(query, key, value, attention_mask, dropout, scaling), None


def attend_per_example(query: Any, key: Any, value: Any, ids: Any, dropout: float = 0.0,
                       scaling: float | None = None) -> Any:
    """Causal attention of each example alone (examples of one length in one sdpa call), back in the row's
    order: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    import torch

    rows, heads, tokens, _ = query.shape
    order, lengths, counts = _groups(ids)
    # (heads, rows * tokens, dim): a view for one row; tokens reordered only if equal lengths are not adjacent
    q, k, v = (x.transpose(0, 1).reshape(x.shape[1], rows * tokens, x.shape[3]) for x in (query, key, value))
    if order is not None:
        q, k, v = (x.index_select(1, order) for x in (q, k, v))
    sizes = [length * count for length, count in zip(lengths, counts, strict=True)]
    outputs = []
    # split, not slicing: its backward is one concatenation, where each slice's would be a zero-filled copy
    for length, count, *block in zip(lengths, counts, *(x.split(sizes, dim=1) for x in (q, k, v)), strict=True):
        block = [x.unflatten(1, (count, length)).transpose(0, 1) for x in block]
        out = torch.nn.functional.scaled_dot_product_attention(
            *block, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=heads != key.shape[1])
        outputs.append(out.transpose(1, 2).reshape(length * count, heads, value.shape[3]))
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(0, inverse)
    return out.view(rows, tokens, heads, value.shape[3])


def _groups(ids: Any) -> tuple[Any, list[int], list[int]]:
    """The examples grouped by length, longest first: the token order that makes each group one block (None
    when they already are, as the packing collator's one row puts them), the lengths and how many of each.
    Computed once per forward: the mask step's tensor carries it to every layer."""
    cached = getattr(ids, "nbtune_groups", None)
    if cached is not None:
        return cached
    import torch

    rows, tokens = ids.shape
    unique = (ids + torch.arange(rows, device=ids.device)[:, None] * tokens).flatten()
    _, sizes = torch.unique_consecutive(unique, return_counts=True)
    lengths, counts = torch.unique(sizes, sorted=True, return_counts=True)
    order = None
    if bool((sizes[1:] > sizes[:-1]).any()):
        by_length = torch.argsort(sizes, descending=True, stable=True)
        starts, sorted_sizes = (sizes.cumsum(0) - sizes)[by_length], sizes[by_length]
        offsets = torch.repeat_interleave(sorted_sizes.cumsum(0) - sorted_sizes, sorted_sizes)
        order = torch.repeat_interleave(starts, sorted_sizes) + torch.arange(ids.numel(), device=ids.device) - offsets
    groups = (order, lengths.flip(0).tolist(), counts.flip(0).tolist())
    ids.nbtune_groups = groups
    return groups


def _names_examples(attention_mask: Any) -> bool:
    """Whether the mask step handed over example ids (an int64 (rows, tokens) tensor), not a mask (4D)."""
    import torch

    return attention_mask is not None and attention_mask.ndim == 2 and attention_mask.dtype == torch.long


def _is_zero(offset: Any) -> bool:
    """An offset of 0 as a Python int (a static cache gives a tensor: a cache, not a packed batch)."""
    return isinstance(offset, int) and offset == 0
