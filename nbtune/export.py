"""Exports of a config that run without nbtune: `nbtune export CONFIG --to script|axolotl|llamafactory DIR`.

`export(config, to, directory)` writes into `directory`:
- `script`: `train.py`, a standalone training script (transformers + peft; TRL's DPOTrainer, KTOTrainer or
  GRPOTrainer for those stages) with the method's peft config as nbtune's registry resolves it, the rows in
  `data/*.jsonl`, the embedded base copied to `model/` when the config names it, `config.yaml`,
  `accelerate_config.yaml` and `README.txt` (the launch command lines). The script writes a run folder of
  nbtune's store and a `.tar.gz` of it that `nbtune import` reads (nbtune/export_script.py).
- `axolotl` / `llamafactory`: that tool's YAML (validated against the schema in nbtune/export_schemas.py), the
  rows rendered as nbtune renders them, and `unsupported.txt`: the settings the tool cannot express
  (nbtune/export_yaml.py).

What every target shares is resolved once here (`resolve`): the rows after the split and the caps, their
format, the model with its method built on the meta device (the peft config exactly as nbtune applies it, or
the parameters a selective method trains), the TrainingArguments nbtune sets (`training._shared_arguments`)
and the accelerate config of the `distributed` section. A method or setting a target cannot carry is refused
with an `ExportRefused` naming the config field, before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune.config import EMBEDDED_PREFIX, TuneConfig

TARGETS = ("script", "axolotl", "llamafactory")
TARGET_NAMES = {"script": "the script", "axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}
# peft config fields that peft fills in when it wraps a model, or that name where the base came from: the
# script's get_peft_model fills them again
PEFT_FILLED = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
               "num_transformer_submodules", "num_attention_heads", "num_layers", "token_dim", "peft_version",
               "runtime_config"}


class ExportRefused(ValueError):
    """A config an export target cannot carry: `field` is the dotted config path that says why."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass
class Exported:
    """What an export wrote: the folder, its files, how to run it and the settings it could not carry."""

    directory: Path
    target: str
    files: list[Path]
    command: str
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (config field, what happens instead)


@dataclass
class Resolved:
    """A config's facts every export target reads, resolved the way a run of nbtune resolves them."""

    config: TuneConfig
    method: Any  # registry.Method
    stage: Any  # stages.Stage
    fmt: str  # the rows' format (data.format, or detected)
    columns: Any  # data.Columns
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    tokenizer: Any
    labels: tuple[str, ...]
    total_steps: int
    model_config: Any  # transformers PretrainedConfig
    peft: dict[str, Any] | None  # {"class": "LoraConfig", "kwargs": {...}, "prompt_learning": bool}
    trainable: list[str] | None  # selective methods: the parameters that train (None: a peft method)
    all_parameters: list[str]
    quantization: dict[str, Any] | None  # QLoRA: BitsAndBytesConfig arguments (compute dtype by name)
    arguments: dict[str, Any]  # TrainingArguments nbtune sets (for this machine: cpu, fp32)
    conversational: bool  # preference/GRPO rows are conversations (rendered with the chat template)
    chat_template: str | None  # the Jinja the run's tokenizer carries, where its rows are chat
    chat_template_name: str | None
    layer_stacks: list[tuple[str, int]]  # (dotted path, layers) of the model's transformer layer lists
    decoder_layer_class: str | None  # the class FSDP wraps

    @property
    def embedded_model(self) -> bool:
        return self.config.model.name_or_path.startswith(EMBEDDED_PREFIX)


