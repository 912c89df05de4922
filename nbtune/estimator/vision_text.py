"""Activations of a vision encoder-decoder (model.task image-to-text: transformers' VisionEncoderDecoderModel, a
ViT-style encoder and a text decoder whose blocks cross-attend to the encoder's states).

The encoder's blocks run over an image's patches and its class token (`image_tokens`, from the encoder's image
and patch sizes), the decoder's over the caption, counted at data.max_length tokens (its longest: nbtune/
captions.py cuts captions there); each cross-attention's keys and values are the encoder's tokens. Every term
is what autograd saves, per block, read off real CPU steps of GPT-2 decoders (sdpa and eager, dropout on and
off, fp32 and bf16 autocast; tests/test_estimator_image_to_text.py):

- a LayerNorm saves its input and its fp32 mean and rstd;
- a trainable Linear saves its input: one tensor shared by the Linear layers that read it, or under autocast a
  16-bit copy per Linear (ViT's q, k and v each one; GPT-2's fused c_attn one; the cross-attention's keys and
  values a copy of the encoder's states per decoder block);
- sdpa (flash or memory-efficient) saves queries, keys, values, its output (the output projection's input) and
  an fp32 log-sum-exp; GPT-2's self-attention saves its fused q/k/v output beside a query copy. On CPU, sdpa
  with dropout runs torch's math kernel in fp32 (queries, keys, values, probabilities, dropout noise and output);
  eager attention saves the softmax (fp32 where ViT asks for it or a float mask promotes it) and the 16-bit
  copy or dropout output the values' matmul reads, and the output projection its own contiguous input;
- the MLP's activation saves one tensor of its width (GELU, ReLU), GPT-2's gelu_new four (it is Python ops);
- a dropout saves its mask (CPU: a noise tensor of its input's dtype; CUDA: one byte an element).

Measured (saved activations of the estimate over a real step's, autograd's saved tensors; the methods that train
image-to-text: full, freeze, bitfit, lora, qlora, ia3, adalora, adapter): on a 2-core CPU (torch 2.13,
transformers 5.24) 0.95-1.10 for a tiny ViT + GPT-2 (dropout on and off, sdpa and eager, fp32 and bf16 autocast),
0.98-1.09 with a TrOCR decoder (eager), 0.97-1.06 for the embedded nbtune:tiny-captioner; a real step's peak
(what its forward and backward hold beyond weights and optimizer state) 0.91-1.17 at 8 images and 48 caption
tokens, with and without checkpointing. On an H200 (torch 2.11+cu130; ViT 224/16 6 x 384 + GPT-2 6 x 384 with
dropout, 16 images, 64 caption tokens): saved activations 0.94-0.99, max_memory_allocated of a whole step (the
second: AdamW's state exists) 0.84-0.99 of the real one, eager attention and layer freezing the lowest.

This module imports the estimator's shared pieces; estimate.py reaches it only for this family.
"""

from __future__ import annotations

import dataclasses

from nbtune.config import TuneConfig
from nbtune.estimator.estimate import StepShape, lora_bytes, method_bytes
from nbtune.estimator.skeleton import Facts, LayerFacts


