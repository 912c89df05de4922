"""Activations of a text-to-image model (model.task text-to-image: nbtune/diffusion.py's DiffusionModel, a Stable
Diffusion UNet2DConditionModel trained on the latents of a frozen VAE, given a frozen text encoder's states).

The UNet runs over the latent grid (resolution / the VAE's downscaling, its `sample_size`; positions = side²,
halved at each downsampler), its cross-attentions read the prompt's tokens (the text encoder's positions:
`nbtune/diffusion.py` pads every prompt to the tokenizer's model_max_length, which is that for Stable
Diffusion's CLIP). `units` reads the UNet's modules off the meta-device skeleton in forward order (time
embedding, conv_in, each down block's ResNet and transformer blocks and downsampler, the mid block, each up
block's blocks over the skip connections joined in, and upsampler, the output norm and conv); `activation_terms`
counts what autograd saves for each, read off real CPU steps (tests/test_estimator_text_to_image.py):

- a ResnetBlock2D saves its input and its second norm's input (GroupNorm: fp32 mean and rstd per group), both
  SiLUs' inputs and both 3x3 convs' inputs; its 1x1 shortcut reads the block's input (the same tensor). A conv
  saves its input whenever any of its inputs needs a gradient, its weight frozen or not (a Linear only where
  its weight trains);
- a Transformer2DModel saves its GroupNorm's input, proj_in's and proj_out's inputs; each BasicTransformerBlock
  three LayerNorm inputs (fp32 mean and rstd per token), the q/k/v input (one tensor shared by the trainable
  Linear layers), sdpa's queries, keys, values, output (to_out's input) and fp32 log-sum-exp for the
  self-attention over the latent positions and for the cross-attention (keys and values over the text tokens),
  GEGLU's projection (its whole output: the gate is a view of it) and GELU's output, and the last Linear's input;
- a Downsample2D's conv saves its input, an Upsample2D's conv the nearest-upsampled tensor;
- the loss saves the prediction and the target in fp32;
- under 16-bit autocast every conv and every Linear whose input needs a gradient saves the 16-bit copy of its
  (fp32) weight, frozen or not; the cross-attention keys and values read the text encoder's fp32 states through
  a 16-bit copy each (without autocast, one tensor for all of them);
- LoRA modules (peft) save their dropout's noise (CPU) or mask (CUDA) where their input needs a gradient, their
  input as lora_A reads it (cast to the adapter's dtype, then autocast's 16-bit copy) and lora_B's input.

The VAE encoder and the text encoder run under no_grad: they save nothing; the VAE's widest ResNet block at the
full resolution is the step's largest tensor in flight before the UNet runs (`encoder_transient`).

Measured on a 2-core CPU (torch 2.13, diffusers 0.42.1, peft 0.21.2; tests/test_estimator_text_to_image.py): the
estimate's saved activations equal a real step's autograd-saved tensors to the byte, for full and LoRA, in fp32,
bf16 autocast over fp32 weights and bf16 weights, on UNets of 2 and 3 levels at 16x16 and 32x32 latents, with 1x1
conv or Linear projections and one or two transformer layers a block; a real step's peak beyond the weights and
optimizer state 0.98-1.00. On CUDA the norms run in fp32 under autocast (autocast's fp32 list: their inputs are
saved as fp32 copies, their outputs stay fp32 until the next conv or Linear copies them to 16 bits), a dropout
keeps a 1-byte mask and the norms' statistics are fp32: modelled from those rules, not yet measured on a GPU.

This module imports the estimator's shared pieces lazily; estimate.py reaches it only for this family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nbtune.config import TuneConfig

# (reader, block, in, out, r, dropout, bytes) of one LoRA module: `reader` names what its input is: "self" (the
# self-attention's q/k/v), "self_out", "cross_q", "cross_kv" (the text encoder's states), "cross_out", "ff"
# (GEGLU's projection), "ff_out", "other" (anything else, read at the unit's positions)
Lora = tuple[str, int, int, int, int, float, int]
_READERS = (("attn1.to_q", "self"), ("attn1.to_k", "self"), ("attn1.to_v", "self"), ("attn1.to_out.0", "self_out"),
            ("attn2.to_q", "cross_q"), ("attn2.to_k", "cross_kv"), ("attn2.to_v", "cross_kv"),
            ("attn2.to_out.0", "cross_out"), ("ff.net.0.proj", "ff"), ("ff.net.2", "ff_out"))
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
_CONTEXT = re.compile(r"attn2\.to_[kv]$")  # Linear layers reading the text encoder's states
_ATTENTION = re.compile(r"attn[12]$")
_QKV = re.compile(r"attn[12]\.to_[qkv]$")
UNITS = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")


@dataclass(frozen=True)
class Unit:
    """One module of the UNet's forward, in order, as the activation terms read it."""

    kind: str  # "time", "conv_in", "resnet", "transformer", "down", "up", "out"
    c_in: int
    c_out: int
    side: int  # the latent grid's side at its input
    full: bool  # its own (base) weights train
    input_grad: bool  # its input needs a gradient (something before it in the forward trains)
    copies: int  # elements of the conv/Linear weights whose 16-bit autocast copies its ops save
    lora: tuple[Lora, ...] = ()
    lora_copies: int = 0  # elements of its LoRA weights whose autocast copies are saved
    groups: int = 0  # GroupNorm groups
    heads: int = 0  # attention heads (a transformer)
    blocks: int = 0  # BasicTransformerBlocks (a transformer)
    ff: int = 0  # GEGLU's inner width (a transformer)
    linear_projection: bool = False  # proj_in / proj_out are Linear layers, not 1x1 convs
    shortcut: bool = False  # a ResnetBlock2D's 1x1 conv shortcut
    temb: int = 0  # a ResnetBlock2D's time-embedding width (its time_emb_proj reads it)
    temb_grad: bool = False  # the time embedding trains (every ResNet's projection of it needs a gradient)

    @property
    def trains(self) -> bool:
        return self.full or bool(self.lora)


