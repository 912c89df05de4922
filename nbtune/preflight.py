"""Checks of a config against the model it names, before any weights load: what `TuneConfig` validation cannot
know without the model's config (its position limit, its layers' sizes), and whether a hub model can be had.

`check(config)` runs once where training starts (nbtune/training.py) and raises ConfigError naming the field, the
value and what this model allows. It reads the model's config.json and builds the architecture on the meta
device (nothing is allocated), so it costs well under a second for the embedded model.

`readiness(config, gpu, estimate)` says, without loading anything heavy, why a valid config would not run: what
the builder shows before it offers Launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.config import ConfigError, TuneConfig
from nbtune.tasks import TASKS

# Where architectures state how many positions they embed (learned position embeddings fail past it).
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length")


def check(config: TuneConfig, model_config: Any = None) -> None:
    """Raise ConfigError listing every problem of `config` against its model (the hub is asked for nothing when
    it cannot be reached: that is the first problem, said at once)."""
    from nbtune import models

    models.check_hub_reachable(config)
    model_config = model_config if model_config is not None else models.load_model_config(config)
    import torch

    from nbtune.training import argument_problems

    problems = [*attention_problems(config, on_gpu=torch.cuda.is_available()), *argument_problems(config),
                *_length_problems(config, model_config), *_rank_problems(config, model_config)]
    if problems:
        raise ConfigError(problems)


def attention_problems(config: TuneConfig, on_gpu: bool | None = None) -> list[tuple[str, str]]:
    """model.attn_implementation flash_attention_2 needs the flash-attn package importable here and, where
    `on_gpu` is known, a CUDA GPU; sdpa and eager run anywhere."""
    import importlib.util

    if config.model.attn_implementation != "flash_attention_2":
        return []
    field = "model.attn_implementation"
    if importlib.util.find_spec("flash_attn") is None:
        return [(field, f"{field} flash_attention_2 needs the flash-attn package, which is not installed here "
                        "(pip install flash-attn, on a CUDA machine); choose sdpa (default) or eager")]
    if on_gpu is False:
        return [(field, f"{field} flash_attention_2 runs on a CUDA GPU, and this machine has none; choose sdpa "
                        "(default) or eager")]
    return []


@dataclass(frozen=True)
class Blocker:
    """Why a config would not run, in the user's words; `field` is the dotted field to change, or "" for none."""

    field: str
    message: str


def readiness(config: TuneConfig, gpu: str | int | float | None = None, estimate: Any = None) -> list[Blocker]:
    """Why `config` would not run: fp16 loss scaling over fp16 trainable weights, flash-attention without its
    package, a model that cannot be had (a
    missing folder, a hub id neither cached nor downloadable), what the model's dimensions do not allow (a
    max length beyond its positions), a tracker or an extra TrainingArgument the installed transformers lacks, a
    step that does not fit the chosen GPU (from `estimate`, when both are given). Empty when nothing stands in
    the way. Reads no weights and never raises.

    The method/task pairing is not checked here: a TuneConfig that pairs them wrongly is invalid already.
    """
    model = model_blockers(config)
    shape = [] if model else shape_blockers(config)
    from nbtune.training import argument_problems

    attention = [Blocker(field, message) for field, message in attention_problems(config)]
    arguments = [Blocker(field, message) for field, message in argument_problems(config)]
    return [*data_blockers(config), *precision_blockers(config, gpu, estimate), *attention, *arguments, *model,
            *shape, *memory_blockers(estimate, gpu)]


def data_blockers(config: TuneConfig) -> list[Blocker]:
    """Data that cannot be had: config.yaml's "<in-memory: ...>" names rows it does not keep."""
    from nbtune.config import IN_MEMORY

    source = config.data.source
    if isinstance(source, str) and source.startswith(IN_MEMORY):
        return [Blocker("data.source", f"data.source {source} names in-memory rows that a config file does not "
                                       "keep: pass the rows (a list, DataFrame or Dataset) as data.source")]
    return _format_blockers(config)


