"""Ground truth on CPU: exact bytes of one real training step of a small model (for tests and benchmarks).

Parameters, gradients and optimizer state are summed from the tensors after the step; activations are the
unique storages that autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks), parameters
excluded; the step's peak is the most bytes of tensors its forward and backward hold at once, beyond what
existed before it (simulate.StorageTracker on real tensors; views of the parameters, buffers and inputs, such as
the transposed weight a Linear saves, are not new storage).
"""

from __future__ import annotations

from typing import Any

from nbtune.config import TuneConfig
from nbtune.estimator.estimate import packs
from nbtune.estimator.skeleton import build_model
from nbtune.optimizers import OPTIMIZERS
from nbtune.tasks import TASKS


def make_optimizer(config: TuneConfig, params: list[Any], *, foreach: bool | None = None, fused: bool = False) -> Any:
    """The optimizer the Trainer builds for `training.optimizer` (bitsandbytes ones need CUDA).

    `foreach` and `fused` choose torch's implementation of AdamW and SGD (None: torch's default for the device).
    """
    import torch

    optimizer = OPTIMIZERS[config.training.optimizer]
    if optimizer.bitsandbytes_class is not None:
        import bitsandbytes as bnb

        return getattr(bnb.optim, optimizer.bitsandbytes_class)(params, lr=1e-4)
    if optimizer.state == "adam":
        return torch.optim.AdamW(params, lr=1e-4, fused=True) if fused else \
            torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    if optimizer.state == "momentum":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=foreach)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)


def training_model(config: TuneConfig, model_config: Any, seed: int = 0) -> tuple[Any, dict[str, Any], int]:
    """The model of `config` with fresh weights on the CPU, set to train as a run trains it (4-bit where the
    method quantizes, gradient checkpointing where asked): (model, build info, bytes of quantization state)."""
    import torch

    torch.manual_seed(seed)
    model, info = build_model(config, model_config, device="cpu")
    quant_bytes = 0
    if info["quant"]["bits"]:
        model, quant_bytes = _quantized_model(config, model_config, info)
    model.train()
    if config.training.gradient_checkpointing and TASKS[config.model.task].draws:  # diffusers' own switch
        unet = model.unet.get_base_model() if hasattr(model.unet, "get_base_model") else model.unet
        unet.enable_gradient_checkpointing()
    elif config.training.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, info, quant_bytes


def measure_step(config: TuneConfig, model_config: Any, seed: int = 0) -> dict[str, int]:
    """Bytes of weights, trainable weights, gradients, optimizer state and saved activations of one CPU step,
    and the peak its forward and backward add ("step_peak")."""
    import torch

    from nbtune.estimator.simulate import StorageTracker  # simulate imports this module

    model, info, quant_bytes = training_model(config, model_config, seed)
    teacher = info["ctx"].extras.get("teacher")
    t = config.training
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    b, s = t.micro_batch_size, config.data.max_length
    if TASKS[config.model.task].draws:
        ids, inputs = None, drawing_inputs(model_config, b)
        s = model_config.unet["sample_size"] ** 2  # the UNet's positions: the latent grid
    elif TASKS[config.model.task].captions:
        ids, inputs = None, caption_inputs(model_config, b, s)
    elif TASKS[config.model.task].inputs == "image":
        ids, inputs = None, image_inputs(model_config, b)
        s = inputs["pixel_values"].shape[-1] ** 2 // model_config.patch_size ** 2 + 1  # patches and class token
    else:
        ids = torch.randint(0, int(model_config.vocab_size), (b, s))
        labels = torch.zeros((b,), dtype=torch.long) if TASKS[config.model.task].classifies else ids
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if packs(config):
        inputs = packed_inputs(config, ids)
    skip = {p.untyped_storage().data_ptr() for p in params}
    skip |= {x.untyped_storage().data_ptr() for x in model.buffers()}
    saved: dict[int, int] = {}

    def pack(x: Any) -> Any:
        storage = x.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return x

    autocast = t.precision in ("fp16", "bf16")  # the Trainer autocasts whenever bf16/fp16 is set
    optimizer = make_optimizer(config, trainable)
    tracker = StorageTracker()
    for x in [*params, *model.buffers(), *(v for v in inputs.values() if isinstance(v, torch.Tensor))]:
        tracker.track(x)  # what exists before the step: views of it (a weight's .t(), detach) allocate nothing
    before = tracker.peak = tracker.current
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = step_loss(config, model, inputs)
        if teacher is not None:
            with torch.no_grad():
                teacher(input_ids=ids) if ids is not None else teacher(pixel_values=inputs["pixel_values"])
        loss.backward()
    optimizer.step()

    def nbytes(tensors: Any) -> int:
        return sum(x.numel() * x.element_size() for x in tensors)

    state = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "weights": nbytes(params) + quant_bytes,
        "quantization_constants": quant_bytes,
        "trainable_weights": nbytes(trainable),
        "gradients": nbytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state": nbytes(state),
        "saved_activations": sum(saved.values()),
        "step_peak": tracker.peak - before,
        "tokens": b * s,
    }


