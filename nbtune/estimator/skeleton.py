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
from nbtune.dtypes import BYTES

DTYPE_BYTES = BYTES
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|block|blocks))\.(\d+)\.")
_BEFORE_LAYERS = ("embed", "wte", "wpe", "shared", "prompt_encoder", "prefix", "token_type")


@dataclass(frozen=True)
class LayerFacts:
    """What one transformer block trains and stores."""

    full: bool  # it has trainable weights of its own Linear layers (its inputs must be saved)
    quantized: bool  # bitsandbytes Linear layers save their input for the backward
    lora: tuple[tuple[int, int, float, int], ...] = ()  # (in_features, r, dropout, adapter bytes) per LoRA module
    other_trainable: int = 0  # trainable elements that are neither Linear weights nor LoRA (biases, IA3 vectors)
    added: tuple[tuple[int, int], ...] = ()  # (in, out) of trainable Linear layers the method added (adapters)
    vectors: int = 0  # elements of trainable scaling vectors (IA3): each saves the tensor it scales


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
    dims: dict[str, int] = field(default_factory=dict)
    family: str = "gated"  # "gated": RMSNorm + gated MLP (Llama-like); "gpt": LayerNorm + 2-matrix MLP


def model_dims(model_config: Any) -> dict[str, int]:
    """Hidden size, MLP size, heads, kv heads, head dim, vocabulary and layers, for any common architecture."""
    c = model_config

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
    return {"h": h, "I": int(first("intermediate_size", "n_inner", "d_ff", default=4 * h) or 4 * h), "a": a,
            "kv": kv_heads * head_dim, "head_dim": head_dim, "q": a * head_dim, "V": int(c.vocab_size), "L": layers,
            "attn_dropout": int(attn_dropout > 0)}


def build_model(config: TuneConfig, model_config: Any, device: str = "meta") -> tuple[Any, dict[str, Any]]:
    """The model of `config` with its method applied, built on `device` (no weights are read).

    Returns (model, info) where info holds the quantization settings and the ids of the parameters that
    bitsandbytes would quantize (the skeleton keeps them as ordinary Linear weights).
    """
    import copy

    import torch

    from nbtune.dtypes import from_torch, torch_dtype
    from nbtune.methods import MethodContext, registry
    from nbtune.models import auto_class

    method = registry.get(config.method.name)
    params = config.method_params
    task = config.model.task
    model_config = copy.deepcopy(model_config)
    if task == "seq-cls" and getattr(model_config, "num_labels", 2) < 2:
        model_config.num_labels = 2
    ctx = MethodContext(task=task, model_config=model_config, dtype=config.model.dtype,
                        num_labels=getattr(model_config, "num_labels", 2) if task == "seq-cls" else None)
    load_kwargs = method.hook("load_kwargs")(params, ctx) if method.load_kwargs else {}
    quant = _quant_settings(load_kwargs.get("quantization_config"))
    dtype = load_kwargs.get("dtype") or load_kwargs.get("torch_dtype") or torch_dtype(config.model.dtype)
    if isinstance(dtype, str):
        dtype = torch_dtype(from_torch(dtype) or dtype)
    with torch.device(device):
        model = auto_class(task).from_config(model_config, dtype=dtype,
                                             attn_implementation=config.model.attn_implementation)
    quantized: set[int] = set()
    if quant["bits"]:
        skip = set(quant["skip"]) | {"lm_head", "score", "classifier"}
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not out_emb and not (set(name.split(".")) & skip):
                quantized.add(id(module.weight))
        setattr(model, f"is_loaded_in_{quant['bits']}bit", True)
    ctx.model_config = model.config
    base_ids = {id(p) for p in model.parameters()}
    model = method.hook("apply")(model, params, ctx)
    return model, {"base_ids": base_ids, "quant": quant, "quantized_ids": quantized, "method": method, "params": params, "ctx": ctx}


def _quant_settings(qc: Any) -> dict[str, Any]:
    if qc is None:
        return {"bits": 0, "double": False, "block": 64, "skip": ()}
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    bits = 4 if get("load_in_4bit", False) else 8 if get("load_in_8bit", False) else 0
    return {"bits": bits, "double": bool(get("bnb_4bit_use_double_quant", False)), "block": 64,
            "skip": tuple(get("llm_int8_skip_modules", None) or ())}


