"""Loading the model and tokenizer a config names (the embedded default, a local folder or a hub id), and
`build`: the one way every path (training, loading a result, counting, the estimator) makes the model with its
method applied.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune import distributed, packed_attention
from nbtune._lazy import import_heavy
from nbtune.config import EMBEDDED_PREFIX, ConfigError, TuneConfig
from nbtune.dtypes import DTYPES, from_torch, torch_dtype
from nbtune.methods.registry import MethodContext
from nbtune.tasks import TASKS

if TYPE_CHECKING:
    from nbtune.methods.registry import Method


def resolve_path(name_or_path: str) -> str:
    """The path or hub id that `from_pretrained` receives for a config's model name."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        from nbtune import embedded

        if name_or_path not in embedded.MODELS:
            allowed = " or ".join(map(repr, embedded.MODELS))
            raise ValueError(f"model.name_or_path must be {allowed} for an embedded model (got {name_or_path!r})")
        return str(embedded.MODELS[name_or_path])
    return os.path.expanduser(name_or_path)


_OFFLINE_WORDS = ("1", "on", "yes", "true")


def check_hub_reachable(config: TuneConfig, timeout_s: float = 2.0) -> None:
    """Fail at once, naming model.name_or_path, when a hub model can be neither found in the local cache nor
    downloaded: offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or no connection to the hub (transformers
    would retry for ~26-40 s). A folder that does not exist is named as such. Behind a proxy, nothing is probed.
    """
    import socket
    from urllib.parse import urlparse

    name, revision = config.model.name_or_path, config.model.revision
    if name.startswith(EMBEDDED_PREFIX) or Path(resolve_path(name)).exists():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError([("model.name_or_path", f"model.name_or_path {name!r}: no such model folder")])
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return  # downloaded before: transformers can load it without the network
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").lower() in _OFFLINE_WORDS]
    why = f"the hub is offline here ({offline[0]}=1)" if offline or constants.HF_HUB_OFFLINE else None
    if why is None and not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
        except OSError as err:
            why = f"{host} cannot be reached ({err.strerror or err})"
    if why is not None:
        raise ConfigError([("model.name_or_path", (
            f"model.name_or_path {name!r} is a hub id that is not in the local cache, and {why}; give a local "
            f"folder with the model's files instead, or download it first (`hf download {name}`)"))])


def model_identity(config: TuneConfig) -> str:
    """What identifies the base weights: a hash of local files, or hub id + revision."""
    path = Path(resolve_path(config.model.name_or_path))
    if path.is_dir():
        return f"local:{folder_identity(path)}"
    return f"hub:{config.model.name_or_path}@{config.model.revision or 'main'}"


def folder_identity(path: Path) -> str:
    """A hash of a model folder's files (its subfolders' too: a pipeline holds its parts there)."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            digest.update(file.relative_to(path).as_posix().encode())
            stat = file.stat()
            if stat.st_size > 64 * 2**20:  # large weights: name, size and modification time stand for content
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            else:
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def load_model_config(config: TuneConfig) -> Any:
    """The transformers PretrainedConfig of the config's model (local files or hub); for a diffusers pipeline
    its parts' configs (nbtune/diffusion.py PipelineConfig)."""
    import_heavy()
    from transformers import AutoConfig

    m = config.model
    if TASKS[m.task].draws:
        from nbtune import diffusion

        return diffusion.load_config(resolve_path(m.name_or_path), revision=m.revision)
    return AutoConfig.from_pretrained(resolve_path(m.name_or_path), revision=m.revision,
                                      trust_remote_code=m.trust_remote_code)


def auto_class(task: str) -> Any:
    """The transformers AutoModel class that loads a model for `task`."""
    import importlib

    return getattr(importlib.import_module(TASKS[task].library), TASKS[task].auto_class)