def export(config: TuneConfig, to: str, directory: str | Path) -> Exported:
    """Write `config` as target `to` (script, axolotl, llamafactory) into `directory` (new or empty)."""
    if to not in TARGETS:
        raise ValueError(f"export target must be one of {', '.join(TARGETS)} (got {to!r})")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(17, "export folder exists and is not empty; choose a new folder", str(directory))
    if to == "script":
        from nbtune import export_script

        export_script.check_expressible(config)
        writer = export_script.write
    else:
        from nbtune import export_yaml

        export_yaml.check_expressible(config, to)
        writer = export_yaml.writer(to)
    resolved = resolve(config)
    check_trainable(resolved)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        exported = writer(resolved, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if directory.exists():
        directory.rmdir()  # empty (checked above)
    partial.rename(directory)
    exported.directory = directory
    exported.command = exported.command.replace(partial.name, directory.name)
    exported.files = [directory / f.relative_to(partial) for f in exported.files]
    return exported


# ----- what every target reads -------------------------------------------------------------------------------

def resolve(config: TuneConfig) -> Resolved:
    """The rows, their format, the method as applied to this model, and the arguments nbtune trains with."""
    from nbtune import data, models, stages
    from nbtune.methods import registry

    method = registry.get(config.method.name)
    stage = stages.for_config(config)
    tokenizer = models.load_tokenizer(config)
    train_rows, eval_rows = data.load_rows(config)
    fmt, columns = data.resolve_format(config, train_rows[0])
    stages.check_format(stage, fmt)
    labels = _labels(config, columns, train_rows + eval_rows)
    trained_rows = 2 * len(train_rows) if stage.name == "kto" else len(train_rows)  # KTO unpairs each pair
    from nbtune.training import _total_steps

    total_steps = _total_steps(config, trained_rows)
    model_config = models.load_model_config(config)
    built = models.build(config, device="meta", model_config=model_config, tokenizer=tokenizer, labels=labels,
                         extras={"total_steps": total_steps}, with_load_kwargs=False)
    base_names = _base_parameter_names(config, model_config)
    peft, trainable = _method_shape(config, method, built.model, base_names)
    conversational = _conversational(stage, fmt, train_rows[0])
    chat = _chat_template(config, tokenizer, fmt, conversational)
    return Resolved(
        config=config, method=method, stage=stage, fmt=fmt, columns=columns, train_rows=train_rows,
        eval_rows=eval_rows, tokenizer=tokenizer, labels=labels, total_steps=total_steps,
        model_config=model_config, peft=peft, trainable=trainable, all_parameters=base_names,
        quantization=_quantization(config, method), arguments=_arguments(config, bool(eval_rows)),
        conversational=conversational, chat_template=chat[1] if chat else None,
        chat_template_name=chat[0] if chat else None, layer_stacks=_stacks(built.model),
        decoder_layer_class=_decoder_layer_class(built.model))


def check_trainable(r: Resolved) -> None:
    """What a run checks before its model loads: the model's limits (preflight) and every row prepared as the
    stage prepares it (a target truncated away, a row its format cannot read), so nbtune exports no config it
    would refuse to train."""
    from nbtune import preflight

    preflight.check(r.config)
    r.stage.prepare_data(r.config, copy.deepcopy(r.tokenizer))  # a preference stage sets its chat template


def _labels(config: TuneConfig, columns: Any, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """A classification run's labels, as nbtune/data.py `prepare` names them."""
    if config.model.task != "seq-cls":
        return ()
    if columns.label is None:
        raise ExportRefused("data.label_column", "data.label_column must name the class column for task seq-cls")
    return columns.labels or tuple(sorted({str(r[columns.label]) for r in rows}))


def _base_parameter_names(config: TuneConfig, model_config: Any) -> list[str]:
    """The parameter names of the base model (no method applied), built on the meta device."""
    import torch

    from nbtune import models

    with torch.device("meta"):  # a classifier's head is named the same for any number of labels
        base = models.auto_class(config.model.task).from_config(model_config)
    return [name for name, _ in base.named_parameters()]


def _method_shape(config: TuneConfig, method: Any, model: Any, base_names: list[str]
                  ) -> tuple[dict[str, Any] | None, list[str] | None]:
    """(the peft config the method wrapped the model with, None) or (None, the parameters a method that only
    chooses which weights train leaves trainable). Anything else cannot be written without nbtune."""
    peft_configs = getattr(model, "peft_config", None)
    if method.is_peft and peft_configs:
        adapter = getattr(model, "active_adapter", "default")
        return _peft_description(config, peft_configs[adapter]), None
    names = [name for name, _ in model.named_parameters()]
    if names != base_names:
        raise ExportRefused("method.name", (
            f"method {method.name} changes the model's layers (its parameters are not the base model's), which "
            "only nbtune can build; export a peft method (lora, qlora, ia3, ...) or a selective one (full, "
            "freeze, bitfit) instead"))
    return None, [name for name, p in model.named_parameters() if p.requires_grad]


def _peft_description(config: TuneConfig, peft_config: Any) -> dict[str, Any]:
    """The peft config class and the arguments that differ from its defaults (the values peft fills in when
    it wraps a model left out), as plain JSON values."""
    kwargs = {}
    for f in dataclasses.fields(peft_config):
        if f.name in PEFT_FILLED or not f.init:
            continue
        value = _plain(getattr(peft_config, f.name))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if f.name == "task_type" or value != _plain(default):
            kwargs[f.name] = value
    params = config.method_params
    if type(peft_config).__name__ == "PromptTuningConfig" and params.get("init") == "text":
        # nbtune copies init_text's embeddings after wrapping; peft's own TEXT init does the same
        kwargs.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=params["init_text"])
    return {"class": type(peft_config).__name__, "kwargs": kwargs,
            "prompt_learning": bool(getattr(peft_config, "is_prompt_learning", False)),
            "peft_type": _plain(peft_config.peft_type)}


def _plain(value: Any) -> Any:
    """A peft config value as JSON: enums by value, sets as sorted lists."""
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _quantization(config: TuneConfig, method: Any) -> dict[str, Any] | None:
    """The BitsAndBytesConfig arguments the method loads the base with (QLoRA), its compute dtype by name
    ("auto": the dtype the weights load in)."""
    if method.load_kwargs is None:
        return None
    from nbtune.methods.registry import MethodContext

    kwargs = method.load_kwargs(config.method_params, MethodContext(task=config.model.task, dtype="fp32"))
    if set(kwargs) != {"quantization_config"}:
        raise ExportRefused("method.name", (
            f"method {method.name} loads the base with {', '.join(sorted(kwargs))}, which the export cannot "
            "write; export a method that loads the base as it is or in 4 bits (qlora)"))
    q = kwargs["quantization_config"]
    compute = config.method_params.get("compute_dtype", "auto")
    return {"load_in_4bit": bool(q.load_in_4bit), "load_in_8bit": bool(q.load_in_8bit),
            "bnb_4bit_quant_type": q.bnb_4bit_quant_type, "bnb_4bit_use_double_quant": bool(q.bnb_4bit_use_double_quant),
            "compute_dtype": compute}


def _arguments(config: TuneConfig, evaluates: bool) -> dict[str, Any]:
    """The TrainingArguments nbtune sets from the config (training._shared_arguments) for one CPU process in
    fp32; a target rewrites those that depend on the machine (precision, device, output folder)."""
    from nbtune.training import _shared_arguments

    return _shared_arguments(config, Path("output"), evaluates, "fp32", False, "standard")


def _conversational(stage: Any, fmt: str, row: dict[str, Any]) -> bool:
    """Whether a preference or GRPO stage's prompts are conversations (TRL renders them with the template)."""
    from nbtune import formats

    if stage.name in ("dpo", "kto"):
        return formats.is_conversation(row.get("prompt"))
    if stage.name == "grpo":
        return fmt == "chat" or formats.is_conversation(row.get("prompt"))
    return False


def _chat_template(config: TuneConfig, tokenizer: Any, fmt: str, conversational: bool) -> tuple[str, str] | None:
    from nbtune.methods.artifacts import chat_template_of_run

    return chat_template_of_run(config, tokenizer, fmt, conversational)


def _stacks(model: Any) -> list[tuple[str, int]]:
    from nbtune.methods.selective import layer_stacks

    try:
        return [(path.removeprefix("base_model.model."), len(stack)) for path, stack in layer_stacks(model)]
    except ValueError:
        return []


def _decoder_layer_class(model: Any) -> str | None:
    from nbtune.methods.selective import layer_stacks

    try:
        return type(layer_stacks(model)[0][1][0]).__name__
    except (ValueError, IndexError):
        return None


# ----- pieces the targets share -----------------------------------------------------------------------------

def trainable_rule(all_names: list[str], trainable: list[str]) -> tuple[list[str], list[str]] | None:
    """A short rule for which parameters train: (modules, endings), where a parameter trains if its name is
    one of the modules or lies under one, or its last part is one of the endings ("bias"); None: every one."""
    chosen = set(trainable)
    if chosen >= set(all_names):
        return None

    def last(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    frozen = {last(n) for n in all_names if n not in chosen}
    counts: dict[str, int] = {}
    for n in all_names:
        counts[last(n)] = counts.get(last(n), 0) + 1
    endings = sorted(e for e in {last(n) for n in chosen} - frozen if counts[e] > 1)
    plain = (_covering_modules(all_names, chosen), [])
    left = [n for n in all_names if last(n) not in endings]
    with_endings = (_covering_modules(left, chosen), endings)
    return min(plain, with_endings, key=lambda rule: len(rule[0]) + len(rule[1]))


def _covering_modules(names: list[str], chosen: set[str]) -> list[str]:
    """The fewest dotted prefixes (modules) whose parameters are exactly the chosen ones among `names`."""
    out: list[str] = []

    def visit(prefix: str, members: list[str]) -> None:
        if all(n in chosen for n in members):
            out.append(prefix)
            return
        if not any(n in chosen for n in members):
            return
        children: dict[str, list[str]] = {}
        depth = prefix.count(".") + 1 if prefix else 0
        for n in members:
            children.setdefault(".".join(n.split(".")[:depth + 1]), []).append(n)
        for child, under in children.items():
            visit(child, under)

    visit("", names)
    return out


def trains(name: str, rule: tuple[list[str], list[str]] | None) -> bool:
    """Whether `trainable_rule`'s rule trains parameter `name` (what the exported script does)."""
    if rule is None:
        return True
    modules, endings = rule
    return name.rsplit(".", 1)[-1] in endings or any(name == m or name.startswith(m + ".") for m in modules)


def launch_command(config: TuneConfig, program: str) -> str:
    """The command line that runs `program` (e.g. "train.py") as the distributed section says, in the style of
    `nbtune run --launch` (nbtune/distributed_cli.py): with several nodes the same line runs on each, reading
    its rank and the first node's address from $NODE_RANK and $MAIN_NODE_ADDRESS."""
    from nbtune import distributed

    words = ["accelerate", "launch", "--config_file", "accelerate_config.yaml"]
    if config.distributed.nodes > 1:
        words += ["--machine_rank", '"$NODE_RANK"', "--main_process_ip", f'"${distributed.MAIN_NODE}"']
    return " ".join([*words, program])


def write_accelerate_config(r: Resolved, directory: Path) -> Path:
    """accelerate_config.yaml in `directory`: nbtune/distributed.py's accelerate config of the distributed
    section (FSDP wrapping the model's decoder layer), with a header saying how it is used."""
    import yaml

    from nbtune import distributed

    d = r.config.distributed
    path = directory / "accelerate_config.yaml"
    header = (f"# accelerate's config for distributed.strategy {d.strategy} ({d.processes} process(es) x {d.nodes} "
              "node(s)), written by nbtune export.\n# Precision comes from the TrainingArguments (bf16/fp16)."
              f"{' Each node sets NODE_RANK and MAIN_NODE_ADDRESS (README.txt).' if d.nodes > 1 else ''}\n")
    values = distributed.accelerate_config(r.config, r.decoder_layer_class)
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return path


def copy_embedded_model(directory: Path) -> Path:
    """The embedded base's files (config, weights, tokenizer) copied into `directory`/model."""
    from nbtune import embedded

    target = directory / "model"
    shutil.copytree(embedded.BASE_MODEL_DIR, target)
    return target


def unsupported_text(target: str, unsupported: list[tuple[str, str]]) -> str:
    """The list of settings a target cannot express, as unsupported.txt and the command print it."""
    if not unsupported:
        return f"{target} expresses every setting of this config.\n"
    lines = [f"Settings of this config that {target} cannot express (what the export does instead):"]
    lines += [f"- {name}: {why}" for name, why in unsupported]
    return "\n".join(lines) + "\n"


# ----- the command -----------------------------------------------------------------------------------------

def export_command(config_path: str, target: str, directory: str) -> int:
    """`nbtune export CONFIG --to TARGET DIR`: prints what was written, how to run it and what it could not
    carry; a refused config is a mistake of the user's, named by its field."""
    from nbtune.cli import UserError, load_config

    if target not in TARGETS:
        raise UserError(f"--to must be one of {', '.join(TARGETS)} (got {target!r})")
    config = load_config(config_path)
    try:
        exported = export(config, target, directory)
    except ExportRefused as err:
        raise UserError(f"{config_path}: {err}") from None
    print(f"wrote {target} export of {config_path} to {exported.directory}")
    for path in exported.files:
        print(f"  {path.relative_to(exported.directory)}")
    print(f"run it: {exported.command}")
    if exported.unsupported:
        print(unsupported_text(TARGET_NAMES[target], exported.unsupported), end="")
    return 0
