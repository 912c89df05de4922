"""The fine-tuning configuration: one typed, validated object that round-trips through YAML and JSON.

`TuneConfig()` with no arguments is a complete config on the embedded default (a tiny pretrained model and a
built-in dataset), so a first run needs no choices. Every problem of a config is reported at once, each naming
the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune import chat_templates, dtypes, formats, losses, optimizers, rewards, stages, tasks

if TYPE_CHECKING:
    from nbtune.methods.registry import Field

SCHEMA_VERSION = 1

EMBEDDED_MODEL = "nbtune:tiny"
EMBEDDED_PREFIX = "nbtune:"

TASKS = tuple(tasks.TASKS)
# "auto" is resolved where the config runs or is planned for (nbtune.precision); the config keeps "auto".
DTYPES = ("auto", *dtypes.DTYPES)
PRECISIONS = DTYPES  # training.precision names the same formats, auto included
OPTIMIZERS = tuple(optimizers.OPTIMIZERS)
SCHEDULERS = ("linear", "cosine", "constant", "constant-with-warmup")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
AUGMENTATIONS = ("none", "flip")  # data.augment: what nbtune/images.py does to training images
# distributed.strategy: how several processes share a run (nbtune/distributed.py says what each means to
# accelerate; the estimator's per-GPU terms read the same names)
STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")
SHARDING = ("full", "gradients-and-optimizer", "hybrid")  # FSDP: what each process keeps a shard of
ON_OOM = ("fail", "shrink")  # training.on_oom: what a CUDA out-of-memory does to a run (nbtune/training.py)
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
# A config is a few hundred bytes; these bound what reading an untrusted one costs (a 645-byte alias bomb
# expands to 10^9 values): the text's size, its values counted with every alias (*name) expanded, its nesting.
MAX_YAML_BYTES = 4 * 2**20
MAX_YAML_VALUES = 1_000_000
MAX_YAML_DEPTH = 64


class ConfigError(ValueError):
    """A config with one or more invalid values; `problems` lists them all as (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{name}: {message}" for name, message in problems]
        super().__init__("invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else "invalid config: " + lines[0])

    def for_field(self, name: str) -> str | None:
        """The message for one field (dotted name), or None."""
        return next((m for f, m in self.problems if f == name), None)


@dataclass(frozen=True)
class Range:
    """The numbers a config field allows, and how an error message says so ("> 0 and <= 1")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself is not allowed
    high_open: bool = False
    note: str = ""  # said after the bounds, e.g. " (0 turns clipping off)"

    def allows(self, value: Any, integer: bool = False) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below  # written as comparisons that hold, so NaN is refused

    def words(self, integer: bool = False) -> str:
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            bounds = f"between {_number(self.low)} and {_number(self.high)}"
        else:
            parts = [f"{'>' if self.low_open else '>='} {_number(self.low)}" if self.low is not None else "",
                     f"{'<' if self.high_open else '<='} {_number(self.high)}" if self.high is not None else ""]
            bounds = " and ".join(p for p in parts if p)
        return ("an integer " if integer else "") + bounds + self.note


def _number(value: float) -> str:
    """A bound as a message writes it: 4294967295, not 4.29497e+09."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def _about(help: str, **facts: Any) -> dict[str, Any]:  # noqa: A002 (PEFT's word for it)
    """A config field's metadata: its help sentence and optional `choices`, `range`, `unit`, `multiline`."""
    return {"help": help, **facts}


COUNT = Range(low=1)  # a count of steps, rows or examples


@dataclass
class ModelConfig:
    """Which model to tune and for what task."""

    name_or_path: str = field(default=EMBEDDED_MODEL, metadata=_about(
        "A hub id (e.g. Qwen/Qwen2.5-0.5B), a local folder, or nbtune:tiny (the embedded model)."))
    task: str = field(default="causal-lm", metadata=_about(
        "; ".join(f"{t.name}: {t.description}" for t in tasks.TASKS.values()) + ".", choices=TASKS))
    dtype: str = field(default="auto", metadata=_about(
        "The dtype the base weights are loaded in (auto: the checkpoint's dtype where the device computes it "
        "natively, else fp32).", choices=DTYPES))
    revision: str | None = field(default=None, metadata=_about(
        "A branch, tag or commit of the hub model (empty: main)."))
    trust_remote_code: bool = field(default=False, metadata=_about(
        "Run the model repository's own Python code (only for repositories you trust)."))
    attn_implementation: str = field(default="sdpa", metadata=_about(
        "Attention kernel: sdpa (default), eager, or flash_attention_2 (a CUDA GPU with flash-attn installed).",
        choices=ATTENTION))


@dataclass
class MethodConfig:
    """A tuning method by registry name, with its own parameters (missing ones take the registry defaults)."""

    name: str = "lora"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the examples come from and how they become model inputs.

    `source` is a built-in dataset ("nbtune:capitals"), a datasets hub id, a local csv/jsonl/parquet file or
    `save_to_disk` folder, or in-memory rows (a list of dicts, a pandas DataFrame or a `datasets.Dataset`, kept
    as a list of dicts; a `DatasetDict`, kept as {split: rows}). config.yaml names in-memory rows by their count
    and fingerprint instead of copying them (`describe_source`). `format` says what the rows are (nbtune/formats.py).
    `prompt_template` formats a row into the input text (python `str.format` over the columns); for causal LM
    the `target_column` is appended and only its tokens are trained on. `eval_split` is a split name of the
    source or a fraction of the train rows held out for evaluation.
    """

    source: Any = field(default="nbtune:capitals", metadata=_about(
        "A built-in dataset (nbtune:capitals), a hub id, a local csv/jsonl/parquet file or save_to_disk folder."))
    format: str = field(default="auto", metadata=_about(
        "What the rows are (auto: detected from the first row): " + "; ".join(
            f"{name}: {words}" for name, words in formats.DESCRIPTIONS.items()) + ".", choices=formats.CHOICES))
    chat_template: str = field(default="auto", metadata=_about(
        "How chat rows become text: auto uses the tokenizer's own chat template, or chatml when it has none; "
        "chatml: <|im_start|>role ... <|im_end|>.", choices=("auto", *chat_templates.NAMES)))
    train_on: str = field(default="assistant", metadata=_about(
        "Which tokens the loss trains on: assistant: only the answers (assistant turns, instruction outputs, "
        "targets); all: every token, the prompts too.", choices=("assistant", "all")))
    split: str = field(default="train", metadata=_about("The split the training rows come from."))
    text_column: str | None = field(default=None, metadata=_about(
        "The column holding the input text (empty: the dataset's default)."))
    target_column: str | None = field(default=None, metadata=_about(
        "The column appended as the target; only its tokens are trained on (causal LM); image-to-text: the "
        "caption (default: caption)."))
    label_column: str | None = field(default=None, metadata=_about(
        "The column holding the class label (seq-cls, image-cls; image-cls default: label)."))
    image_column: str | None = field(default=None, metadata=_about(
        "The column holding each image: a file path (relative to the data file) or the image itself "
        "(image-cls, image-to-text; default: image)."))
    augment: str = field(default="none", metadata=_about(
        "How training images are varied (image tasks; evaluation images never are): none; flip: each training "
        "image mirrored left to right with probability 1/2 each time it is read (for classes a mirror keeps).",
        choices=AUGMENTATIONS))
    prompt_template: str | None = field(default=None, metadata=_about(
        "How a row becomes the input text, with {column} placeholders, e.g. 'Q: {question}\\nA:'.", multiline=True))
    max_length: int = field(default=128, metadata=_about(
        "Tokens per example; longer examples are truncated (the preview says how many).", range=Range(low=8),
        unit="tokens"))
    eval_split: str | float = field(default="eval", metadata=_about(
        "A split name for evaluation, or a fraction like 0.1 of the training rows held out."))
    max_samples: int | None = field(default=None, metadata=_about(
        "Use at most this many training rows (empty: all).", range=COUNT, unit="rows"))
    max_eval_samples: int | None = field(default=None, metadata=_about(
        "Use at most this many evaluation rows (empty: all).", range=COUNT, unit="rows"))
    revision: str | None = field(default=None, metadata=_about("A branch, tag or commit of the hub dataset."))


@dataclass
class TrainingConfig:
    """The stage and its optimisation settings. `learning_rate=None` takes the method's recommended rate from
    the registry. Fields a stage alone reads are listed in its `reads` (nbtune/stages.py)."""

    stage: str = field(default="sft", metadata=_about(
        "What kind of training: " + "; ".join(f"{s.name}: {s.title}" for s in stages.STAGES.values()) + ".",
        choices=stages.NAMES))
    beta: float = field(default=0.1, metadata=_about(
        "How strongly training stays near the reference model (DPO's beta; GRPO's KL weight, 0: no reference).",
        range=Range(0)))
    num_generations: int = field(default=4, metadata=_about(
        "Completions sampled per prompt; their rewards are compared within the group.", range=Range(low=2),
        unit="completions"))
    max_completion_length: int = field(default=32, metadata=_about(
        "Tokens generated per completion at most.", range=COUNT, unit="tokens"))
    temperature: float = field(default=1.0, metadata=_about(
        "Sampling temperature of the completions (1: the model's own distribution; lower: surer, less varied "
        "completions within a group).", range=Range(0, 10, low_open=True)))
    rewards: list[str] = field(default_factory=lambda: ["exact-match"], metadata=_about(
        f"The reward functions whose sum scores each completion: {', '.join(rewards.BUILT_IN)}, or one "
        "registered with nbtune.reward."))
    learning_rate: float | None = field(default=None, metadata=_about(
        "Peak learning rate (empty: the method's recommended rate).", range=Range(0, 1, low_open=True)))
    epochs: float = field(default=1.0, metadata=_about(
        "Passes over the training rows (max_steps, when set, wins).", range=Range(0, low_open=True)))
    max_steps: int | None = field(default=150, metadata=_about(
        "Stop after this many optimizer steps (empty: run the epochs).", range=COUNT, unit="steps"))
    micro_batch_size: int = field(default=16, metadata=_about(
        "Examples per forward pass; the main driver of activation memory.", range=COUNT, unit="examples"))
    gradient_accumulation_steps: int = field(default=1, metadata=_about(
        "Micro-batches per optimizer step (effective batch = micro batch x this).", range=COUNT))
    warmup_ratio: float = field(default=0.06, metadata=_about(
        "Fraction of the steps spent warming the learning rate up from 0.", range=Range(0, 1, high_open=True)))
    scheduler: str = field(default="cosine", metadata=_about(
        "How the learning rate changes after warm-up.", choices=SCHEDULERS))
    weight_decay: float = field(default=0.0, metadata=_about(
        "Decoupled weight decay of the optimizer.", range=Range(0, 1)))
    dropout: float | None = field(default=None, metadata=_about(
        "Dropout of the model (empty: keep the model's own).",
        range=Range(0, 1, high_open=True, note=", or null to keep the model's")))
    optimizer: str = field(default="adamw", metadata=_about(
        "The optimizer; 8-bit and paged variants need bitsandbytes and a GPU.", choices=OPTIMIZERS))
    precision: str = field(default="auto", metadata=_about(
        "Mixed precision of the forward/backward (auto: bf16 where the device computes it natively, fp16 on "
        "older GPUs, fp32 on other CPUs).", choices=PRECISIONS))
    packing: bool = field(default=False, metadata=_about(
        "Pack examples end to end with no padding between them (each attends only to itself): more useful tokens "
        "per second when lengths vary. Causal LM with sft only; not with methods that prepend virtual tokens."))
    loss_implementation: str = field(default="standard", metadata=_about(
        "How the loss is computed: standard (the full logits), chunked (a chunk of tokens at a time through the "
        "LM head, recomputed in the backward: the logits leave the peak memory, the loss is the same), liger "
        "(liger-kernel's fused kernels on CUDA; chunked where it is missing). Causal LM with sft only (dpo, kto "
        "and grpo score tokens through TRL's fused head already).", choices=losses.IMPLEMENTATIONS))
    gradient_checkpointing: bool = field(default=False, metadata=_about(
        "Recompute activations in the backward: much less memory, ~30% slower."))
    compile: bool = field(default=False, metadata=_about(
        "Compile the model with torch.compile (inductor): fused kernels after a slow first step; a model that "
        "does not compile trains eager, said in the run's messages. Memory is estimated as eager (measured on "
        "GPU by bench/gpu_check.py)."))
    on_oom: str = field(default="fail", metadata=_about(
        "On CUDA out of memory: fail (with changes that would fit), or shrink: halve the micro-batch, double the "
        "accumulation (the same effective batch) and go on from the last checkpoint, down to micro-batch 1.",
        choices=ON_OOM))
    max_grad_norm: float = field(default=1.0, metadata=_about(
        "Clip the gradient norm to this (0 turns clipping off).", range=Range(0, note=" (0 turns clipping off)")))
    seed: int = field(default=0, metadata=_about("Random seed of data order and initialisation.",
                                                 range=Range(0, SEED_MAX)))
    eval_every: int | None = field(default=50, metadata=_about(
        "Evaluate every this many steps (empty: only at the end).", range=COUNT, unit="steps"))
    log_every: int = field(default=5, metadata=_about(
        "Record a training step event every this many steps.", range=COUNT, unit="steps"))
    checkpoint_every: int | None = field(default=None, metadata=_about(
        "Steps between resumable checkpoints; only the latest is kept (empty: none).", range=COUNT, unit="steps"))
    report_to: list[str] = field(default_factory=list, metadata=_about(
        "Experiment trackers that also receive the metrics (tensorboard, wandb, mlflow, trackio, ...: whatever "
        "the installed transformers supports and is installed; empty: only nbtune's store)."))
    extra_arguments: dict[str, Any] = field(default_factory=dict, metadata=_about(
        "Further transformers TrainingArguments by name, checked against the installed transformers (an escape "
        "hatch for what nbtune has no field for; nbtune's own fields win where they overlap)."))


@dataclass
class DistributedConfig:
    """How many processes train one run and how they share the model (through accelerate). Every process
    trains micro_batch_size examples per micro-step, so the effective batch is multiplied by their number."""

    strategy: str = field(default="none", metadata=_about(
        "How several processes share the run: none (one process), ddp (each holds the whole model and its "
        "optimizer; gradients are averaged), fsdp (parameters, gradients and optimizer state sharded across "
        "processes), zero2 (DeepSpeed: gradients and optimizer state sharded), zero3 (DeepSpeed: parameters, "
        "gradients and optimizer state sharded).", choices=STRATEGIES))
    processes: int = field(default=1, metadata=_about(
        "Processes per node, usually one per GPU.", range=COUNT, unit="processes"))
    nodes: int = field(default=1, metadata=_about("Machines taking part.", range=COUNT, unit="nodes"))
    sharding: str = field(default="full", metadata=_about(
        "FSDP: full (parameters, gradients and optimizer state), gradients-and-optimizer (parameters whole, as "
        "ZeRO-2), hybrid (full within a node, copies across nodes).", choices=SHARDING))
    cpu_offload: bool = field(default=False, metadata=_about(
        "Keep sharded parameters and optimizer state in CPU memory (fsdp, zero2: optimizer state only, zero3): "
        "less GPU memory, slower steps."))


SECTIONS = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig, "training": TrainingConfig,
            "distributed": DistributedConfig}


@dataclass
class TuneConfig:
    """A complete fine-tuning configuration: model, method, data and training sections.

    Sections may be given as dataclasses or plain dicts; the method may be given as a name:
    `TuneConfig(method="qlora")`, `TuneConfig(method={"name": "lora", "r": 8})`.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        self.model = _coerce_section("model", self.model, problems)
        self.method = _coerce_method(self.method, problems)
        self.data = _coerce_section("data", self.data, problems)
        self.training = _coerce_section("training", self.training, problems)
        self.distributed = _coerce_section("distributed", self.distributed, problems)
        if problems:
            raise ConfigError(problems)
        self.validate()

    # ----- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError listing every problem of this config."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[tuple[str, str]]:
        """Every problem of this config as (dotted field, message); empty when valid."""
        out: list[tuple[str, str]] = []
        if self.schema_version != SCHEMA_VERSION:
            out.append(_bad("schema_version", self.schema_version, f"{SCHEMA_VERSION}"))
        if not isinstance(self.model.name_or_path, str) or not self.model.name_or_path.strip():
            out.append(_bad("model.name_or_path", self.model.name_or_path, "a hub id, a local path or 'nbtune:tiny'"))
        out.extend(_field_problems("model", self.model))
        out.extend(self._method_problems())
        out.extend(self._stage_problems())
        out.extend(_data_problems(self.data, self.model.task))
        out.extend(_field_problems("data", self.data))
        out.extend(_field_problems("training", self.training))
        out.extend(_field_problems("distributed", self.distributed))
        out.extend(_distributed_problems(self))
        seen: set[str] = set()  # one message per field: the first, most specific one
        return [p for p in out if not (p[0] in seen or seen.add(p[0]))]

    def _method_problems(self) -> list[tuple[str, str]]:
        from nbtune.methods import registry

        method = registry.find(self.method.name) if isinstance(self.method.name, str) else None
        if method is None:
            return [_bad("method.name", self.method.name, f"one of: {', '.join(registry.names())}")]
        out = list(method.check(self.method.params, task=self.model.task))
        if method.no_gradient_checkpointing and self.training.gradient_checkpointing is True:
            out.append(("training.gradient_checkpointing", f"training.gradient_checkpointing cannot be true with "
                        f"method {method.name}: {method.no_gradient_checkpointing}"))
        if self.model.task == "text-to-image" and self.training.gradient_checkpointing is True:
            out.append(("training.gradient_checkpointing", "training.gradient_checkpointing cannot be true for "
                        "model.task text-to-image yet: nbtune does not checkpoint a UNet's blocks"))
        return out

    def _stage_problems(self) -> list[tuple[str, str]]:
        """The stage against the method, the task and an explicit data format (nbtune/stages.py)."""
        from nbtune.methods import registry

        stage = stages.STAGES.get(self.training.stage) if isinstance(self.training.stage, str) else None
        method = registry.find(str(self.method.name))
        if stage is None or method is None or self.model.task not in TASKS:
            return []  # named by the field checks
        out = []
        why = stage.unsupported(method, self.model.task)
        if why:
            out.append(("training.stage", f"training.stage {stage.name} with method {method.name}: {why}"))
        if self.data.format in formats.FORMATS and self.data.format not in stage.formats:
            out.append(("data.format", f"data.format {self.data.format} cannot train with training.stage "
                                       f"{stage.name}, which trains {', '.join(stage.formats)}"))
        if stage.generates:
            out.extend(_generation_problems(self.training))
        if self.training.packing is True and "packing" in stage.reads:
            out.extend(_packing_problems(method, self.method_params, self.model.task))
        if self.training.loss_implementation != "standard" and "loss_implementation" in stage.reads:
            out.extend(_loss_problems(self.training.loss_implementation, method, self.model.task))
        return out

    # ----- derived values ---------------------------------------------------------------------------------
    @property
    def method_params(self) -> dict[str, Any]:
        """The method's parameters with registry defaults filled in."""
        from nbtune.methods import registry

        return registry.get(self.method.name).resolve(self.method.params)

    @property
    def learning_rate(self) -> float:
        """The learning rate used: the configured one, or the method's recommended rate."""
        from nbtune.methods import registry

        if self.training.learning_rate is not None:
            return float(self.training.learning_rate)
        return registry.get(self.method.name).learning_rate

    @property
    def content_hash(self) -> str:
        """A stable 16-hex-digit hash of what this config means (independent of key order and of defaults)."""
        resolved = self.to_dict(resolved=True)
        resolved["data"]["source"] = describe_source(self.data.source)  # what config.yaml keeps of it
        stage = stages.STAGES.get(self.training.stage)
        for name in stages.ONLY_SOME_READ:  # a field the stage does not read cannot change its result
            if stage is None or name not in stage.reads:
                resolved["training"].pop(name, None)
        if self.training.stage == "sft":  # as before stages existed: stores keep their supervised runs
            resolved["training"].pop("stage")
        if resolved["training"].get("packing") is False:  # as before packing existed
            resolved["training"].pop("packing")
        if resolved["training"].get("loss_implementation") == "standard":  # as before the option existed
            resolved["training"].pop("loss_implementation")
        if resolved["training"].get("temperature") == 1.0:  # as before the option existed (TRL's default)
            resolved["training"].pop("temperature")
        if resolved["training"].get("compile") is False:  # as before compile existed
            resolved["training"].pop("compile")
        resolved["training"].pop("on_oom", None)  # how a run recovers from out of memory, not what it learns
        resolved["training"].pop("report_to", None)  # where metrics are copied to, not what is learnt
        if not resolved["training"].get("extra_arguments"):  # as before the option existed
            resolved["training"].pop("extra_arguments", None)
        for name, default in (("image_column", None), ("augment", "none")):  # as before the options existed
            if resolved["data"].get(name) == default:
                resolved["data"].pop(name)
        if resolved["distributed"] == dataclasses.asdict(DistributedConfig()):  # one process: as before
            resolved.pop("distributed")
        if "rewards" in resolved["training"]:  # a user reward's source, so editing the function retrains
            resolved["training"]["rewards"] = [rewards.identity(n) for n in self.training.rewards]
        canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # ----- conversion -------------------------------------------------------------------------------------
    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """A plain dict as written in YAML: the method's parameters sit beside its name.

        With `resolved=True` the method defaults and the effective learning rate are written out.
        """
        method_params = self.method_params if resolved else dict(self.method.params)
        training = dataclasses.asdict(self.training)
        if resolved:
            training["learning_rate"] = self.learning_rate
        return {
            "schema_version": self.schema_version,
            "model": dataclasses.asdict(self.model),
            "method": {"name": self.method.name, **copy.deepcopy(method_params)},
            "data": {k: copy.deepcopy(v) for k, v in dataclasses.asdict(self.data).items()},
            "training": training,
            "distributed": dataclasses.asdict(self.distributed),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneConfig:
        """Build from a plain dict (as read from YAML or JSON); unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError([("config", f"config must be a mapping of sections (got {type(data).__name__})")])
        unknown = set(data) - set(SECTIONS) - {"schema_version"}
        if unknown:
            allowed = ", ".join([*SECTIONS, "schema_version"])
            raise ConfigError([(str(k), f"unknown section {k!r}; allowed: {allowed}") for k in sorted(unknown, key=str)])
        return cls(
            model=data.get("model") or {},
            method=data.get("method") or {},
            data=data.get("data") or {},
            training=data.get("training") or {},
            distributed=data.get("distributed") or {},
            schema_version=data.get("schema_version", SCHEMA_VERSION),
        )

    def to_yaml(self) -> str:
        import yaml

        d = self.to_dict()
        d["data"]["source"] = describe_source(self.data.source)
        return yaml.dump(d, Dumper=_yaml_classes()[1], sort_keys=False, default_flow_style=False,
                         width=110)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> TuneConfig:
        """Read a config from YAML text or from a .yaml/.yml file (see `read_yaml` for what YAML is read)."""
        text = _read_if_path(text_or_path, (".yaml", ".yml"))
        where = str(text_or_path) if text is not text_or_path else ""
        return cls.from_dict(read_yaml(text, where) or {})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> TuneConfig:
        return cls.from_dict(json.loads(_read_if_path(text_or_path, (".json",))))

    def replace(self, **changes: Any) -> TuneConfig:
        """A copy with dotted-name changes, e.g. `cfg.replace(**{"training.learning_rate": 1e-3, "method.r": 8})`.

        `method="ia3"` switches the method and drops the old method's parameters; `"method.name": "qlora"`
        switches it and keeps the parameters both methods have; `"method.params": {...}` sets all of them.
        """
        d = self.to_dict()
        for key, value in changes.items():
            if key == "method" and isinstance(value, str):
                d["method"] = {"name": value}
                continue
            if key == "method.name":  # switch method, keeping the parameters the new one also has
                from nbtune.methods import registry

                method = registry.find(value)
                shared = {f.name for f in method.fields} if method else set()
                d["method"] = {"name": value, **{k: v for k, v in d["method"].items() if k in shared}}
                continue
            if key == "method.params":  # all of the method's parameters at once (the missing ones: defaults)
                d["method"] = {"name": d["method"]["name"], **value}
                continue
            section, _, name = key.partition(".")
            if section not in d or not name:
                raise ConfigError([(key, f"{key} is not a field; use 'section.field' with a section of {', '.join(SECTIONS)}")])
            d[section][name] = value
        return TuneConfig.from_dict(d)

    def to_code(self) -> str:
        """A runnable Python cell that rebuilds this config with the nbtune API."""
        d = self.to_dict()
        default_dict = {"model": dataclasses.asdict(ModelConfig()), "data": dataclasses.asdict(DataConfig()),
                        "training": dataclasses.asdict(TrainingConfig()),
                        "distributed": dataclasses.asdict(DistributedConfig())}
        lines = ["import nbtune", "", "config = nbtune.TuneConfig("]
        for section in ("model", "method", "data", "training", "distributed"):
            values = d[section] if section == "method" else {
                k: v for k, v in d[section].items() if v != default_dict[section][k]}
            if values:
                lines.append(f"    {section}={values!r},")
        lines.append(")")
        lines.append("run = nbtune.launch(config)  # returns at once; trains in the background")
        lines.append("# run.wait()                 # blocks until it ends (a script waits at exit; Ctrl-C stops it)")
        return "\n".join(lines)


def _coerce_section(name: str, value: Any, problems: list[tuple[str, str]]) -> Any:
    cls = SECTIONS[name]
    if isinstance(value, cls):
        section = value
    elif isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known, key=str)
        for key in unknown:
            problems.append((f"{name}.{key}", f"{name}.{key} is not a field; allowed: {', '.join(sorted(known))}"))
        section = cls(**{k: v for k, v in value.items() if k in known})
    else:
        problems.append((name, f"{name} must be a mapping (got {type(value).__name__})"))
        return cls()
    if name == "data":
        section.source = _coerce_source(section.source)
    return section


def _coerce_method(value: Any, problems: list[tuple[str, str]]) -> MethodConfig:
    if isinstance(value, MethodConfig):
        return MethodConfig(value.name, dict(value.params))
    if isinstance(value, str):
        return MethodConfig(name=value)
    if isinstance(value, dict):
        value = dict(value)
        params = value.pop("params", {}) or {}
        if not isinstance(params, dict):
            problems.append(("method.params", _bad("method.params", params, "a mapping of parameters")[1]))
            params = {}
        name = value.pop("name", MethodConfig.name)
        return MethodConfig(name=name, params={**params, **value})
    problems.append(("method", f"method must be a name or a mapping (got {type(value).__name__})"))
    return MethodConfig()


def _coerce_source(source: Any) -> Any:
    """Turn a pandas DataFrame or a Path into the plain value a config keeps."""
    if isinstance(source, Path):
        return str(source)
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):  # pandas, unimported
        return source.to_dict(orient="records")
    if type(source).__module__.startswith("datasets.") and hasattr(source, "to_list"):  # a datasets.Dataset
        return source.to_list()
    if type(source).__module__.startswith("datasets.") and isinstance(source, dict):  # a DatasetDict
        return {str(split): _coerce_source(rows) for split, rows in source.items()}
    return source


IN_MEMORY = "<in-memory:"  # how config.yaml names in-memory rows


def describe_source(source: Any) -> Any:
    """What config.yaml keeps of a source: in-memory rows as their count and fingerprint, e.g.
    "<in-memory: 120 rows, fingerprint 3f2a...>" (the cache key fingerprints the rows themselves); others as is."""
    if not isinstance(source, (list, dict)):
        return source
    from nbtune.data import fingerprint

    if isinstance(source, list):
        return f"{IN_MEMORY} {len(source)} rows, fingerprint {fingerprint(source)}>"
    splits = sorted(source.items())  # a DatasetDict's {split: rows}
    counts = " + ".join(f"{len(rows)} {name}" for name, rows in splits)
    digest = fingerprint([{"splits": [name for name, _ in splits]}], *(rows for _, rows in splits))
    return f"{IN_MEMORY} {counts} rows, fingerprint {digest}>"


def in_memory_fingerprint(source: Any) -> str | None:
    """The fingerprint of in-memory rows, from the rows or from config.yaml's "<in-memory: ...>" that names them
    (so a config read back from a run folder has the cache key of the run that trained); None for other sources."""
    described = describe_source(source)
    if not (isinstance(described, str) and described.startswith(IN_MEMORY)):
        return None
    return described.rstrip(">").rsplit("fingerprint ", 1)[-1]


def _bad(name: str, value: Any, allowed: str) -> tuple[str, str]:
    return name, f"{name} must be {allowed} (got {value!r})"


def _generation_problems(t: TrainingConfig) -> list[tuple[str, str]]:
    """A generating stage's rewards and batch: known reward names; whole groups of completions per step."""
    known = rewards.names()
    if not isinstance(t.rewards, list) or not t.rewards or not all(isinstance(n, str) for n in t.rewards):
        return [_bad("training.rewards", t.rewards, f"a non-empty list of reward names from {', '.join(known)}")]
    out = [("training.rewards", f"training.rewards names an unknown reward {name!r}; known: {', '.join(known)} "
                                "(register your own with nbtune.reward)") for name in t.rewards if name not in known]
    sizes = (t.micro_batch_size, t.gradient_accumulation_steps, t.num_generations)
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        return out  # named by the field checks
    batch = t.micro_batch_size * t.gradient_accumulation_steps
    if batch % t.num_generations:
        out.append(("training.num_generations", (
            f"training.micro_batch_size x training.gradient_accumulation_steps ({t.micro_batch_size} x "
            f"{t.gradient_accumulation_steps} = {batch} completions per step) must be a multiple of "
            f"training.num_generations ({t.num_generations}): each prompt's completions are scored as one group")))
    return out


def _field_problems(section: str, values: Any) -> list[tuple[str, str]]:
    """The checks a section's field metadata and type state: choices, ranges, finite numbers, text, true/false."""
    out = []
    for f, kind, optional in _described(SECTIONS[section]):
        name, value = f"{section}.{f.name}", getattr(values, f.name)
        if value is None and optional:
            continue
        problem = _value_problem(name, value, kind, f.metadata)
        if problem and not (section == "data" and f.name == "source"):  # any type: _data_problems checks it
            out.append((name, problem))
    return out


def _value_problem(name: str, value: Any, kind: str, about: Any) -> str | None:
    """What is wrong with one section field's value, or None."""
    choices, allowed = about.get("choices"), about.get("range")
    if choices:
        return None if _hashable(value) and value in choices else f"{name} must be one of {', '.join(choices)} (got {value!r})"
    if kind == "bool":
        return None if isinstance(value, bool) else _bad(name, value, "true or false")[1]
    if kind == "str-or-float":  # eval_split: a split name or a fraction
        if isinstance(value, str) and value.strip() or Range(0, 1, True, True).allows(value):
            return None
        return _bad(name, value, "a split name or a fraction between 0 and 1 (exclusive)")[1]
    if kind in ("str", "text"):
        return None if isinstance(value, str) else _bad(name, value, "text")[1]
    if kind == "str-list":
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else _bad(
            name, value, "a list of names")[1]
    if kind == "mapping":
        return None if isinstance(value, dict) and all(isinstance(k, str) for k in value) else _bad(
            name, value, "a mapping of names to values")[1]
    if allowed is None or allowed.allows(value, integer=kind == "int"):
        return None
    words = allowed.words(integer=kind == "int")
    if isinstance(value, str) and _is_number(value):
        return f"{name} must be a number {words}, not text (got {value!r}); write it without quotes"
    finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) and kind != "int" else ""
    return _bad(name, value, finite + words)[1]


def _distributed_problems(config: TuneConfig) -> list[tuple[str, str]]:
    """The distributed section against itself and the method (nbtune/distributed.py says why each holds)."""
    from nbtune import distributed

    return distributed.problems(config)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _packing_problems(method: Any, params: dict[str, Any], task: str) -> list[tuple[str, str]]:
    """training.packing needs causal LM rows and a method that leaves each example's tokens its own."""
    if task != "causal-lm":
        return [("training.packing", f"training.packing needs model.task causal-lm (got {task}): it joins "
                                     f"examples into one causal token stream, which {task} examples are not")]
    if method.virtual_tokens:
        n = params.get(method.virtual_tokens)
        return [("training.packing", (
            f"training.packing cannot train method {method.name}: it prepends {n} virtual tokens "
            f"(method.{method.virtual_tokens}) to every sequence, and a packed row is one sequence holding several "
            "examples, so they would share one prompt; turn training.packing off or choose another method"))]
    return []


def _loss_problems(implementation: Any, method: Any, task: str) -> list[tuple[str, str]]:
    """A chunked or fused loss needs causal LM and the model's own token loss (nbtune/losses.py)."""
    if implementation not in losses.IMPLEMENTATIONS:
        return []  # named by the field check
    allowed = "set training.loss_implementation to standard"
    if task != "causal-lm":
        return [("training.loss_implementation", (
            f"training.loss_implementation {implementation} needs model.task causal-lm (got {task}): it computes "
            f"the next-token loss over the vocabulary, which a {task} model does not have; {allowed}"))]
    if method.compute_loss is not None:
        return [("training.loss_implementation", (
            f"training.loss_implementation {implementation} cannot train method {method.name}: it computes its "
            f"own loss from the model's full logits; {allowed}"))]
    return []


def _data_problems(d: DataConfig, task: str) -> list[tuple[str, str]]:
    """The data checks no single field's metadata states: what a source may be, templates, class labels."""
    out = []
    if isinstance(d.source, str) and not d.source.strip():
        out.append(_bad("data.source", d.source, "a built-in dataset, hub id, file path or in-memory rows"))
    elif not isinstance(d.source, (str, list, dict)):
        out.append(_bad("data.source", type(d.source).__name__,
                        "a string, a list of dicts, a pandas DataFrame or a datasets Dataset/DatasetDict"))
    elif isinstance(d.source, (list, dict)) and not d.source:
        out.append(_bad("data.source", d.source, "rows: a non-empty list of dicts, or a mapping of split names to rows"))
    elif isinstance(d.source, list) and not all(isinstance(r, dict) for r in d.source):
        out.append(_bad("data.source", "list", "a list of dicts (one per row)"))
    elif isinstance(d.source, dict) and not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(r, dict) for r in v)
            for k, v in d.source.items()):
        out.append(_bad("data.source", "dict", "a mapping of split names to lists of dicts (a DatasetDict)"))
    if isinstance(d.prompt_template, str) and "{" not in d.prompt_template:
        out.append(_bad("data.prompt_template", d.prompt_template,
                        "a template naming at least one column, like '{text}'"))
    image_task = isinstance(task, str) and task in tasks.TASKS and tasks.TASKS[task].inputs == "image"
    if image_task and d.format not in ("auto", formats.IMAGE):
        out.append(_bad("data.format", d.format, f"auto or {formats.IMAGE} for model.task {task}"))
    elif d.format == formats.IMAGE and not image_task:
        out.append(_bad("data.format", d.format, "a text format: image rows need an image task (image-cls, "
                                                 "image-to-text)"))
    elif d.format in formats.FORMATS and d.format not in ("prompt-completion", "text") and task != "causal-lm":
        out.append(_bad("data.format", d.format, f"prompt-completion or text for model.task {task} "
                                                 "(the other formats need causal-lm)"))
    if d.augment != "none" and d.augment in AUGMENTATIONS and not image_task:
        out.append(_bad("data.augment", d.augment, f"none for model.task {task}, whose rows hold no images"))
    elif d.augment == "flip" and task in ("image-to-text", "text-to-image"):
        out.append(_bad("data.augment", d.augment, f"none for model.task {task}: a mirrored image no longer "
                                                   "matches a caption or prompt that says left or right"))
    if task == "seq-cls" and isinstance(d.source, (list, dict)) and d.label_column is None:
        out.append(_bad("data.label_column", None, "the column holding the class label (task seq-cls)"))
    return out