def image_inputs(model_config: Any, batch: int) -> dict[str, Any]:
    """A batch of random square images at the model's size, with class labels."""
    import torch

    size, channels = model_config.image_size, getattr(model_config, "num_channels", 3)
    return {"pixel_values": torch.randn(batch, channels, size, size),
            "labels": torch.randint(0, max(int(model_config.num_labels), 2), (batch,))}


def caption_inputs(model_config: Any, batch: int, length: int) -> dict[str, Any]:
    """A batch as nbtune/captions.py's Collator makes it for an image-to-text model, every caption `length`
    tokens long (the estimate's worst case, data.max_length): random square images at the encoder's size, random
    caption ids as labels and a decoder attention mask over all of them."""
    import torch

    encoder = model_config.encoder
    size = encoder.image_size
    height, width = (size, size) if isinstance(size, int) else size
    labels = torch.randint(0, int(model_config.decoder.vocab_size), (batch, length))
    pixels = torch.randn(batch, getattr(encoder, "num_channels", 3), height, width)
    return {"pixel_values": pixels, "labels": labels,
            "decoder_attention_mask": torch.ones_like(labels)}


def drawing_inputs(model_config: Any, batch: int) -> dict[str, Any]:
    """A batch as nbtune/diffusion.py's Collator makes it for a text-to-image model: random images in [-1, 1] at
    the pipeline's resolution and random prompt ids, every prompt padded to the text encoder's positions (the
    tokenizer's model_max_length for Stable Diffusion's CLIP)."""
    import torch

    size, text = model_config.resolution, model_config.text_encoder
    return {"pixel_values": torch.rand(batch, 3, size, size) * 2 - 1,
            "input_ids": torch.randint(0, int(text.vocab_size), (batch, int(text.max_position_embeddings)))}


def step_loss(config: TuneConfig, model: Any, inputs: dict[str, Any]) -> Any:
    """The step's loss as training computes it: the model's own, or chunked (training.loss_implementation;
    liger's kernels need CUDA, and a CPU run computes its loss chunked). A DiffusionModel returns a dict."""
    from nbtune import losses

    if TASKS[config.model.task].draws:
        return model(**inputs)["loss"]
    if losses.requested(config) == "standard" or config.model.task != "causal-lm":
        return model(**inputs).loss
    return losses.chunked_loss(model, inputs)[0]


def packed_inputs(config: TuneConfig, ids: Any) -> dict[str, Any]:
    """A worst-case batch as `training.packing` makes it, (micro-batch, max_length) tokens: the first half of
    the rows one example as long as the row, the other half two examples of half its length each (or, where
    attention runs per example, sdpa and flash-attention, all of them in one row)."""
    from nbtune.data import packing_collator

    half, whole = ids.shape[1] // 2, (len(ids) + 1) // 2
    parts = [*ids[:whole], *(part for row in ids[whole:] for part in (row[:half], row[half:]))]
    examples = [{"input_ids": part.tolist(), "labels": part.tolist()} for part in parts]
    return packing_collator(config, pad_token_id=-1)(examples)


def _quantized_model(config: TuneConfig, model_config: Any, info: dict[str, Any]) -> tuple[Any, int]:
    """The model really loaded in 4 bits by bitsandbytes (on CPU), with its method; and its constants' bytes."""
    import tempfile

    from nbtune.dtypes import torch_dtype
    from nbtune.methods import MethodContext
    from nbtune.models import auto_class
    from nbtune.packed_attention import attn_implementation

    method, params = info["method"], info["params"]
    ctx = MethodContext(task=config.model.task, model_config=model_config, dtype=config.model.dtype)
    kwargs = method.load_kwargs(params, ctx)
    with tempfile.TemporaryDirectory() as folder:
        auto_class(config.model.task).from_config(model_config).save_pretrained(folder)
        model = auto_class(config.model.task).from_pretrained(  # attention as training loads it (packing's too)
            folder, dtype=torch_dtype(config.model.dtype), device_map="cpu",
            attn_implementation=attn_implementation(config), **kwargs)
    constants: dict[int, int] = {}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        # the absmax and code table of each weight, and with double quantization the nested ones and the offset
        nested = getattr(state, "state2", None)
        tensors = [state.absmax, state.code]
        tensors += [nested.absmax, nested.code, state.offset] if nested is not None else []
        for x in tensors:
            constants[x.untyped_storage().data_ptr()] = x.numel() * x.element_size()
    ctx.model_config = model.config
    return method.apply(model, params, ctx), sum(constants.values())