def block_bytes(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """Bytes one block saves for the backward over the micro-batch: an encoder block over the image tokens, a
    decoder block over the caption's tokens and, in its cross-attention, the encoder's."""
    if layer.stack == "encoder":
        return _encoder_block(config, f, shape, layer, device)
    return _decoder_block(config, f, shape, layer, device)


def encoder_tokens(f: Facts, shape: StepShape) -> int:
    """Tokens the encoder runs over in one micro-batch: each image's patches and class token."""
    return shape.batch * f.dims["image_tokens"]


def _encoder_block(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    d, act = f.dims, _act(shape, layer)
    n, h = encoder_tokens(f, shape), d["enc_h"]
    per = _norm(shape, h) * (layer.input_grad or layer.full) + _inputs(shape, layer, 3, h)
    if _attends(layer):
        per += _attention(config, shape, layer, device, heads=d["enc_a"], q=d["enc_q"], kv=d["enc_kv"],
                          keys=d["image_tokens"], dropout=bool(d["enc_attn_dropout"]), upcast=True)
        per += _dropout(device, act) * h * d["enc_dropout"]
    per += _norm(shape, h) + _inputs(shape, layer, 1, h)
    per += _mlp(config, shape, layer, device, d["enc_I"], d["enc_act_saves"], bool(d["enc_act_dropout"]))
    per += _dropout(device, act) * h * d["enc_dropout"]
    return n * (per + _method(config, shape, layer, device))


def _attends(layer: LayerFacts) -> bool:
    """Whether a block's first sublayer (its norm, q/k/v projections and attention) saves anything: its input
    needs a gradient, or what trains there (the block's own weights, LoRA's and IA3's default targets, the
    attention projections) makes its outputs need one. An adapter after the attention's output does not."""
    return layer.input_grad or layer.full or bool(layer.lora) or layer.vectors > 0


def _method(config: TuneConfig, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """Per token, what the method's modules of a block save; LoRA's dropout keeps no mask where its input (the
    block's input, for its default attention targets) needs no gradient."""
    if not layer.input_grad:
        layer = dataclasses.replace(layer, lora=tuple((d_in, r, 0.0, b) for d_in, r, _, b in layer.lora))
    return method_bytes(config, shape, layer, device)


def _decoder_block(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    d, act = f.dims, _act(shape, layer)
    # a 4-bit c_attn returns fp32 queries, keys and values: sdpa's autocast copies them one by one
    fused, h, s = bool(d.get("fused_qkv")) and not layer.quantized, d["h"], d["image_tokens"]
    per = _norm(shape, h) * (layer.input_grad or layer.full) + _inputs(shape, layer, 1 if fused else 3, h)
    if _attends(layer):
        per += _attention(config, shape, layer, device, heads=d["a"], q=d["q"], kv=d["kv"], keys=shape.kv_length,
                          dropout=bool(d["attn_dropout"]), upcast=True, fused=fused)
        per += _dropout(device, act) * h * d["dropout"]
    per += _norm(shape, h) + _inputs(shape, layer, 1, h)  # the cross-attention's query
    per += _attention(config, shape, layer, device, heads=d["a"], q=d["q"], kv=0, keys=s,
                      dropout=bool(d["attn_dropout"]), upcast=False)
    per += _norm(shape, h) + _inputs(shape, layer, 1, h)
    per += _mlp(config, shape, layer, device, d["I"], d["act_saves"], bool(d["act_dropout"]))
    per += 2 * _dropout(device, act) * h * d["dropout"]
    per += _method(config, shape, layer, device)
    return shape.tokens * per + encoder_tokens(f, shape) * _cross_keys(config, f, shape, layer, device)


def _cross_keys(config: TuneConfig, f: Facts, shape: StepShape, layer: LayerFacts, device: str) -> float:
    """Per encoder token, what a decoder block's cross-attention saves of the encoder's side: its keys and
    values (fp32 in CPU's math kernel), the 16-bit copies of the states its trainable key/value projections
    read under autocast (one for a fused projection, GPT-2's c_attn), and LoRA's and IA3's there."""
    d, act = f.dims, _act(shape, layer)
    math = _math_kernel(config, device, bool(d["attn_dropout"]))
    per = 2 * d["q"] * (4 if math else shape.matmul_bytes)  # attention runs under autocast, 4-bit inputs too
    if layer.full and shape.autocast:
        per += act * d["states"] * (1 if d.get("fused_qkv") else 2)
    # LoRA's dropout keeps no mask where its input, the encoder's states, needs no gradient (a frozen encoder)
    lora = layer.kv_lora if f.encoder_trains else tuple((d_in, r, 0.0, b) for d_in, r, _, b in layer.kv_lora)
    return per + lora_bytes(config, lora, device) + act * layer.kv_vectors


def _act(shape: StepShape, layer: LayerFacts) -> int:
    """Element size of a block's matmul outputs: bitsandbytes' 4-bit matmuls return the hidden states' dtype."""
    return shape.hidden_bytes if layer.quantized else shape.matmul_bytes


def _norm(shape: StepShape, width: int) -> float:
    """A LayerNorm: its input (the residual stream) and its fp32 mean and rstd."""
    return shape.hidden_bytes * width + 8


def _inputs(shape: StepShape, layer: LayerFacts, readers: int, width: int) -> float:
    """A norm's output as the trainable Linear layers reading it save it: one tensor, or under autocast a 16-bit
    copy per Linear; nothing where their weights are frozen (a frozen matmul needs only its weight)."""
    if not layer.full:
        return 0
    return shape.matmul_bytes * width * (readers if shape.autocast else 1)


def _math_kernel(config: TuneConfig, device: str, dropout: bool) -> bool:
    """Whether sdpa runs torch's math kernel: on CPU with attention dropout (flash attention on CPU has none)."""
    return config.model.attn_implementation == "sdpa" and device == "cpu" and dropout


def _attention(config: TuneConfig, shape: StepShape, layer: LayerFacts, device: str, *, heads: int, q: int, kv: int,
               keys: int, dropout: bool, upcast: bool, fused: bool = False) -> float:
    """Per query token, what an attention saves: its queries, its keys and values when they are per query token
    (self-attention; `kv` 0 for a cross-attention, whose keys are the encoder's), the core and the output
    projection's input. `keys` is the key length; `upcast`: eager's softmax is fp32 under autocast (ViT asks
    for it, the causal float mask promotes it); `fused`: GPT-2's q/k/v, one output saved whole beside a query
    copy. Attention runs under autocast: what it saves is 16-bit there, after a 4-bit projection too."""
    act, mixed = shape.matmul_bytes, shape.autocast
    if _math_kernel(config, device, dropout):  # fp32 queries, keys, values; probabilities, noise and output
        return 4 * (q + 2 * kv) + 12 * heads * keys + act * q * layer.full
    qkv = act * (4 * q if fused else q + 2 * kv)
    if config.model.attn_implementation != "eager":  # flash / memory-efficient: output and log-sum-exp
        return qkv + act * q + 4 * heads
    soft = 4 if act == 4 or upcast or (mixed and device == "cuda") else act
    core = soft + (_dropout(device, act) + act if dropout else (act if soft != act else 0))
    return (act * (q + 2 * kv) if fused else qkv) + heads * keys * core + act * q * layer.full


def _mlp(config: TuneConfig, shape: StepShape, layer: LayerFacts, device: str, inner: int, saves: int,
         dropout: bool) -> float:
    """The MLP's activation (`saves` tensors of its width: under CUDA autocast gelu_new's chain runs in fp32
    after its pow), an activation dropout, and the second Linear's input when it trains."""
    act = _act(shape, layer)
    chain = 4 if shape.autocast and device == "cuda" else act
    per = inner * (act + (saves - 1) * chain)
    if dropout:
        per += inner * (_dropout(device, act) + act)
    return per + (inner * act if layer.full else 0)


def _dropout(device: str, elem: int) -> int:
    """Bytes per element a dropout saves: CUDA's fused kernel a 1-byte mask, CPU a noise tensor of its input's
    dtype."""
    return 1 if device == "cuda" else elem


def outside_bytes(config: TuneConfig, f: Facts, shape: StepShape, device: str) -> tuple[int, int]:
    """What the two models save outside their blocks, and what gradient checkpointing holds through the backward
    beside the blocks' inputs (the encoder's states, an input of every decoder block). The encoder: its
    patches' convolution input (the pixels) when its embeddings train, its final norm, and in fp32 its states,
    read by the trainable cross-attention keys/values of every decoder block (under autocast each block counts
    its own copy). The decoder: its embeddings' dropout mask, its final norm and the LM head's input when the
    head trains."""
    d, act, hid = f.dims, shape.matmul_bytes, shape.hidden_bytes
    m, n = encoder_tokens(f, shape), shape.tokens
    encoder = decoder = 0.0
    if f.encoder_trains:
        encoder += m * _norm(shape, d["enc_h"])
        if f.encoder_embeddings_train:  # the patches' convolution: its input, and its weight's 16-bit copy
            encoder += shape.batch * d["pixels"] * act + (act * d["patch_elems"] if shape.autocast else 0)
    # the states as the trainable key/value projections (and a trainable pooler) read them: one fp32 tensor
    if (any(x.full for x in f.layers if x.stack == "decoder") or f.gradless_elems) and not shape.autocast:
        encoder += m * hid * d["states"]
    if any(x.stack == "decoder" for x in f.layers) or f.head_trainable:
        decoder += n * (_norm(shape, d["h"]) + _dropout(device, hid) * d["h"] * d["embd_dropout"])
    if f.output_trains:
        decoder += n * act * d["h"]
    held = hid * d["states"] * m if shape.checkpointing and f.encoder_trains else 0
    return int(encoder + decoder + held), int(held)