# ----- the sections described for forms and docs ---------------------------------------------------------------

_KINDS = {str: "str", int: "int", float: "float", bool: "bool"}


@functools.cache
def _described(cls: type) -> tuple[tuple[dataclasses.Field, str, bool], ...]:
    """(field, kind, optional) of each field of a section dataclass, the kind read from its type:
    "str", "int", "float", "bool", "text" (multi-line, kept as typed), "str-or-float" or "choice"."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        members = typing.get_args(hints[f.name]) or (hints[f.name],)
        optional = type(None) in members
        types = tuple(t for t in members if t is not type(None))
        kind = "str-or-float" if types == (str, float) else _KINDS.get(types[0], "str")
        if typing.get_origin(hints[f.name]) is list:
            kind = "str-list"
        elif typing.get_origin(hints[f.name]) is dict:
            kind = "mapping"
        if f.metadata.get("choices"):
            kind = "choice"
        elif f.metadata.get("multiline"):
            kind = "text"
        out.append((f, kind, optional))
    return tuple(out)


def section_fields(section: str) -> list[Field]:
    """The fields of one config section ("model", "data", "training") described like a method's fields, for
    forms and docs: kind from the type, help, choices and range from the field's metadata."""
    from nbtune.methods.registry import Field

    out = []
    for f, kind, optional in _described(SECTIONS[section]):
        about, allowed = f.metadata, f.metadata.get("range")
        unit = f" Unit: {about['unit']}." if about.get("unit") else ""
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append(Field(f.name, kind, default, about["help"] + unit, choices=about.get("choices", ()),
                         optional=optional, low=allowed.low if allowed else None,
                         high=allowed.high if allowed else None))
    return out