def _key(config: TuneConfig, model_config: Any) -> str:
    m = config.model
    return json.dumps([model_config.to_json_string(use_diff=False), m.task, m.dtype, m.attn_implementation,
                       config.method.name, config.method_params], sort_keys=True, default=str)


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
    import torch

    model, info = build_model(config, model_config)
    dims = model_dims(model_config)
    quantized_ids = info["quantized_ids"]
    method = info["method"]
    linear_weight_ids = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lora_ids: set[int] = set()
    lora_by_layer: dict[str, list[tuple[int, int, float, int]]] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and len(lora_a):
            adapter = next(iter(lora_a))
            a_layer = lora_a[adapter]
            if isinstance(a_layer, torch.nn.Parameter):  # AdaLoRA keeps raw (r, in) matrices
                a_shape, a_bytes = (int(a_layer.shape[1]), int(a_layer.shape[0])), a_layer.element_size()
            else:
                a_shape, a_bytes = (int(a_layer.in_features), int(a_layer.out_features)), a_layer.weight.element_size()
            drop = module.lora_dropout[adapter] if hasattr(module, "lora_dropout") else None
            p = float(getattr(drop, "p", 0.0) or 0.0)
            for sub in module.modules():
                for prm in sub.parameters(recurse=False):
                    if prm.requires_grad:
                        lora_ids.add(id(prm))
            match = _LAYER.match(name + ".")
            if match:
                lora_by_layer.setdefault(f"{match[1]}.{match[2]}", []).append((*a_shape, p, a_bytes))

    seen: set[int] = set()
    total = trainable = weight_bytes = trainable_bytes = qparams = 0
    ada = small = largest = largest_linear = copies = 0
    elem_count: dict[int, int] = {}
    layer_keys: list[str] = []
    layer_full: dict[str, bool] = {}
    layer_quant: dict[str, bool] = {}
    layer_other: dict[str, int] = {}
    layer_linear: dict[str, int] = {}
    layer_added: dict[str, list[tuple[int, int]]] = {}
    layer_vectors: dict[str, int] = {}
    base_ids = info["base_ids"]
    if not base_ids & {id(p) for p in model.parameters()}:  # a new model (a distillation student) is all "base"
        base_ids = {id(p) for p in model.parameters()}
    outside_linear = 0
    before_trainable = head_trainable = False
    for name, prm in model.named_parameters(remove_duplicate=False):
        if id(prm) in seen:
            continue
        seen.add(id(prm))
        n = prm.numel()
        total += n
        match = _LAYER.match(name)
        lkey = f"{match[1]}.{match[2]}" if match else None
        if lkey and lkey not in layer_full:
            layer_keys.append(lkey)
            layer_full[lkey] = layer_quant[lkey] = False
            layer_other[lkey] = layer_linear[lkey] = layer_vectors[lkey] = 0
            layer_added[lkey] = []
        is_linear = id(prm) in linear_weight_ids
        if id(prm) in quantized_ids:
            qparams += n
            if lkey:
                layer_quant[lkey] = True
            largest_linear = max(largest_linear, n)
        else:
            weight_bytes += n * prm.element_size()
            if is_linear:
                if lkey:
                    layer_linear[lkey] += n
                else:
                    outside_linear += n
        if not prm.requires_grad:
            continue
        trainable += n
        trainable_bytes += n * prm.element_size()
        elem_count[prm.element_size()] = elem_count.get(prm.element_size(), 0) + n
        largest = max(largest, n)
        if prm.dim() >= 2:
            ada += n // prm.shape[-1] + n // prm.shape[-2]
        else:
            ada += n
        if n < 4096:
            small += n
        if lkey:
            if id(prm) in lora_ids:
                pass
            elif is_linear and id(prm) not in base_ids:
                layer_added[lkey].append((int(prm.shape[1]), int(prm.shape[0])))
            elif is_linear:
                layer_full[lkey] = True
            else:
                layer_other[lkey] += n
                if id(prm) not in base_ids and prm.dim() >= 1 and not name.endswith("bias"):
                    layer_vectors[lkey] += n
        elif any(part in name for part in _BEFORE_LAYERS):
            before_trainable = True
        else:
            head_trainable = True

    trainable_layers = [i for i, k in enumerate(layer_keys)
                        if layer_full[k] or layer_other[k] or k in lora_by_layer or layer_added[k]]
    virtual, prefix = _virtual_tokens(model, method, info["params"])
    if before_trainable or prefix:
        first = 0
    elif trainable_layers:
        first = trainable_layers[0]
    else:
        first = len(layer_keys)
    layers = tuple(
        LayerFacts(full=layer_full[k], quantized=layer_quant[k], lora=tuple(lora_by_layer.get(k, ())),
                   other_trainable=layer_other[k], added=tuple(layer_added[k]), vectors=layer_vectors[k])
        for k in layer_keys[first:])
    copies = sum(layer_linear[k] for k in layer_keys[first:]) + outside_linear
    family = "gated" if any(".gate_proj." in n or ".w1." in n for n, _ in model.named_parameters()) else "gpt"
    teacher = info["ctx"].extras.get("teacher")
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters()) if teacher is not None else 0
    if trainable:
        counted = _count_with_registry(model)
        if counted is not None:
            trainable, total = counted[0], counted[1] + (qparams if counted[1] < total else 0)
    return Facts(
        total_params=total, trainable_params=trainable, weight_bytes=weight_bytes, trainable_bytes=trainable_bytes,
        trainable_elem_bytes=max(elem_count, key=elem_count.get) if elem_count else 4,
        quantized_params=qparams, quant_bits=info["quant"]["bits"], quant_double=info["quant"]["double"],
        quant_block=info["quant"]["block"], adafactor_state_elems=ada, small_trainable_elems=small,
        largest_trainable_elems=largest, largest_linear_elems=largest_linear, layers=layers,
        total_layers=len(layer_keys), head_trainable=head_trainable, autocast_copy_elems=copies,
        virtual_tokens=virtual, prefix_tokens=prefix,
        forced_checkpointing=_checkpointing(_base(model)),
        residual_bytes=_embedding_bytes(model), teacher_bytes=teacher_bytes, dims=dims, family=family)


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


def _count_with_registry(model: Any) -> tuple[int, int] | None:
    """The methods' own counting, when present, so the estimator and a real run agree on the numbers."""
    try:
        from nbtune.methods.counting import count_parameters
    except ImportError:
        return None
    return tuple(count_parameters(model))  # type: ignore[return-value]