def _format_blockers(config: TuneConfig) -> list[Blocker]:
    """Rows whose detected format (`data.format: auto`) the stage cannot train, read from built-in, local or
    in-memory data (a hub dataset is not downloaded for this; its rows are checked when the run starts)."""
    from nbtune import data, stages

    source = config.data.source
    on_hub = isinstance(source, str) and not source.startswith("nbtune:") and not Path(source).expanduser().exists()
    if config.data.format != "auto" or on_hub:  # an explicit format is checked by the config itself
        return []
    try:
        rows, _ = data.load_rows(config)
        if TASKS[config.model.task].inputs == "image":  # one format: an image and a label, caption or prompt
            data.image_rows(config.model.task).columns(config, rows[0])
        else:
            stages.check_format(stages.for_config(config), data.resolve_format(config, rows[0])[0])
    except ConfigError as err:
        return [Blocker(field, message) for field, message in err.problems]
    except Exception:  # rows that cannot be read fail where the run starts, with their own message
        return []
    return []


def shape_blockers(config: TuneConfig) -> list[Blocker]:
    """What the model's own dimensions do not allow (its position limit, the layers LoRA adapts): the problems
    `check` would raise where training starts, said before Launch."""
    from nbtune import models

    try:
        model_config = models.load_model_config(config)
    except Exception:  # the model cannot be had: model_blockers says why
        return []
    wrong_kind = _task_problems(config, model_config)
    if wrong_kind:
        return [Blocker(field, message) for field, message in wrong_kind]
    problems = [*_length_problems(config, model_config), *_rank_problems(config, model_config)]
    return [Blocker(field, message) for field, message in problems]


def memory_blockers(estimate: Any, gpu: str | int | float | None) -> list[Blocker]:
    """The step's estimated peak against the GPU: "needs 131 GiB, the T4 has 15.6 GiB: 115 GiB over"."""
    if estimate is None or gpu is None:
        return []
    from nbtune.estimator.gpus import gpu_bytes, gpu_spec

    title, capacity = gpu_bytes(gpu)
    need = int(estimate.total_bytes)
    if need <= capacity:
        return []
    name = f"the {_short_gpu_name(title)}" if gpu_spec(gpu) is not None else f"a {title} GPU"
    return [Blocker("", f"needs {_gib(need)}, {name} has {_gib(capacity)}: {_gib(need - capacity)} over")]


def _task_problems(config: TuneConfig, model_config: Any) -> list[tuple[str, str]]:
    """A transformers model the task's auto class cannot load (a text model for image-to-text, a ViT
    classifier as a captioner), said before the weights load."""
    if TASKS[config.model.task].library != "transformers":
        return []
    from nbtune import models

    auto = models.auto_class(config.model.task)
    mapping = getattr(auto, "_model_mapping", None)
    if mapping is None or type(model_config) in mapping or getattr(model_config, "auto_map", None):
        return []
    kind = getattr(model_config, "model_type", type(model_config).__name__)
    return [("model.name_or_path", f"model.name_or_path {config.model.name_or_path!r} is a {kind} model, which "
             f"{auto.__name__} cannot load for model.task {config.model.task}: choose a model of that task")]


def model_blockers(config: TuneConfig) -> list[Blocker]:
    """The model cannot be had: a folder that does not exist, or a hub id that is not in the local cache while
    the hub is offline or unreachable (`models.check_hub_reachable`; a bad hub id is a Blocker, not an error)."""
    from nbtune import models

    try:
        models.check_hub_reachable(config, timeout_s=1.0)
    except ConfigError as err:
        return [Blocker(field, message) for field, message in err.problems]
    except Exception as err:  # a malformed hub id, an unreadable cache: the run would fail the same way
        return [Blocker("model.name_or_path", f"model.name_or_path {config.model.name_or_path!r} cannot be "
                                              f"found: {type(err).__name__}: {err}")]
    return []


