"""Loading the model and tokenizer a config names: the embedded default, a local folder or a hub id."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from nbtune._lazy import import_heavy
from nbtune.config import EMBEDDED_MODEL, EMBEDDED_PREFIX, TuneConfig
from nbtune.dtypes import torch_dtype
from nbtune.tasks import TASKS


def resolve_path(name_or_path: str) -> str:
    """The path or hub id that `from_pretrained` receives for a config's model name."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        from nbtune import embedded

        if name_or_path != EMBEDDED_MODEL:
            raise ValueError(f"model.name_or_path must be {EMBEDDED_MODEL!r} for the embedded model (got {name_or_path!r})")
        return str(embedded.BASE_MODEL_DIR)
    return os.path.expanduser(name_or_path)


def model_identity(config: TuneConfig) -> str:
    """What identifies the base weights: a hash of local files, or hub id + revision."""
    path = Path(resolve_path(config.model.name_or_path))
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(path.iterdir()):
            if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
                digest.update(file.name.encode())
                stat = file.stat()
                if stat.st_size > 64 * 2**20:  # large weights: name, size and modification time stand for content
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
                else:
                    digest.update(file.read_bytes())
        return f"local:{digest.hexdigest()[:16]}"
    return f"hub:{config.model.name_or_path}@{config.model.revision or 'main'}"


def load_model_config(config: TuneConfig) -> Any:
    """The transformers PretrainedConfig of the config's model (local files or hub)."""
    import_heavy()
    from transformers import AutoConfig

    m = config.model
    return AutoConfig.from_pretrained(resolve_path(m.name_or_path), revision=m.revision,
                                      trust_remote_code=m.trust_remote_code)


def auto_class(task: str) -> Any:
    """The transformers AutoModel class that loads a model for `task`."""
    import transformers

    return getattr(transformers, TASKS[task].auto_class)


def load_tokenizer(config: TuneConfig) -> Any:
    import_heavy()
    from transformers import AutoTokenizer

    m = config.model
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
    kwargs: dict[str, Any] = {
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
        "dtype": torch_dtype(weights_dtype(config)),
        "attn_implementation": m.attn_implementation,
    }
    if config.training.dropout is not None:
        kwargs.update(_dropout_kwargs(config, config.training.dropout))
    if m.task == "seq-cls":
        kwargs["num_labels"] = num_labels or 2
    kwargs.update(extra_kwargs or {})
    model = auto_class(m.task).from_pretrained(resolve_path(m.name_or_path), **kwargs)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _dropout_kwargs(config: TuneConfig, p: float) -> dict[str, Any]:
    """Config overrides that set the model's dropout, for the names the architecture uses."""
    model_config = load_model_config(config)
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate")
    return {name: p for name in names if hasattr(model_config, name)}
