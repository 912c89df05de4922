"""The model skeleton: build the model on the meta device, apply the method, and read off exact facts.

Every count the estimator uses (trainable parameters, which Linear layers get quantized, which layers back-propagate,
adapter sizes) comes from the real model code and the real method, never from a per-method formula. The skeleton
costs nothing in memory; the facts are cached per (model config, task, dtype, attention, method, params).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from nbtune.config import TuneConfig
from nbtune.methods.counting import count_parameters
from nbtune.tasks import TASKS

_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|block|blocks))\.(\d+)\.")
_BEFORE_LAYERS = ("embed", "wte", "wpe", "shared", "prompt_encoder", "prefix", "token_type")
# A vision encoder-decoder (image-to-text): its decoder's cross-attention keys and values read the encoder's states
# (GPT-2's crossattention.c_attn, TrOCR's encoder_attn.k_proj / v_proj), and the encoder's pooler, whose output
# the decoder never reads, gets no gradient
_CROSS_KV = re.compile(r"\.(?:crossattention\.c_attn|encoder_attn\.[kv]_proj)\.")
_GRADLESS = re.compile(r"(?:^|\.)encoder\.pooler\.")
VISION_TEXT = "vision-encoder-decoder"  # the family of image-to-text models (estimator/vision_text.py)
DIFFUSION = "stable-diffusion"  # the family of text-to-image models (estimator/unet.py)


@dataclass(frozen=True)
class LayerFacts:
    """What one transformer block trains and stores."""

    full: bool  # it has trainable weights of its own Linear layers (its inputs must be saved)
    quantized: bool  # bitsandbytes Linear layers save their input for the backward
    lora: tuple[tuple[int, int, float, int], ...] = ()  # (in_features, r, dropout, adapter bytes) per LoRA module
    other_trainable: int = 0  # trainable elements that are neither Linear weights nor LoRA (biases, IA3 vectors)
    added: tuple[tuple[int, int], ...] = ()  # (in, out) of trainable Linear layers the method added (adapters)
    vectors: int = 0  # elements of trainable scaling vectors (IA3): each saves the tensor it scales
    cross_attention: bool = False  # a decoder block of an encoder-decoder (T5): it also attends to the encoder
    stack: str = ""  # a vision encoder-decoder's "encoder" or "decoder" block ("" for other models)
    kv_lora: tuple[tuple[int, int, float, int], ...] = ()  # LoRA modules of the cross-attention keys/values
    kv_vectors: int = 0  # IA3 vector elements scaling the cross-attention keys/values (per encoder token)
    input_grad: bool = True  # its input needs a gradient (not the lowest block of a stack over frozen embeddings)


@dataclass(frozen=True)
class UnitParams:
    """The parameters of one part of the model that a sharded strategy gathers whole at once (FSDP's unit: a
    block, or the root: everything outside the blocks)."""

    elems: int = 0  # elements of its non-quantized parameters
    bytes: int = 0  # their bytes, as stored
    quantized: int = 0  # elements of its quantized Linear weights
    trainable: int = 0  # elements of its trainable parameters


@dataclass(frozen=True)
class Facts:
    """Exact facts about a model with a method applied, read from its meta-device skeleton."""

    total_params: int
    trainable_params: int
    weight_bytes: int  # all non-quantized parameters and buffers-as-parameters, as stored
    trainable_bytes: int
    trainable_elem_bytes: int  # dominant element size of trainable tensors (for grads, optimizer states)
    quantized_params: int  # elements of Linear weights that bitsandbytes quantizes
    quant_bits: int  # 4 or 8 (0 when not quantized)
    quant_double: bool
    quant_block: int
    adafactor_state_elems: int  # factored second-moment elements (Adafactor, no first moment)
    small_trainable_elems: int  # tensors under 4096 elements keep 32-bit states in bitsandbytes 8-bit optimizers
    largest_trainable_elems: int
    largest_linear_elems: int  # the largest quantized Linear weight (dequantized one at a time)
    layers: tuple[LayerFacts, ...]  # one per block that gradients flow through, bottom to top
    total_layers: int
    head_trainable: bool
    autocast_copy_elems: int  # Linear weights whose 16-bit autocast copies are saved for the backward
    virtual_tokens: int
    prefix_tokens: int  # prefix tuning lengthens keys/values, not the sequence
    forced_checkpointing: bool  # the method turned gradient checkpointing on (e.g. prepare_model_for_kbit_training)
    residual_bytes: int = 0  # element size of the hidden states (the input embeddings' dtype after the method)
    teacher_bytes: int = 0  # a frozen teacher kept beside the student (distillation)
    reference_copy_bytes: int = 0  # TRL's frozen reference copy of the base (0 for PEFT: it disables the adapter)
    dims: dict[str, int] = field(default_factory=dict)
    # "gated": RMSNorm + gated MLP (Llama-like); "gpt": LayerNorm + 2-matrix MLP; "t5": T5's encoder-decoder
    # (RMS-style T5LayerNorm, relative position bias, cross-attention, dropout after every sublayer)
    family: str = "gated"
    head_copy_elems: int = 0  # the part of autocast_copy_elems outside the blocks (the LM head, a classifier)
    quant_compute_bytes: int = 2  # element size of a dequantized 4-bit weight (bnb_4bit_compute_dtype)
    activation: str = ""  # the MLP's activation function (config.json's dense_act_fn / hidden_act)
    gated_mlp: bool = False  # T5 v1.1 / flan-t5: wi_0 (activated) times wi_1
    position_bias_tables: int = 0  # trainable relative position bias tables (T5: one per stack; UMT5: per block)
    quantized_tensor_elems: tuple[int, ...] = ()  # elements of each weight bitsandbytes quantizes
    weight_elems: int = 0  # elements of the non-quantized parameters (weight_bytes counts their bytes)
    largest_block: UnitParams = UnitParams()  # the block with the most parameter bytes
    outside_blocks: UnitParams = UnitParams()  # embeddings, final norm, head, soft prompts: FSDP's root unit
    gradless_elems: int = 0  # trainable elements that never get a gradient (a vision encoder-decoder's pooler)
    encoder_trains: bool = False  # a vision encoder-decoder's encoder states need a gradient (something in it trains)
    encoder_embeddings_train: bool = False  # its encoder's patch embeddings train (their convolution saves pixels)
    output_trains: bool = False  # the output head's weight trains (its matmul saves its input)
    unet: tuple[Any, ...] = ()  # a text-to-image model's UNet, unit by unit in forward order (unet.Unit)


def model_dims(model_config: Any) -> dict[str, int]:
    """Hidden size, MLP size, heads, kv heads, head dim, vocabulary and layers, for any common architecture."""
    c = model_config
    if _composite(c):
        return _composite_dims(c)

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(c, name, None)
            if value is not None:
                return value
        return default

    h = int(first("hidden_size", "n_embd", "d_model"))
    a = int(first("num_attention_heads", "n_head", "num_heads"))
    head_dim = int(first("head_dim", "d_kv", default=h // a))
    kv_heads = int(first("num_key_value_heads", default=a))
    layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
    attn_dropout = float(first("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout", "dropout_rate",
                               default=0.0) or 0.0)
    if getattr(c, "is_encoder_decoder", False):
        layers += int(first("num_decoder_layers", default=layers))
    dims = {"h": h, "I": int(first("intermediate_size", "n_inner", "d_ff", default=4 * h) or 4 * h), "a": a,
            "kv": kv_heads * head_dim, "head_dim": head_dim, "q": a * head_dim, "L": layers,
            "attn_dropout": int(attn_dropout > 0)}
    # a vision model's "vocabulary" is its head's classes; its sequence is its patches and the class token
    dims["V"] = int(c.vocab_size) if getattr(c, "vocab_size", None) else int(getattr(c, "num_labels", 2))
    if getattr(c, "patch_size", None) and getattr(c, "image_size", None):
        dims["image_tokens"] = _patch_grid(c.image_size, c.patch_size) + 1
    return dims


def _composite(model_config: Any) -> bool:
    """A config made of an encoder's and a decoder's configs (VisionEncoderDecoderConfig)."""
    return all(hasattr(getattr(model_config, part, None), "to_dict") for part in ("encoder", "decoder"))


def _composite_dims(c: Any) -> dict[str, int]:
    """An encoder-decoder made of two models (VisionEncoderDecoderConfig): the decoder's dimensions (its hidden
    states, heads and vocabulary make the logits), the encoder's under "enc_" names, its tokens (an image's
    patches and the class token, "image_tokens"), the width of the encoder states the cross-attention reads
    ("states": the decoder's when enc_to_dec_proj projects them), the decoder's position limit ("positions", 0
    when it does not say), dropout flags and the tensors each MLP activation saves."""
    enc, dec = model_dims(c.encoder), model_dims(c.decoder)
    dims = {**dec, **{f"enc_{k}": v for k, v in enc.items() if k not in ("V", "image_tokens")}}
    inner = getattr(c.decoder, "decoder_ffn_dim", None)  # TrOCR's name for the MLP width
    dims["I"] = int(inner or dims["I"])
    projected = enc["h"] != dec["h"] and getattr(c.decoder, "cross_attention_hidden_size", None) is None
    positions = next((int(v) for n in ("n_positions", "max_position_embeddings")
                      if isinstance(v := getattr(c.decoder, n, None), int) and v > 0), 0)
    dims.update(L=enc["L"] + dec["L"], dec_L=dec["L"], states=dec["h"] if projected else enc["h"],
                positions=positions, proj=int(projected), **_dropouts(c.decoder, ""), **_dropouts(c.encoder, "enc_"),
                act_saves=_activation_saves(c.decoder), enc_act_saves=_activation_saves(c.encoder))
    if "image_tokens" in enc:
        e = c.encoder
        channels = int(getattr(e, "num_channels", 3))
        height, width = _pair(e.image_size)
        ph, pw = _pair(e.patch_size)
        dims.update(image_tokens=enc["image_tokens"], pixels=channels * height * width,
                    patch_elems=enc["h"] * channels * ph * pw)
    return dims


def _pair(size: Any) -> tuple[int, int]:
    """(height, width) of a size given as an int or a pair."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _dropouts(c: Any, prefix: str) -> dict[str, int]:
    """Whether a model drops out its residual branches, embeddings and MLP activations (1) or not (0)."""
    def on(*names: str) -> int:
        return int(any(float(getattr(c, n, 0) or 0) > 0 for n in names))

    return {f"{prefix}dropout": on("resid_pdrop", "hidden_dropout_prob", "dropout"),
            f"{prefix}embd_dropout": on("embd_pdrop", "hidden_dropout_prob", "dropout"),
            f"{prefix}act_dropout": on("activation_dropout")}


def _activation_saves(c: Any) -> int:
    """Tensors of the MLP's width its activation saves: GPT-2's gelu_new is Python ops (its input, tanh, 1 + tanh
    and input / 2), quick_gelu two (input and sigmoid), the fused ones one."""
    name = str(getattr(c, "activation_function", None) or getattr(c, "hidden_act", "") or "")
    return {"gelu_new": 4, "quick_gelu": 2}.get(name, 1)


def _patch_grid(image_size: Any, patch_size: Any) -> int:
    """Patches of an image: (height / patch) x (width / patch); sizes are ints or (height, width) pairs."""
    (height, width), (ph, pw) = _pair(image_size), _pair(patch_size)
    return (height // ph) * (width // pw)


def build_model(config: TuneConfig, model_config: Any, device: str = "meta") -> tuple[Any, dict[str, Any]]:
    """The model of `config` with its method applied, built on `device` (no weights are read).

    Returns (model, info) where info holds the quantization settings and the ids of the parameters that
    bitsandbytes would quantize (the skeleton keeps them as ordinary Linear weights).
    """
    import copy

    from nbtune import models

    model_config = copy.deepcopy(model_config)
    if TASKS[config.model.task].classifies and getattr(model_config, "num_labels", 2) < 2:
        model_config.num_labels = 2
    quantized: set[int] = set()
    info: dict[str, Any] = {}

    def mark_quantized(model: Any, load_kwargs: dict[str, Any]) -> None:
        """The base as bitsandbytes would load it: which Linear weights it quantizes (kept as plain weights)."""
        quant = info["quant"] = _quant_settings(load_kwargs.get("quantization_config"))
        if quant["bits"]:
            skip = set(quant["skip"]) | {"lm_head", "score", "classifier"}
            out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            for name, module in model.named_modules():
                if isinstance(module, linear_types()) and module is not out_emb and not (set(name.split(".")) & skip):
                    quantized.add(id(module.weight))
            setattr(model, f"is_loaded_in_{quant['bits']}bit", True)
        info["base_ids"] = {id(p) for p in model.parameters()}

    built = models.build(config, device=device, model_config=model_config, prepare=mark_quantized)
    return built.model, {**info, "quantized_ids": quantized, "method": built.method, "params": built.params,
                         "ctx": built.ctx}


def linear_types() -> tuple[type, ...]:
    """Modules whose weight is a matmul's: torch's Linear and transformers' Conv1D (GPT-2's Linear with its weight
    transposed, which bitsandbytes quantizes too, transformers/integrations/bitsandbytes.py)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def _quant_settings(qc: Any) -> dict[str, Any]:
    if qc is None:
        return {"bits": 0, "double": False, "block": 64, "skip": (), "compute_bytes": 2}
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    bits = 4 if get("load_in_4bit", False) else 8 if get("load_in_8bit", False) else 0
    compute = get("bnb_4bit_compute_dtype", None)
    compute_bytes = int(getattr(compute, "itemsize", 0) or 2) if bits == 4 else 2  # LLM.int8 dequantizes to fp16
    return {"bits": bits, "double": bool(get("bnb_4bit_use_double_quant", False)), "block": 64,
            "skip": tuple(get("llm_int8_skip_modules", None) or ()), "compute_bytes": compute_bytes}


def _key(config: TuneConfig, model_config: Any) -> str:
    m = config.model
    return json.dumps([_config_text(model_config), m.task, m.dtype, m.attn_implementation,
                       config.method.name, config.method_params], sort_keys=True, default=str)


def _config_text(model_config: Any) -> str:
    """A model config as text: a transformers config's JSON; a pipeline's parts' configs (text-to-image)."""
    if _pipeline(model_config):
        c = model_config
        return json.dumps([c.unet, c.vae, c.scheduler, c.text_encoder.to_json_string(use_diff=False)],
                          sort_keys=True, default=str)
    return model_config.to_json_string(use_diff=False)


def _pipeline(model_config: Any) -> bool:
    """A diffusers pipeline's parts' configs (nbtune/diffusion.py PipelineConfig)."""
    return all(hasattr(model_config, part) for part in ("unet", "vae", "text_encoder"))


def facts(config: TuneConfig, model_config: Any) -> Facts:
    """Facts of the config's model and method (cached: the skeleton is built once per model and method)."""
    key = _key(config, model_config)
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = read_facts(config, model_config)
    return _CACHE[key]


_CACHE: dict[str, Facts] = {}


def read_facts(config: TuneConfig, model_config: Any) -> Facts:
    """Build the skeleton of the config's model with its method and read every fact off its parameters."""
    model, info = build_model(config, model_config)
    if _pipeline(model_config):
        return _pipeline_facts(model, info, model_config)
    composite = _composite(model_config)
    lora_ids, lora_by_block, kv_lora = _lora_modules(model, composite)
    tally = _tally_parameters(model, info, lora_ids, composite)
    virtual, prefix = _virtual_tokens(model, info["method"], info["params"])
    keys = list(tally.blocks)
    trained = [i for i, k in enumerate(keys) if tally.blocks[k].trains() or k in lora_by_block or k in kv_lora]
    # Gradients flow from the top down to the lowest block that trains, or through all when what trains sits
    # below the blocks (embeddings, soft prompts) or is a prefix every block's attention reads
    first = 0 if tally.before_trainable or prefix else trained[0] if trained else len(keys)
    encoder_trains = composite and _encoder_trains(model)
    path = _stack_path(model, keys, {keys[i] for i in trained}, encoder_trains) if composite else \
        [(k, True) for k in keys[first:]]
    chosen = [k for k, _ in path]
    uncopied = _uncopied(model, info["quantized_ids"]) if composite and not encoder_trains else (0, 0)
    layers = tuple(tally.blocks[k].facts(lora_by_block.get(k, ()), kv_lora.get(k, ()),
                                         _stack(k) if composite else "", input_grad) for k, input_grad in path)
    teacher = info["ctx"].extras.get("teacher")
    trainable, total = tally.trainable, tally.total
    if trainable:  # the methods' own counting, so the estimator and a real run agree on the numbers
        trainable, counted_total = count_parameters(model)
        total = counted_total + (tally.quantized if counted_total < total else 0)
    return Facts(
        total_params=total, trainable_params=trainable, weight_bytes=tally.weight_bytes,
        trainable_bytes=tally.trainable_bytes,
        trainable_elem_bytes=max(tally.by_size, key=tally.by_size.get) if tally.by_size else 4,
        quantized_params=tally.quantized, quant_bits=info["quant"]["bits"], quant_double=info["quant"]["double"],
        quant_block=info["quant"]["block"], adafactor_state_elems=tally.adafactor_state,
        small_trainable_elems=tally.small_trainable, largest_trainable_elems=tally.largest_trainable,
        largest_linear_elems=tally.largest_quantized, quantized_tensor_elems=tuple(tally.quantized_tensors),
        layers=layers, total_layers=len(keys),
        head_trainable=tally.head_trainable,
        autocast_copy_elems=sum(tally.blocks[k].linear for k in chosen) + tally.outside_linear - sum(uncopied),
        virtual_tokens=virtual, prefix_tokens=prefix, forced_checkpointing=_checkpointing(_base(model)),
        residual_bytes=_embedding_bytes(model),
        teacher_bytes=sum(p.numel() * p.element_size() for p in teacher.parameters()) if teacher is not None else 0,
        reference_copy_bytes=_reference_copy_bytes(model, info["base_ids"]),
        dims={**model_dims(model_config), **(_structure(model) if composite else {})},
        family=_family(model, model_config), head_copy_elems=tally.outside_linear - uncopied[1],
        quant_compute_bytes=info["quant"]["compute_bytes"], weight_elems=tally.weight_elems,
        largest_block=max((b.params for b in tally.blocks.values()), key=lambda u: u.bytes + u.quantized,
                          default=UnitParams()),
        outside_blocks=tally.outside.params,
        activation=str(getattr(model_config, "dense_act_fn", None) or getattr(model_config, "hidden_act", "") or ""),
        gated_mlp=any(".wi_0." in n for n, _ in model.named_parameters()),
        position_bias_tables=sum(1 for n, p in model.named_parameters()
                                 if "relative_attention_bias" in n and p.requires_grad),
        **(_composite_facts(model, encoder_trains) if composite else {}))


def _pipeline_facts(model: Any, info: dict[str, Any], model_config: Any) -> Facts:
    """Facts of a text-to-image model (a DiffusionModel): its parameters (UNet, VAE and text encoder) counted as
    any model's, no transformer blocks of the estimate's kinds, its UNet's units (estimator/unet.py)."""
    from nbtune.estimator import unet

    tally = _tally_parameters(model, info, set())
    trainable, total = count_parameters(model)
    return Facts(
        total_params=total, trainable_params=trainable, weight_bytes=tally.weight_bytes,
        trainable_bytes=tally.trainable_bytes,
        trainable_elem_bytes=max(tally.by_size, key=tally.by_size.get) if tally.by_size else 4,
        quantized_params=0, quant_bits=0, quant_double=False, quant_block=64,
        adafactor_state_elems=tally.adafactor_state, small_trainable_elems=tally.small_trainable,
        largest_trainable_elems=tally.largest_trainable, largest_linear_elems=0, layers=(), total_layers=0,
        head_trainable=False, autocast_copy_elems=0, virtual_tokens=0, prefix_tokens=0, forced_checkpointing=False,
        dims=unet.dims(model_config), family=DIFFUSION, weight_elems=tally.weight_elems,
        largest_block=max((b.params for b in tally.blocks.values()), key=lambda u: u.bytes, default=UnitParams()),
        outside_blocks=tally.outside.params, unet=unet.units(model))


def _composite_facts(model: Any, encoder_trains: bool) -> dict[str, Any]:
    """The facts only a vision encoder-decoder has, by their Facts field names."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {"gradless_elems": sum(p.numel() for n, p in named if _GRADLESS.search(n)),
            "encoder_trains": encoder_trains, "output_trains": _output_trains(model),
            "encoder_embeddings_train": any(_stack(n) == "encoder" and "embed" in n and not _LAYER.match(n)
                                            for n, _ in named)}


def _structure(model: Any) -> dict[str, int]:
    """What a vision encoder-decoder's module names say: whether its decoder's self-attention projects queries,
    keys and values in one Linear (GPT-2's c_attn)."""
    names = [n for n, _ in model.named_modules()]
    return {"fused_qkv": int(any(n.endswith(".attn.c_attn") for n in names))}


def _output_trains(model: Any) -> bool:
    """Whether the output head's weight (the LM head, tied or not) trains."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    weight = getattr(head, "weight", None)
    return bool(weight is not None and weight.requires_grad)


def _uncopied(model: Any, quantized_ids: set[int]) -> tuple[int, int]:
    """Elements of a vision encoder-decoder's Linear weights that read its frozen encoder's states, whose 16-bit
    autocast copies no matmul saves (a frozen matmul's input needs no gradient): (in the decoder's blocks: the
    cross-attention keys/values and their lora_A, outside them: the encoder's pooler)."""
    inside = outside = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, linear_types()) or weight is None or id(weight) in quantized_ids:
            continue
        if _CROSS_KV.search(name + ".") and ".lora_B" not in name:
            inside += weight.numel()
        elif _GRADLESS.search(name + "."):
            outside += weight.numel()
    return inside, outside


def _stack(name: str) -> str:
    """Which model of a vision encoder-decoder a parameter or block name is in: "encoder" or "decoder"."""
    return next((part for part in name.split(".") if part in ("encoder", "decoder")), "")


def _encoder_trains(model: Any) -> bool:
    """Whether a vision encoder-decoder's encoder states need a gradient: something of the encoder (or the
    projection of its states) trains, its pooler aside (its output is never read)."""
    return any(p.requires_grad and not _GRADLESS.search(n) and (_stack(n) == "encoder" or "enc_to_dec_proj" in n)
               for n, p in model.named_parameters())


def _stack_path(model: Any, keys: list[str], trained: set[str], encoder_trains: bool) -> list[tuple[str, bool]]:
    """The blocks of a vision encoder-decoder that gradients flow through, bottom to top, each with whether its
    input needs a gradient: the encoder's from its lowest block that trains (all when its embeddings train);
    the decoder's all when the encoder's states or the decoder's embeddings need a gradient (every
    cross-attention reads the states), else from its lowest block that trains. The lowest block of each stack
    on the path reads an input without a gradient unless that stack's embeddings train."""
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not _LAYER.match(n)]

    def from_lowest(stack: str, all_of_it: bool, embeds: bool) -> list[tuple[str, bool]]:
        mine = [k for k in keys if _stack(k) == stack]
        lowest = next((i for i, k in enumerate(mine) if k in trained), len(mine))
        return [(k, embeds or i > 0) for i, k in enumerate(mine[0 if all_of_it else lowest:])]

    embeds = {s: any(_stack(n) == s and any(part in n for part in _BEFORE_LAYERS) for n in outside)
              for s in ("encoder", "decoder")}
    return from_lowest("encoder", embeds["encoder"], embeds["encoder"]) + \
        from_lowest("decoder", encoder_trains or embeds["decoder"], embeds["decoder"])


def _family(model: Any, model_config: Any) -> str:
    """Which activation formulas a model's blocks follow (estimate.py): T5-style encoder-decoders (relative
    position bias, cross-attention), vision encoder-decoders (estimator/vision_text.py), Llama-like gated
    blocks, or GPT/BERT-like blocks."""
    names = [n for n, _ in model.named_parameters()]
    if _composite(model_config) and "image_tokens" in model_dims(model_config):
        return VISION_TEXT
    if getattr(model_config, "is_encoder_decoder", False) and any("relative_attention_bias" in n for n in names):
        return "t5"
    return "gated" if any(".gate_proj." in n or ".w1." in n for n in names) else "gpt"


@dataclass
class _BlockTally:
    """What the parameters of one transformer block add up to, while they are read."""

    full: bool = False  # a Linear weight of its own trains
    quantized: bool = False
    other_trainable: int = 0
    linear: int = 0  # elements of its unquantized Linear weights (autocast keeps 16-bit copies of them)
    added: list[tuple[int, int]] = field(default_factory=list)  # (in, out) of trainable Linear layers added
    vectors: int = 0  # elements of scaling vectors the method added
    cross_attention: bool = False  # it holds a cross-attention (a T5 decoder block)
    params: UnitParams = UnitParams()  # what its parameters add up to
    kv_vectors: int = 0  # scaling vectors of the cross-attention keys/values (a vision encoder-decoder's)

    def trained(self, name: str, prm: Any, is_linear: bool, is_new: bool, kv: bool = False) -> None:
        """Count a trainable parameter of this block that is not part of a LoRA module (`kv`: one of a vision
        encoder-decoder's cross-attention keys/values, which read the encoder's states)."""
        if is_linear and is_new:
            self.added.append((int(prm.shape[1]), int(prm.shape[0])))
        elif is_linear:
            self.full = True
        else:
            self.other_trainable += prm.numel()
            if is_new and prm.dim() >= 1 and not name.endswith("bias"):
                if kv:
                    self.kv_vectors += prm.numel()
                else:
                    self.vectors += prm.numel()

    def trains(self) -> bool:
        return bool(self.full or self.other_trainable or self.added)

    def facts(self, lora: Any, kv_lora: Any = (), stack: str = "", input_grad: bool = True) -> LayerFacts:
        return LayerFacts(full=self.full, quantized=self.quantized, lora=tuple(lora),
                          other_trainable=self.other_trainable, added=tuple(self.added), vectors=self.vectors,
                          cross_attention=self.cross_attention, stack=stack, kv_lora=tuple(kv_lora),
                          kv_vectors=self.kv_vectors, input_grad=input_grad)


@dataclass
class _Tally:
    """What the parameters of the whole model add up to, while they are read (each parameter once)."""

    total: int = 0
    trainable: int = 0
    weight_bytes: int = 0  # unquantized parameters, as stored
    trainable_bytes: int = 0
    quantized: int = 0  # elements of the Linear weights bitsandbytes quantizes
    largest_quantized: int = 0
    quantized_tensors: list[int] = field(default_factory=list)  # elements of each weight bitsandbytes quantizes
    outside_linear: int = 0  # elements of unquantized Linear weights outside the blocks
    adafactor_state: int = 0
    small_trainable: int = 0  # elements of trainable tensors under 4096 elements
    largest_trainable: int = 0
    by_size: dict[int, int] = field(default_factory=dict)  # trainable elements per element size
    before_trainable: bool = False  # something below the blocks trains (embeddings, a soft prompt)
    head_trainable: bool = False  # something above the blocks trains (the head, the final norm)
    blocks: dict[str, _BlockTally] = field(default_factory=dict)  # by block name, bottom to top
    weight_elems: int = 0
    outside: _BlockTally = field(default_factory=_BlockTally)  # the parameters outside the blocks

    def stored(self, prm: Any, block: _BlockTally | None, is_linear: bool, is_quantized: bool) -> None:
        n = prm.numel()
        self.total += n
        unit = block if block is not None else self.outside
        q, size = (n, 0) if is_quantized else (0, n * prm.element_size())
        u = unit.params
        unit.params = UnitParams(u.elems + n - q, u.bytes + size, u.quantized + q,
                                 u.trainable + (n if prm.requires_grad else 0))
        if is_quantized:
            self.quantized += n
            self.largest_quantized = max(self.largest_quantized, n)
            self.quantized_tensors.append(n)
            if block is not None:
                block.quantized = True
        else:
            self.weight_bytes += n * prm.element_size()
            self.weight_elems += n
            if is_linear and block is not None:
                block.linear += n
            elif is_linear:
                self.outside_linear += n

    def trained(self, prm: Any) -> None:
        n, size = prm.numel(), prm.element_size()
        self.trainable += n
        self.trainable_bytes += n * size
        self.by_size[size] = self.by_size.get(size, 0) + n
        self.largest_trainable = max(self.largest_trainable, n)
        # Adafactor factors a matrix's second moment into a row and a column vector; vectors keep a full one
        self.adafactor_state += n // prm.shape[-1] + n // prm.shape[-2] if prm.dim() >= 2 else n
        if n < 4096:
            self.small_trainable += n


def _tally_parameters(model: Any, info: dict[str, Any], lora_ids: set[int], composite: bool = False) -> _Tally:
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, linear_types())}
    base_ids = info["base_ids"]
    if not base_ids & {id(p) for p in model.parameters()}:  # a new model (a distillation student) is all "base"
        base_ids = {id(p) for p in model.parameters()}
    tally = _Tally()
    for name, prm in model.named_parameters():  # each shared parameter once, under its first name
        match = _LAYER.match(name)
        block = tally.blocks.setdefault(f"{match[1]}.{match[2]}", _BlockTally()) if match else None
        if block is not None and (".EncDecAttention." in name or (composite and _CROSS_KV.search(name))):
            block.cross_attention = True
        is_linear = id(prm) in linear_ids
        tally.stored(prm, block, is_linear, id(prm) in info["quantized_ids"])
        if not prm.requires_grad:
            continue
        tally.trained(prm)
        if block is not None:
            if id(prm) not in lora_ids:
                kv = composite and bool(_CROSS_KV.search(name))
                block.trained(name, prm, is_linear, id(prm) not in base_ids, kv)
        elif any(part in name for part in _BEFORE_LAYERS):
            tally.before_trainable = True
        else:
            tally.head_trainable = True
    return tally