def config_from_values(values: dict[str, Any]) -> tuple[TuneConfig | None, list[tuple[str, str]]]:
    """(config, []) when dotted-name values (a form's) make a valid config, else (None, every problem)."""
    data: dict[str, Any] = {section: {} for section in SECTIONS}
    for dotted, value in values.items():
        section, _, name = dotted.partition(".")
        data[section][name] = value
    try:
        return TuneConfig.from_dict(data), []
    except ConfigError as err:
        return None, list(err.problems)


def read_yaml(text: str, where: str = "") -> Any:
    """The value of a YAML config text, as YAML 1.2 reads numbers (`1e-4` is a number, not text), bounded:
    at most MAX_YAML_BYTES of text and MAX_YAML_VALUES values with every alias expanded, nested at most
    MAX_YAML_DEPTH deep. Raises ConfigError (field "config", naming `where`) past a bound, yaml.YAMLError for
    a syntax error."""
    prefix = f"{where}: " if where else ""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise ConfigError([("config", f"{prefix}the YAML is {size:,} bytes; a config may have at most "
                                      f"{MAX_YAML_BYTES:,} (nbtune.config.MAX_YAML_BYTES)")])
    loader = _yaml_classes()[0](text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_values(node, {}, 0)
        if values > MAX_YAML_VALUES:
            raise ConfigError([("config", f"{prefix}the YAML's aliases (*name) expand it to more than "
                                          f"{MAX_YAML_VALUES:,} values (nbtune.config.MAX_YAML_VALUES), or "
                                          f"nest deeper than {MAX_YAML_DEPTH}; write the values out instead")])
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError([("config", f"{prefix}the YAML nests too deeply")]) from None
    finally:
        loader.dispose()


def _expanded_values(node: Any, counted: dict[int, int], depth: int) -> int:
    """How many values `node` holds with every alias expanded; past the bounds (or a cycle), the bound + 1."""
    if id(node) in counted:
        return counted[id(node)]
    too_many = MAX_YAML_VALUES + 1
    if depth > MAX_YAML_DEPTH:
        return too_many
    counted[id(node)] = too_many  # seen again before it is counted: an alias of itself (a cycle)
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for part in child if isinstance(child, tuple) else (child,):  # a mapping's (key, value) pairs
            total += _expanded_values(part, counted, depth + 1)
            if total > MAX_YAML_VALUES:
                return too_many
    counted[id(node)] = total
    return total


# YAML 1.1 (PyYAML) reads 1e-4 as text because it has no dot; YAML 1.2, JSON and Python read it as a number.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


@functools.cache
def _yaml_classes() -> tuple[type, type]:
    """(loader, dumper): PyYAML's safe ones, reading and writing `1e-4` as a number (and "1e-4" quoted)."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        pass

    class ConfigDumper(yaml.SafeDumper):
        pass

    for cls in (ConfigLoader, ConfigDumper):
        cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return ConfigLoader, ConfigDumper


def _read_if_path(text_or_path: str | Path, suffixes: tuple[str, ...]) -> str:
    if isinstance(text_or_path, Path) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith(suffixes)
    ):
        return Path(text_or_path).read_text()
    return str(text_or_path)