def load_tokenizer(config: TuneConfig) -> Any:
    """The model's tokenizer, padding on the right; for image-cls its image processor instead, for image-to-text
    both (nbtune/captions.py): what turns a row into the model's inputs."""
    import_heavy()
    from transformers import AutoImageProcessor, AutoTokenizer

    m = config.model
    if TASKS[m.task].draws:
        from nbtune import diffusion

        return diffusion.load_tokenizer(resolve_path(m.name_or_path), revision=m.revision)
    if TASKS[m.task].captions:
        from nbtune import captions

        return captions.load_processor(resolve_path(m.name_or_path), revision=m.revision,
                                       trust_remote_code=m.trust_remote_code)
    if TASKS[m.task].inputs == "image":
        from nbtune import noise

        with noise.no_torchvision_note():
            return AutoImageProcessor.from_pretrained(resolve_path(m.name_or_path), revision=m.revision,
                                                      trust_remote_code=m.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(m.name_or_path), revision=m.revision,
                                              trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def weights_dtype(config: TuneConfig) -> str:
    """The dtype the base weights load in here: `model.dtype`, with "auto" resolved for this machine."""
    if config.model.dtype != "auto":
        return config.model.dtype
    from nbtune import precision

    return precision.resolve(config, precision.this_device())[2].value


def load_model(config: TuneConfig, num_labels: int | None = None, extra_kwargs: dict[str, Any] | None = None,
               tokenizer: Any = None) -> Any:
    """Load the base model for the config's task, dtype ("auto": see `weights_dtype`) and attention."""

    m = config.model
    if TASKS[m.task].draws:
        from nbtune import diffusion

        return diffusion.load_model(resolve_path(m.name_or_path), torch_dtype(weights_dtype(config)),
                                    revision=m.revision)
    kwargs: dict[str, Any] = {
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
        "dtype": torch_dtype(weights_dtype(config)),
        "attn_implementation": packed_attention.attn_implementation(config),
    }
    if config.training.dropout is not None:
        kwargs.update(_dropout_kwargs(config, config.training.dropout))
    if TASKS[m.task].classifies:
        kwargs["num_labels"] = num_labels or 2
    if TASKS[m.task].head:  # a pre-trained vision model comes with its own head (ImageNet's 1000 classes)
        kwargs["ignore_mismatched_sizes"] = True
    kwargs.update(extra_kwargs or {})
    try:
        model = auto_class(m.task).from_pretrained(resolve_path(m.name_or_path), **kwargs)
    except ValueError as err:
        if "does not support an attention implementation" not in str(err):
            raise
        raise ConfigError([("model.attn_implementation", (
            f"model.attn_implementation must be eager for {m.name_or_path}, a part of which has no "
            f"{kwargs['attn_implementation']} attention ({str(err).split('.')[0]}) (got "
            f"{m.attn_implementation!r})"))]) from None
    if getattr(tokenizer, "pad_token_id", None) is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _dropout_kwargs(config: TuneConfig, p: float) -> dict[str, Any]:
    """Config overrides that set the model's dropout, for the names the architecture uses."""
    model_config = load_model_config(config)
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate")
    return {name: p for name in names if hasattr(model_config, name)}


@dataclass
class BuiltModel:
    """A config's model with its method applied, and what applying the method needed."""

    model: Any  # the model to train (or to count, or to measure)
    method: Method
    params: dict[str, Any]  # the method's parameters, defaults filled in
    ctx: MethodContext  # what the method's hooks need later (training loss, callbacks, saving)
    load_kwargs: dict[str, Any]  # what the method added to loading the base (QLoRA: its quantization config)


def build(config: TuneConfig, *, device: str | None = None, model_config: Any = None, tokenizer: Any = None,
          labels: Sequence[str] = (), dtype: str | None = None, extras: dict[str, Any] | None = None,
          with_load_kwargs: bool = True, prepare: Callable[[Any, dict[str, Any]], None] | None = None,
          trained: Path | None = None) -> BuiltModel:
    """The config's base model with its method applied (or, with `trained`, that run artifact loaded onto it).

    Without `device` the base's weights are loaded (`model.name_or_path`, in `weights_dtype`). With a device
    ("meta": nothing is allocated, "cpu") it is built from `model_config` (default: the config's) with fresh
    weights on that device, and the method is applied there too. `labels` name a classification head's classes;
    `dtype` is the dtype the method is told (default: the one the weights load in); `extras` are handed to the
    method (e.g. "total_steps"). `with_load_kwargs=False` builds QLoRA's base unquantized (counting: the logical
    counts are the same). `prepare(base, load_kwargs)` runs on the base just before the method is applied.
    """
    from nbtune.methods import registry

    method = registry.get(config.method.name)
    params = config.method_params
    if dtype is None:
        dtype = weights_dtype(config) if device is None else config.model.dtype
    ctx = MethodContext(task=config.model.task, model_config=model_config, tokenizer=tokenizer,
                        num_labels=len(labels) or None, dtype=dtype,
                        sharded=config.distributed.strategy in distributed.SHARDED, extras=dict(extras or {}))
    load_kwargs = method.load_kwargs(params, ctx) if method.load_kwargs and with_load_kwargs else {}
    if device is None:
        base = load_model(config, num_labels=ctx.num_labels, extra_kwargs=load_kwargs, tokenizer=tokenizer)
        return _apply(BuiltModel(_with_labels(base, labels), method, params, ctx, load_kwargs), prepare, trained)
    import torch

    with torch.device(device):  # the method's new weights too (tests/test_methods.py: counts equal a real model's)
        base = _fresh_model(config, model_config or load_model_config(config), load_kwargs, dtype)
        return _apply(BuiltModel(_with_labels(base, labels), method, params, ctx, load_kwargs), prepare, trained)


def _apply(base: BuiltModel, prepare: Callable[[Any, dict[str, Any]], None] | None,
           trained: Path | None) -> BuiltModel:
    """The method applied to `base.model` (or the trained artifact loaded onto it), after `prepare`."""
    if prepare is not None:
        prepare(base.model, base.load_kwargs)
    base.ctx.model_config = base.model.config
    draws = TASKS[base.ctx.task].draws  # a diffusion model: the method adapts its UNet, the rest stays frozen
    part = base.model.unet if draws else base.model
    if trained is not None:
        from nbtune.methods.artifacts import load_trained

        part = load_trained(base.method, part, trained, base.ctx)
    else:
        part = base.method.apply(part, base.params, base.ctx)
    if draws:
        base.model.unet = part
    else:
        base.model = part
    return base


def _with_labels(model: Any, labels: Sequence[str]) -> Any:
    """The model, its config naming the classification labels (what the saved artifact records)."""
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    return model


def _fresh_model(config: TuneConfig, model_config: Any, load_kwargs: dict[str, Any], dtype: str) -> Any:
    """The config's architecture with fresh weights, in the dtype the method's loading asks for, else `dtype`."""
    chosen = load_kwargs.get("dtype") or load_kwargs.get("torch_dtype") or (dtype if dtype in DTYPES else None)
    if isinstance(chosen, str):
        chosen = torch_dtype(from_torch(chosen) or chosen)
    kwargs = {"dtype": chosen} if chosen is not None else {}  # none: transformers' default, fp32
    if TASKS[config.model.task].draws:
        from nbtune import diffusion

        return diffusion.fresh_model(model_config, chosen)
    return auto_class(config.model.task).from_config(
        model_config, attn_implementation=packed_attention.attn_implementation(config), **kwargs)
