"""The fine-tuning configuration: one typed, validated object that round-trips through YAML and JSON.

`TuneConfig()` with no arguments is a complete config on the embedded default (a tiny pretrained model and a
built-in dataset), so a first run needs no choices. Every problem of a config is reported at once, each naming
the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune import dtypes, optimizers, tasks

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


class ConfigError(ValueError):
    """A config with one or more invalid values; `problems` lists them all as (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{name}: {message}" for name, message in problems]
        super().__init__("invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else "invalid config: " + lines[0])

    def for_field(self, name: str) -> str | None:
        """The message for one field (dotted name), or None."""
        return next((m for f, m in self.problems if f == name), None)


@dataclass
class ModelConfig:
    """Which model to tune and for what task."""

    name_or_path: str = EMBEDDED_MODEL
    task: str = "causal-lm"
    dtype: str = "auto"  # the checkpoint's dtype where the device computes it natively, else fp32
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class MethodConfig:
    """A tuning method by registry name, with its own parameters (missing ones take the registry defaults)."""

    name: str = "lora"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the examples come from and how they become model inputs.

    `source` is a built-in dataset ("nbtune:capitals"), a datasets hub id, a local csv/jsonl/parquet file,
    or in-memory rows (a list of dicts or a pandas DataFrame, kept as a list of dicts).
    `prompt_template` formats a row into the input text (python `str.format` over the columns); for causal LM
    the `target_column` is appended and only its tokens are trained on. `eval_split` is a split name of the
    source or a fraction of the train rows held out for evaluation.
    """

    source: Any = "nbtune:capitals"
    split: str = "train"
    text_column: str | None = None
    target_column: str | None = None
    label_column: str | None = None
    prompt_template: str | None = None
    max_length: int = 128
    eval_split: str | float = "eval"
    max_samples: int | None = None
    max_eval_samples: int | None = None
    revision: str | None = None


@dataclass
class TrainingConfig:
    """Optimisation settings. `learning_rate=None` takes the method's recommended rate from the registry."""

    learning_rate: float | None = None
    epochs: float = 1.0
    max_steps: int | None = 150
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.06
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    dropout: float | None = None
    optimizer: str = "adamw"
    precision: str = "auto"  # bf16 where the device computes it natively, fp16 on older GPUs, else fp32
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int | None = 50
    log_every: int = 5
    checkpoint_every: int | None = None  # steps between resumable checkpoints (only the latest is kept)


SECTIONS = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig, "training": TrainingConfig}


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
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        self.model = _coerce_section("model", self.model, problems)
        self.method = _coerce_method(self.method, problems)
        self.data = _coerce_section("data", self.data, problems)
        self.training = _coerce_section("training", self.training, problems)
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
        from nbtune.methods import registry

        out: list[tuple[str, str]] = []
        m, d, t = self.model, self.data, self.training

        def bad(name: str, value: Any, allowed: str) -> None:
            out.append((name, f"{name} must be {allowed} (got {value!r})"))

        if self.schema_version != SCHEMA_VERSION:
            bad("schema_version", self.schema_version, f"{SCHEMA_VERSION}")
        if not isinstance(m.name_or_path, str) or not m.name_or_path.strip():
            bad("model.name_or_path", m.name_or_path, "a hub id, a local path or 'nbtune:tiny'")
        _choice(out, "model.task", m.task, TASKS)
        _choice(out, "model.dtype", m.dtype, DTYPES)
        _choice(out, "model.attn_implementation", m.attn_implementation, ATTENTION)
        if not isinstance(m.trust_remote_code, bool):
            bad("model.trust_remote_code", m.trust_remote_code, "true or false")

        method = registry.find(self.method.name)
        if method is None:
            names = ", ".join(registry.names())
            bad("method.name", self.method.name, f"one of: {names}")
        else:
            out.extend(method.check(self.method.params, task=m.task))

        if isinstance(d.source, str) and not d.source.strip():
            bad("data.source", d.source, "a built-in dataset, hub id, file path or in-memory rows")
        elif not isinstance(d.source, (str, list)):
            bad("data.source", type(d.source).__name__, "a string, a list of dicts or a pandas DataFrame")
        elif isinstance(d.source, list) and not all(isinstance(r, dict) for r in d.source):
            bad("data.source", "list", "a list of dicts (one per row)")
        _positive_int(out, "data.max_length", d.max_length, low=8)
        if d.max_samples is not None:
            _positive_int(out, "data.max_samples", d.max_samples)
        if d.max_eval_samples is not None:
            _positive_int(out, "data.max_eval_samples", d.max_eval_samples)
        if isinstance(d.eval_split, float) and not 0 < d.eval_split < 1:
            bad("data.eval_split", d.eval_split, "a split name or a fraction between 0 and 1")
        if d.prompt_template is not None and "{" not in d.prompt_template:
            bad("data.prompt_template", d.prompt_template, "a template naming at least one column, like '{text}'")
        if m.task == "seq-cls" and isinstance(d.source, (list,)) and d.label_column is None:
            bad("data.label_column", None, "the column holding the class label (task seq-cls)")

        if t.learning_rate is not None and not (_is_number(t.learning_rate) and 0 < t.learning_rate <= 1):
            bad("training.learning_rate", t.learning_rate, "> 0 and <= 1")
        if not (_is_number(t.epochs) and t.epochs > 0):
            bad("training.epochs", t.epochs, "> 0")
        if t.max_steps is not None:
            _positive_int(out, "training.max_steps", t.max_steps)
        _positive_int(out, "training.micro_batch_size", t.micro_batch_size)
        _positive_int(out, "training.gradient_accumulation_steps", t.gradient_accumulation_steps)
        if not (_is_number(t.warmup_ratio) and 0 <= t.warmup_ratio < 1):
            bad("training.warmup_ratio", t.warmup_ratio, ">= 0 and < 1")
        _choice(out, "training.scheduler", t.scheduler, SCHEDULERS)
        if not (_is_number(t.weight_decay) and 0 <= t.weight_decay <= 1):
            bad("training.weight_decay", t.weight_decay, "between 0 and 1")
        if t.dropout is not None and not (_is_number(t.dropout) and 0 <= t.dropout < 1):
            bad("training.dropout", t.dropout, ">= 0 and < 1, or null to keep the model's")
        _choice(out, "training.optimizer", t.optimizer, OPTIMIZERS)
        _choice(out, "training.precision", t.precision, PRECISIONS)
        if not isinstance(t.gradient_checkpointing, bool):
            bad("training.gradient_checkpointing", t.gradient_checkpointing, "true or false")
        if not (_is_number(t.max_grad_norm) and t.max_grad_norm >= 0):
            bad("training.max_grad_norm", t.max_grad_norm, ">= 0 (0 turns clipping off)")
        if not isinstance(t.seed, int) or isinstance(t.seed, bool) or t.seed < 0:
            bad("training.seed", t.seed, "an integer >= 0")
        if t.eval_every is not None:
            _positive_int(out, "training.eval_every", t.eval_every)
        _positive_int(out, "training.log_every", t.log_every)
        if t.checkpoint_every is not None:
            _positive_int(out, "training.checkpoint_every", t.checkpoint_every)
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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneConfig:
        """Build from a plain dict (as read from YAML or JSON); unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError([("config", f"config must be a mapping of sections (got {type(data).__name__})")])
        unknown = set(data) - set(SECTIONS) - {"schema_version"}
        if unknown:
            allowed = ", ".join([*SECTIONS, "schema_version"])
            raise ConfigError([(k, f"unknown section {k!r}; allowed: {allowed}") for k in sorted(unknown)])
        return cls(
            model=data.get("model") or {},
            method=data.get("method") or {},
            data=data.get("data") or {},
            training=data.get("training") or {},
            schema_version=data.get("schema_version", SCHEMA_VERSION),
        )

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=110)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> TuneConfig:
        """Read a config from YAML text or from a .yaml/.yml file."""
        import yaml

        text = _read_if_path(text_or_path, (".yaml", ".yml"))
        return cls.from_dict(yaml.safe_load(text) or {})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> TuneConfig:
        return cls.from_dict(json.loads(_read_if_path(text_or_path, (".json",))))

    def replace(self, **changes: Any) -> TuneConfig:
        """A copy with dotted-name changes, e.g. `cfg.replace(**{"training.learning_rate": 1e-3, "method.r": 8})`.

        `method="ia3"` switches the method and drops the old method's parameters; `"method.name": "qlora"`
        switches it and keeps the parameters both methods have.
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
            section, _, name = key.partition(".")
            if section not in d or not name:
                raise ConfigError([(key, f"{key} is not a field; use 'section.field' with a section of {', '.join(SECTIONS)}")])
            d[section][name] = value
        return TuneConfig.from_dict(d)

    def to_code(self) -> str:
        """A runnable Python cell that rebuilds this config with the nbtune API."""
        d = self.to_dict()
        default_dict = {"model": dataclasses.asdict(ModelConfig()), "data": dataclasses.asdict(DataConfig()),
                        "training": dataclasses.asdict(TrainingConfig())}
        lines = ["import nbtune", "", "config = nbtune.TuneConfig("]
        for section in ("model", "method", "data", "training"):
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
        unknown = sorted(set(value) - known)
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
        params = dict(value.pop("params", {}) or {})
        name = value.pop("name", MethodConfig.name)
        params.update(value)
        return MethodConfig(name=name, params=params)
    problems.append(("method", f"method must be a name or a mapping (got {type(value).__name__})"))
    return MethodConfig()


def _coerce_source(source: Any) -> Any:
    """Turn a pandas DataFrame or a Path into the plain value a config keeps."""
    if isinstance(source, Path):
        return str(source)
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame, without importing pandas
        return source.to_dict(orient="records")
    return source


def _choice(out: list[tuple[str, str]], name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        out.append((name, f"{name} must be one of {', '.join(allowed)} (got {value!r})"))


def _positive_int(out: list[tuple[str, str]], name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        out.append((name, f"{name} must be an integer >= {low} (got {value!r})"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_if_path(text_or_path: str | Path, suffixes: tuple[str, ...]) -> str:
    if isinstance(text_or_path, Path) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith(suffixes)
    ):
        return Path(text_or_path).read_text()
    return str(text_or_path)