def precision_blockers(config: TuneConfig, gpu: str | int | float | None = None,
                       estimate: Any = None) -> list[Blocker]:
    """fp16 loss scaling over trainable fp16 weights stops at the first step ("Attempting to unscale FP16
    gradients"): methods that train the model's own weights (not PEFT adapters, which peft keeps in fp32).

    Judged for the chosen GPU (else this machine), with "auto" as the estimate resolved it when one is given.
    """
    from nbtune import precision
    from nbtune.methods import registry

    if registry.get(config.method.name).is_peft:
        return []
    planned = estimate.config if estimate is not None and getattr(estimate, "config", None) is not None else config
    device = precision.gpu_device(gpu) if gpu is not None else precision.this_device()
    scaled = precision.choose_precision(planned.training.precision, device).value == "fp16"
    if not (scaled and planned.model.dtype == "fp16" and device.kind == "cuda"):
        return []
    return [Blocker("model.dtype", f"{config.method.name} trains the model's own weights, and fp16 loss scaling "
                                   f"cannot train fp16 weights on {device.called} (the first step fails): set "
                                   f"model.dtype to fp32, or choose a PEFT method such as lora")]


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _short_gpu_name(title: str) -> str:
    """"NVIDIA T4 16 GB" -> "T4": the catalogue's title without the vendor and the size the sentence states."""
    words = title.removeprefix("NVIDIA ").split()
    return " ".join(words[:-2] if len(words) > 2 and words[-1] == "GB" else words)


def position_limit(model_config: Any) -> int | None:
    """How many positions the model embeds, or None when its config does not say."""
    for name in POSITION_LIMITS:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _length_problems(config: TuneConfig, model_config: Any) -> list[tuple[str, str]]:
    """data.max_length (plus a prompt method's virtual tokens, for learned positions) within the model's limit."""
    from nbtune.methods import registry

    limit = position_limit(model_config)
    if limit is None:
        return []
    max_length = config.data.max_length
    if max_length > limit:
        return [("data.max_length", f"data.max_length must be <= {limit}, the positions "
                                    f"{config.model.name_or_path} was trained for (got {max_length})")]
    method = registry.get(config.method.name)
    rotary = any(getattr(model_config, n, None) for n in ("rope_parameters", "rope_theta", "rope_scaling"))
    virtual = int(config.method_params.get(method.virtual_tokens) or 0) if method.virtual_tokens else 0
    if virtual and not rotary and max_length + virtual > limit:  # learned positions end at the limit
        return [("data.max_length", f"data.max_length {max_length} plus {method.name}'s {virtual} virtual tokens "
                                    f"must be <= {limit}, the positions {config.model.name_or_path} embeds: "
                                    f"use data.max_length <= {limit - virtual}")]
    return []


def _rank_problems(config: TuneConfig, model_config: Any) -> list[tuple[str, str]]:
    """LoRA's rank `r` no larger than the smallest layer it adapts (a rank above it learns nothing more).

    Only nbtune's own entries (LoRA, QLoRA): peft's generated methods give `r` other meanings (OFT: a number of
    blocks, VeRA: a shared random projection that may exceed the layer).
    """
    from nbtune.methods import registry

    method, params = registry.get(config.method.name), config.method_params
    rank = params.get("r")
    if not method.is_peft or method.generated or not isinstance(rank, int):
        return []
    smallest = _smallest_adapted_layer(config, model_config, params.get("target_modules"))
    if smallest is None or rank <= smallest[1]:
        return []
    name, size = smallest
    return [("method.r", f"method.r must be <= {size}, the smallest dimension of the layers {method.name} adapts "
                         f"on {config.model.name_or_path} ({name}) (got {rank})")]


def _smallest_adapted_layer(config: TuneConfig, model_config: Any, targets: Any) -> tuple[str, int] | None:
    """(module name, its smaller weight dimension) of the smallest layer the targets match, built on meta."""
    import torch

    from nbtune import models

    task = TASKS[config.model.task]
    targets = targets or (list(task.default_targets) or _default_targets(model_config))
    if not targets:
        return None
    with torch.device("meta"):
        if task.draws:  # the method adapts a pipeline's UNet only
            from nbtune import diffusion

            model = diffusion.fresh_model(model_config).unet
        else:
            model = models.auto_class(config.model.task).from_config(model_config)
    found = None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or type(module).__name__ == "Embedding" or not _targeted(name, targets):
            continue
        size = min(weight.shape)
        if found is None or size < found[1]:
            found = (name, size)
    return found


def _default_targets(model_config: Any) -> list[str] | None:
    """peft's default LoRA target modules for this architecture, or None when peft has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    return defaults.get(getattr(model_config, "model_type", None))


def _targeted(name: str, targets: Any) -> bool:
    """Whether peft adapts the module `name` for `targets` (a list of name suffixes, or "all-linear")."""
    if targets == "all-linear":
        return not name.endswith(("lm_head", "score", "classifier"))
    if isinstance(targets, str):
        import re

        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