_ByBlock = dict[str, list[tuple[int, int, float, int]]]  # per block, (in_features, r, dropout, bytes) of LoRA modules


def _lora_modules(model: Any, composite: bool = False) -> tuple[set[int], _ByBlock, _ByBlock]:
    """The trainable parameters of LoRA-style modules, and per block (in_features, r, dropout, bytes) of each; of
    a vision encoder-decoder (`composite`) those of the cross-attention keys/values apart, per block too."""
    import torch

    lora_ids: set[int] = set()
    by_block: _ByBlock = {}
    kv_by_block: _ByBlock = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not (isinstance(lora_a, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and len(lora_a)):
            continue
        adapter = next(iter(lora_a))
        a_layer = lora_a[adapter]
        if isinstance(a_layer, torch.nn.Parameter):  # AdaLoRA keeps raw (r, in) matrices
            a_shape, a_bytes = (int(a_layer.shape[1]), int(a_layer.shape[0])), a_layer.element_size()
        else:
            a_shape, a_bytes = (int(a_layer.in_features), int(a_layer.out_features)), a_layer.weight.element_size()
        drop = module.lora_dropout[adapter] if hasattr(module, "lora_dropout") else None
        p = float(getattr(drop, "p", 0.0) or 0.0)
        lora_ids |= {id(prm) for prm in module.parameters() if prm.requires_grad}
        match = _LAYER.match(name + ".")
        if match:
            kv = composite and _CROSS_KV.search(name + ".")
            table = kv_by_block if kv else by_block
            table.setdefault(f"{match[1]}.{match[2]}", []).append((*a_shape, p, a_bytes))
    return lora_ids, by_block, kv_by_block


def _reference_copy_bytes(model: Any, base_ids: set[int]) -> int:
    """What TRL's reference copy of the base weighs: none for a PEFT model (the base with the adapter disabled is
    its reference); otherwise the base's parameters loaded again from the checkpoint in the model's dtype."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        return 0
    size = model.dtype.itemsize
    return sum(p.numel() * size for p in model.parameters() if id(p) in base_ids)


def _embedding_bytes(model: Any) -> int:
    try:
        return int(model.get_input_embeddings().weight.element_size())
    except (AttributeError, NotImplementedError):
        return 0


def _checkpointing(model: Any) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first is the v5 name
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name, False))
    return False


def _base(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _virtual_tokens(model: Any, method: Any, params: dict[str, Any]) -> tuple[int, int]:
    """(tokens added to every sequence, tokens added to keys/values only) of a prompt-style method."""
    n = int(params.get(method.virtual_tokens) or 0) if method.virtual_tokens else 0
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        pc = next(iter(peft_config.values()))
        kind = str(getattr(pc, "peft_type", "")).upper()
        n = int(getattr(pc, "num_virtual_tokens", None) or n) if getattr(pc, "is_prompt_learning", False) else n
        if "PREFIX" in kind:
            return 0, n
    return n, 0