# ----- the structure, read off the built model (skeleton.read_facts) ----------------------------------------

def units(model: Any) -> tuple[Unit, ...]:
    """The UNet's units in forward order, read off a DiffusionModel (its UNet as the method left it)."""
    unet = model.unet.get_base_model() if hasattr(model.unet, "get_base_model") else model.unet
    time_trains = any(p.requires_grad for p in unet.time_embedding.parameters())
    side = int(unet.config.sample_size)
    out: list[Unit] = [_unit("time", unet.time_embedding, unet.time_embedding.linear_1.in_features,
                             unet.time_embedding.linear_2.out_features, 1, False, False)]
    conv_in = unet.conv_in
    out.append(_unit("conv_in", conv_in, conv_in.in_channels, conv_in.out_channels, side, False, False))
    grad, sides = out[-1].trains, [side]

    def add(kind: str, module: Any, c_in: int, c_out: int) -> None:
        nonlocal grad
        out.append(_unit(kind, module, c_in, c_out, sides[-1], grad, time_trains))
        grad = grad or out[-1].trains

    for block in unet.down_blocks:
        for i, resnet in enumerate(block.resnets):
            _block(add, resnet, getattr(block, "attentions", None), i)
        for down in block.downsamplers or ():
            add("down", down, down.channels, down.out_channels)
            sides.append((sides[-1] - 1) // 2 + 1)  # 3x3, stride 2, padding 1
    mid = unet.mid_block
    if mid is not None:
        _block(add, mid.resnets[0], None, 0)
        for attention, resnet in zip(getattr(mid, "attentions", ()), mid.resnets[1:], strict=True):
            _transformer(add, attention)
            _block(add, resnet, None, 0)
    for block in unet.up_blocks:
        for i, resnet in enumerate(block.resnets):
            _block(add, resnet, getattr(block, "attentions", None), i)
        for up in block.upsamplers or ():
            add("up", up, up.channels, up.out_channels)
            sides.pop()
    tail = [m for m in (unet.conv_norm_out, unet.conv_out) if m is not None]
    add("out", _Modules(tail), unet.conv_out.in_channels, unet.conv_out.out_channels)
    return tuple(out)


class _Modules:
    """A few modules read as one unit (the UNet's output norm, activation and conv)."""

    def __init__(self, modules: list[Any]):
        self.modules = modules

    def named_modules(self) -> list[tuple[str, Any]]:
        return [(f"{i}", m) for i, m in enumerate(self.modules)]

    def parameters(self) -> list[Any]:
        return [p for m in self.modules for p in m.parameters()]


def _check(module: Any) -> None:
    name = type(module).__name__
    if name not in UNITS:
        raise ValueError(f"the memory estimate of text-to-image models covers UNet2DConditionModel's ResNet, "
                         f"transformer, down- and upsampling blocks; this UNet has a {name}")


def _block(add: Any, resnet: Any, attentions: Any, i: int) -> None:
    """A ResNet block, then the transformer beside it (in a cross-attention block)."""
    _check(resnet)
    add("resnet", resnet, resnet.in_channels, resnet.out_channels)
    if attentions is not None:
        _transformer(add, attentions[i])


def _transformer(add: Any, attention: Any) -> None:
    _check(attention)
    add("transformer", attention, attention.in_channels, attention.out_channels or attention.in_channels)


def _unit(kind: str, module: Any, c_in: int, c_out: int, side: int, input_grad: bool, temb_grad: bool) -> Unit:
    copies, lora_copies, lora, full = _walk(module, input_grad, temb_grad)
    extra: dict[str, Any] = {}
    if kind == "resnet":
        extra = {"groups": module.norm1.num_groups, "shortcut": module.conv_shortcut is not None,
                 "temb": module.time_emb_proj.in_features if module.time_emb_proj is not None else 0}
    elif kind == "transformer":
        blocks = module.transformer_blocks
        geglu = blocks[0].ff.net[0]
        if type(geglu).__name__ != "GEGLU":
            raise ValueError(f"the memory estimate of text-to-image models covers GEGLU feed-forwards; this UNet's "
                             f"transformer blocks use {type(geglu).__name__}")
        extra = {"groups": module.norm.num_groups, "heads": blocks[0].attn1.heads, "blocks": len(blocks),
                 "ff": _base(geglu.proj).out_features // 2, "linear_projection": module.use_linear_projection}
    elif kind == "out":
        extra = {"groups": module.modules[0].num_groups if len(module.modules) > 1 else 0}
    return Unit(kind, int(c_in), int(c_out), side, full, input_grad, copies, lora, lora_copies, temb_grad=temb_grad,
                **extra)


def _base(module: Any) -> Any:
    """A peft LoRA layer's wrapped module (or the module itself)."""
    return getattr(module, "base_layer", module)


def _walk(module: Any, input_grad: bool, temb_grad: bool) -> tuple[int, int, tuple[Lora, ...], bool]:
    """(autocast copy elements of its weights and of its LoRA weights, LoRA modules, whether its own weights
    train) of a unit, its modules read in registration order (their forward order): an op's input needs a
    gradient once the unit's input does or something before it in the unit trains; q, k and v read the same
    input, a cross-attention's keys and values the text encoder's states, a ResNet's time projection the time
    embedding."""
    import torch

    copies, lora_copies, lora, full, grad, entry = 0, 0, [], False, input_grad, input_grad
    inside: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        base = _base(m)
        if _ATTENTION.search(name):  # q, k and v read the attention's input side by side
            entry = grad
        x_grad = False if _CONTEXT.search(name) else temb_grad if name.endswith("time_emb_proj") else \
            entry if _QKV.search(name) else grad
        trains = any(p.requires_grad for p in m.parameters(recurse=hasattr(m, "lora_A")))
        if hasattr(m, "lora_A") and len(m.lora_A):
            inside.append(name)
            lora.append(_lora(name, m))
            lora_copies += _lora_copies(m, x_grad)
        if isinstance(base, (torch.nn.Conv2d, torch.nn.Linear)):
            conv = isinstance(base, torch.nn.Conv2d)  # a conv's backward reads its weight whatever needs a gradient
            if x_grad or (conv and base.weight.requires_grad):
                copies += base.weight.numel()
            full = full or base.weight.requires_grad
        elif not hasattr(m, "lora_A"):
            full = full or any(p.requires_grad for p in m.parameters(recurse=False))
        grad = grad or trains
    return copies, lora_copies, tuple(lora), full


def _lora(name: str, m: Any) -> Lora:
    adapter = next(iter(m.lora_A))
    a, b = m.lora_A[adapter], m.lora_B[adapter]
    p = float(getattr(m.lora_dropout[adapter], "p", 0.0) or 0.0)
    reader = next((r for suffix, r in _READERS if name.endswith(suffix)), "other")
    block = _BLOCK.search(name + ".")
    return (reader, int(block[1]) if block else 0, int(a.in_features), int(b.out_features), int(a.out_features), p,
            a.weight.element_size())


def _lora_copies(m: Any, x_grad: bool) -> int:
    """Weight elements of a LoRA module whose autocast copies are saved: lora_B's (its input trains), and
    lora_A's where its input needs a gradient."""
    adapter = next(iter(m.lora_A))
    a, b = m.lora_A[adapter], m.lora_B[adapter]
    return b.weight.numel() + (a.weight.numel() if x_grad else 0)


def dims(model_config: Any) -> dict[str, int]:
    """What the terms read of a pipeline's configs (nbtune/diffusion.py PipelineConfig): the image and latent
    sizes, the prompt's tokens and width, and the VAE's full-resolution width."""
    unet, vae, text = model_config.unet, model_config.vae, model_config.text_encoder
    c0 = int(unet["block_out_channels"][0])
    return {"h": c0, "V": 0, "L": 0, "image": int(model_config.resolution), "latent": int(unet["sample_size"]),
            "latent_channels": int(unet.get("in_channels", 4)), "out_channels": int(unet.get("out_channels", 4)),
            "text_tokens": int(text.max_position_embeddings), "cross_dim": int(text.hidden_size),
            "vae_channels": int(vae["block_out_channels"][0]), "vae_in": int(vae.get("in_channels", 3))}


# ----- the terms ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sizes:
    """Element sizes of one step's tensors."""

    act: int  # the UNet's activations (16-bit under autocast or in 16-bit weights)
    autocast: bool  # the step runs under 16-bit autocast (training.precision bf16 or fp16, whatever the weights)
    mixed: bool  # ... over fp32 weights: the convs and Linear layers save 16-bit copies of them
    norm: int  # a GroupNorm's or LayerNorm's saved input and its output (fp32 under CUDA autocast)
    context: int  # the text encoder's states (its weights' dtype)
    cuda: bool
    stat: int  # a norm's mean and rstd: fp32, but in the input's dtype for 16-bit inputs and weights on CPU

    def read(self, elem: int) -> int:
        """What a conv or Linear saves of an input of `elem` bytes an element: autocast's 16-bit copy."""
        return 2 if self.autocast else elem

    def copied(self, elem: int) -> bool:
        """Whether a conv or Linear reads its input through a copy of its own (autocast casting it)."""
        return self.autocast and elem != 2


def _sizes(config: TuneConfig, shape: Any, device: str) -> _Sizes:
    cuda, autocast = device == "cuda", config.training.precision in ("fp16", "bf16")
    return _Sizes(act=shape.matmul_bytes, autocast=autocast, mixed=shape.autocast,
                  norm=4 if autocast and cuda else shape.matmul_bytes, context=shape.hidden_bytes, cuda=cuda,
                  stat=4 if cuda or shape.autocast else shape.matmul_bytes)


def saved_bytes(config: TuneConfig, f: Any, shape: Any, device: str) -> int:
    """Everything one step's forward saves for the backward over the micro-batch."""
    s, batch = _sizes(config, shape, device), shape.batch
    latent, tokens = f.dims["latent"], f.dims["text_tokens"]
    total = 0.0
    for u in f.unet:
        positions = u.side * u.side
        total += batch * _unit_bytes(s, u, positions, tokens, f.dims)
        total += 2 * (u.copies * s.mixed + u.lora_copies * (s.autocast and _lora_bytes(u) == 4))
    total += batch * _context_shared(s, f.unet, tokens, f.dims["cross_dim"])
    total += batch * 8 * f.dims["out_channels"] * latent * latent  # the loss: fp32 prediction and target
    return int(total)


def _unit_bytes(s: _Sizes, u: Unit, positions: int, tokens: int, d: dict[str, int]) -> float:
    """Bytes one unit saves for one image."""
    if not (u.input_grad or u.trains):
        return 0.0
    if u.kind == "time":
        return s.act * (u.c_in + 3 * u.c_out) if u.full else 0.0  # linear_1's input, SiLU's, linear_2's; emb
    if u.kind == "conv_in":
        return s.read(s.act) * u.c_in * positions if u.full else 0.0
    if u.kind == "resnet":
        return _resnet(s, u, positions)
    if u.kind == "transformer":
        return _transformer_bytes(s, u, positions, tokens, d["cross_dim"])
    if u.kind == "down":
        return s.read(s.act) * u.c_in * positions
    if u.kind == "up":  # the conv reads the nearest-upsampled tensor, four times the positions
        return s.read(s.act) * u.c_in * 4 * positions
    return _norm(s, u.c_in, positions, u.groups) + s.norm * u.c_in * positions + s.read(s.norm) * u.c_in * positions


def _norm(s: _Sizes, channels: int, positions: int, groups: int) -> float:
    """A GroupNorm: its input (an fp32 copy under CUDA autocast) and its mean and rstd per group."""
    return s.norm * channels * positions + 2 * s.stat * groups


def _resnet(s: _Sizes, u: Unit, positions: int) -> float:
    """norm1, SiLU, conv1 over the input's channels; norm2, SiLU, conv2 over the output's; the shortcut reads the
    input (its own tensor only where norm1 saved an fp32 copy); the time projection's input where it trains."""
    per_channel = _norm(s, 1, positions, 0) + (s.norm + s.read(s.norm)) * positions
    total = per_channel * (u.c_in + u.c_out) + 2 * 2 * s.stat * u.groups
    if u.shortcut and s.norm != s.act:
        total += s.act * u.c_in * positions
    return total + (s.act * u.temb if u.full else 0)  # time_emb_proj's input, SiLU of the embedding


def _transformer_bytes(s: _Sizes, u: Unit, positions: int, tokens: int, cross_dim: int) -> float:
    """GroupNorm and proj_in (where the path starts before them), the blocks, and proj_out."""
    c, total = u.c_in, 0.0
    if u.input_grad:
        total += _norm(s, c, positions, u.groups)
        # proj_in: a 1x1 conv saves its input; a Linear (use_linear_projection) only where it trains
        if not u.linear_projection or u.full:
            total += s.read(s.norm) * c * positions
    for block in range(u.blocks):
        starts = u.input_grad or u.full or block > 0  # the block's input needs a gradient
        total += _block_bytes(s, u, block, positions, tokens, cross_dim, starts)
    if not u.linear_projection or u.full:
        total += s.read(s.act) * c * positions  # proj_out's input (the blocks' output, made contiguous)
    return total


def _block_bytes(s: _Sizes, u: Unit, block: int, positions: int, tokens: int, cross_dim: int,
                 starts: bool) -> float:
    """A BasicTransformerBlock over the latent positions: three LayerNorms, self-attention, cross-attention to the
    text tokens, GEGLU feed-forward. `starts`: its input needs a gradient (else the path starts at the method's
    modules in its self-attention)."""
    c, a, ff = u.c_in, s.act, u.ff
    mine = [m for m in u.lora if m[1] == block]
    per = (s.norm * c + 2 * s.stat) * (3 if starts else 2)  # LayerNorms' inputs, their mean and rstd
    per += _readers(s, mine, "self", c, s.norm, 3 * u.full, starts)
    per += 4 * a * c + 4 * u.heads  # sdpa: q, k, v, output; log-sum-exp
    per += _readers(s, mine, "self_out", c, a, 0, True)  # to_out reads sdpa's output (already saved)
    per += _readers(s, mine, "cross_q", c, s.norm, u.full, True)
    per += 2 * a * c + 4 * u.heads  # cross-attention sdpa: q, output, log-sum-exp
    per += _readers(s, mine, "cross_out", c, a, 0, True)
    per += _readers(s, mine, "ff", c, s.norm, u.full, True)
    per += 3 * a * ff  # GEGLU: its projection (2 x ff, the gate a view of it) and GELU's output
    per += _readers(s, mine, "ff_out", ff, a, u.full, True)
    per += sum(_lora_module(s, m, a, True)[0] for m in mine if m[0] == "other")
    text = 2 * a * c + sum(_lora_module(s, m, s.context, False)[0] for m in mine if m[0] == "cross_kv")
    if u.full and s.copied(s.context):
        text += 2 * 2 * cross_dim  # to_k and to_v each a 16-bit copy of the states
    return positions * per + tokens * text


def _readers(s: _Sizes, lora: list[Lora], reader: str, width: int, elem: int, full: int, grad: bool) -> float:
    """Per position, what the Linear layers reading one tensor (`elem` bytes an element, `width` wide; `grad`:
    it needs a gradient) save of it: `full` trainable base layers (one tensor for all of them, or each its
    autocast copy) and the LoRA modules of `reader`. sdpa's output, to_out's input, is saved by sdpa already."""
    mine = [m for m in lora if m[0] == reader]
    itself = bool(full) and not s.copied(elem)
    per = 2 * width * full if full and s.copied(elem) else 0.0
    for m in mine:
        private, saves_input = _lora_module(s, m, elem, grad)
        per += private
        itself = itself or saves_input
    already = reader in ("self_out", "cross_out")  # sdpa saved its output: to_out's input
    return per + (elem * width if itself and not already else 0)


def _lora_module(s: _Sizes, m: Lora, elem: int, grad: bool) -> tuple[float, bool]:
    """Per element of its input, what one LoRA module saves of its own, and whether it saves the input tensor
    itself (no dropout, no cast: shared with the other readers)."""
    _, _, d_in, _, r, p, lbytes = m
    cast = elem != lbytes  # peft casts the input to the adapter's dtype
    mask = (1 if s.cuda else lbytes) if p > 0 and grad else 0
    la = 2 if s.autocast else lbytes
    if p == 0 and not cast and not s.copied(lbytes):
        return float(r * la), True
    return float(d_in * (mask + la) + r * la), False


def _context_shared(s: _Sizes, parts: tuple[Unit, ...], tokens: int, cross_dim: int) -> float:
    """The text encoder's states, one tensor read by every cross-attention's keys and values that save them
    (trainable, without autocast's copies; LoRA modules without dropout or cast)."""
    if s.copied(s.context):
        return 0.0
    for u in parts:
        if u.kind == "transformer" and (u.full or any(m[0] == "cross_kv" and _lora_module(s, m, s.context, False)[1]
                                                      for m in u.lora)):
            return float(s.context * cross_dim * tokens)
    return 0.0


def _lora_bytes(u: Unit) -> int:
    """Element size of a unit's LoRA weights (peft keeps them in fp32 over 16-bit weights)."""
    return u.lora[0][-1] if u.lora else 0


def backward_transient(config: TuneConfig, f: Any, shape: Any, device: str) -> int:
    """What the backward's first blocks hold beside the saved activations: the gradients of the widest tensor at
    the full latent resolution (the input of the top up block's first ResNet, the skip joined in) and of its
    output."""
    s, latent = _sizes(config, shape, device), f.dims["latent"]
    widest = max((u.c_in for u in f.unet if u.kind == "resnet" and u.side == latent), default=f.dims["h"])
    return int(shape.batch * latent * latent * s.act * 2 * widest)


def encoder_transient(config: TuneConfig, f: Any, shape: Any, device: str) -> int:
    """The largest moment of the frozen VAE encoder's no-grad forward: at full resolution, a ResNet block's input,
    its norm's output and the SiLU's (CUDA autocast: an fp32 copy of the input for the norm, fp32 outputs)."""
    s, d = _sizes(config, shape, device), f.dims
    side, channels = d["image"], d["vae_channels"]
    per = s.act + 2 * s.norm
    return int(shape.batch * side * side * (channels * per + d["vae_in"] * 4))


def note(f: Any) -> str:
    """How a text-to-image estimate counts its sizes."""
    d = f.dims
    return (f"the UNet is counted at {d['latent']}x{d['latent']} latents ({d['image']}x{d['image']} images) and "
            f"{d['text_tokens']} prompt tokens (the text encoder's positions); the VAE and the text encoder run "
            "without gradients and save nothing")


def activation_terms(config: TuneConfig, f: Any, shape: Any, device: str) -> Any:
    """The step's activation terms: everything saved is held at the forward end and still at the start of the
    backward, where the top blocks' gradients sit on top (`backward_transient`); as the backward goes down,
    activations are freed while the parameters' gradients grow."""
    from nbtune.estimator.estimate import ActivationTerms

    saved = saved_bytes(config, f, shape, device)
    return ActivationTerms(forward_end=saved, recompute=backward_transient(config, f, shape, device),
                           stored_in_backward=saved, stored=saved, one_layer=0, saved=saved)
