"""`nbtune export CONFIG --to axolotl|llamafactory DIR`: that tool's YAML for a config, its rows, and the list
of settings it cannot express.

The rows are written rendered exactly as nbtune renders them (nbtune/data.py's pieces, the BOS/EOS text
included), so the tools train on the same tokens: axolotl's template-free `input_output` segments, and
LLaMA-Factory's sharegpt turns under its `empty` template (each untrained piece a user turn, each trained piece
the assistant's). Preference pairs are written as text rendered with the run's chat template; GRPO prompts as
they are, with nbtune's built-in rewards in `nbtune_rewards.py` (axolotl). Methods a tool has no form of are
refused naming method.name; a setting it cannot express is written as close as it goes (or left out) and
listed in unsupported.txt, printed by the command too. Each YAML is validated against
nbtune/export_schemas.py before it is written.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbtune import export as ex
from nbtune.config import TuneConfig
from nbtune.tasks import TASKS

TOOLS = {"axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}
STAGES = {"axolotl": ("sft", "dpo", "kto", "grpo"), "llamafactory": ("sft", "dpo", "kto")}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
              "constant-with-warmup": "constant_with_warmup"}
Unsupported = list[tuple[str, str]]


def check_expressible(config: TuneConfig, target: str) -> None:
    """Refuse, before anything loads, a task or stage the tool does not train."""
    tool = TOOLS[target]
    if config.model.task != "causal-lm":
        raise ex.ExportRefused("model.task", (
            f"model.task {config.model.task}: the {tool} export writes causal language model training only; "
            + ("export --to script for this task" if TASKS[config.model.task].inputs == "text" else
               "image tasks train with nbtune, and their artifacts load without it")))
    if config.training.stage not in STAGES[target]:
        raise ex.ExportRefused("training.stage", (
            f"training.stage {config.training.stage}: {tool} has no such stage (it trains "
            f"{', '.join(STAGES[target])}); export --to script for it"))


def writer(target: str) -> Callable[[ex.Resolved, Path], ex.Exported]:
    return {"axolotl": write_axolotl, "llamafactory": write_llamafactory}[target]


# ----- rows as nbtune renders them ---------------------------------------------------------------------------

def supervised_pieces(r: ex.Resolved, row: dict[str, Any]) -> list[tuple[str, bool]]:
    """A supervised row as the texts nbtune tokenizes, each marked trained: nbtune/data.py's pieces with the
    BOS text its first piece gets from the tokenizer and the EOS text it ends with (not for chat rows)."""
    from nbtune import data, formats

    pieces = data.render(r.config, r.fmt, r.columns, row, r.tokenizer)
    if r.config.data.train_on == "all":
        pieces = [(text, True) for text, _ in pieces]
    tok = r.tokenizer
    own = r.fmt == "chat" and formats.uses_own_template(tok, r.config.data.chat_template)
    plain, marked = (tok("x", add_special_tokens=add)["input_ids"] for add in (False, True))
    if not own and tok.bos_token and marked == [tok.bos_token_id, *plain]:
        pieces = [(tok.bos_token + pieces[0][0], pieces[0][1]), *pieces[1:]]
    if r.fmt != "chat" and tok.eos_token:
        pieces = [*pieces, (tok.eos_token, True)]
    return [p for p in pieces if p[0]]


def _chat_tokenizer(r: ex.Resolved) -> Any:
    tokenizer = copy.deepcopy(r.tokenizer)
    if r.chat_template:
        tokenizer.chat_template = r.chat_template
    return tokenizer


def preference_texts(r: ex.Resolved, row: dict[str, Any]) -> dict[str, str]:
    """A pair as text: a conversation's prompt rendered with the run's chat template up to the generation
    prompt, each answer as the text the template adds for it; plain pairs as they are."""
    from nbtune import formats

    if not formats.is_conversation(row["prompt"]):
        return {"prompt": str(row["prompt"]), "chosen": str(row["chosen"]), "rejected": str(row["rejected"])}
    tokenizer = _chat_tokenizer(r)
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    out = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        answer = row[side] if formats.is_conversation(row[side]) else [{"role": "assistant", "content": str(row[side])}]
        full = tokenizer.apply_chat_template([*row["prompt"], *answer], tokenize=False)
        out[side] = full[len(prompt):] if full.startswith(prompt) else str(answer[-1]["content"])
    return out


def unpaired(r: ex.Resolved, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's rows as nbtune trains them: each pair's chosen answer desirable, its rejected one not, shuffled by
    the seed (stage_dpo.prepare_unpaired)."""
    out = [{"prompt": t["prompt"], "completion": t[side], "label": side == "chosen"}
           for t in (preference_texts(r, row) for row in rows) for side in ("chosen", "rejected")]
    random.Random(r.config.training.seed).shuffle(out)
    return out


# ----- what both tools share ---------------------------------------------------------------------------------

def _model_path(r: ex.Resolved, directory: Path, files: list[Path]) -> str:
    if r.embedded_model:
        files.append(ex.copy_embedded_model(directory))
        return "./model"
    return r.config.model.name_or_path


def _common_unsupported(r: ex.Resolved, tool: str) -> Unsupported:
    t, out = r.config.training, []
    if t.on_oom == "shrink":
        out.append(("training.on_oom", f"{tool} stops on a CUDA out-of-memory; nbtune would halve the "
                                       "micro-batch and go on"))
    if t.loss_implementation == "chunked" and r.stage.name == "sft":
        out.append(("training.loss_implementation", "chunked: left out; the standard loss (the same values, "
                                                    "more memory for the logits)"))
    if r.config.distributed.strategy == "fsdp" and r.config.distributed.sharding == "hybrid":
        out.append(("distributed.sharding", "hybrid: left out of the YAML; accelerate_config.yaml has it"))
    if r.stage.name in ("dpo", "kto"):
        out.append(("training.stage", "evaluations report the tool's reward metrics, not nbtune's held-out "
                                      "preference accuracy"))
        if r.conversational:
            out.append(("data.format", "the conversations are written rendered with the run's chat template, as "
                                       "plain prompt/answer text (TRL then appends EOS to each answer)"))
    return out


def _deepspeed(r: ex.Resolved, directory: Path) -> str | None:
    """deepspeed.json for distributed.strategy zero2/zero3 (both tools take `deepspeed: <file>`), else None."""
    d = r.config.distributed
    if d.strategy not in ("zero2", "zero3"):
        return None
    stage = 2 if d.strategy == "zero2" else 3
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if d.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "zero_optimization": zero}
    (directory / "deepspeed.json").write_text(json.dumps(config, indent=2) + "\n")
    return "deepspeed.json"


def _lora_values(r: ex.Resolved, tool: str, names: dict[str, str]) -> tuple[dict[str, Any], Unsupported]:
    """The LoRA config nbtune applies, under the tool's names (`names`: peft's -> the tool's); what has no
    name there is listed."""
    kwargs = dict(r.peft["kwargs"]) if r.peft else {}
    kwargs.pop("task_type", None)
    out, unsupported = {}, []
    for name, value in kwargs.items():
        if name not in names:
            unsupported.append((f"method ({name})", f"{tool} has no field for peft's LoraConfig.{name} "
                                                    f"({value!r}); left out"))
            continue
        if name == "lora_alpha" and float(value) != int(value):
            unsupported.append(("method.alpha", f"{tool} takes an integer lora_alpha; {value} written as "
                                                f"{int(value)}"))
        out[names[name]] = int(value) if name == "lora_alpha" else value
    return out, unsupported


def _refuse_method(r: ex.Resolved, tool: str, forms: str) -> None:
    raise ex.ExportRefused("method.name", f"method.name {r.method.name}: {tool} has no form of it (it trains "
                                          f"{forms}); export --to script for it")


def _check(document: dict[str, Any], schema: dict[str, Any], tool: str) -> None:
    from nbtune.export_schemas import validate

    problems = validate(document, schema)
    if problems:  # the export wrote a field the tool does not document: a bug here
        raise AssertionError(f"the {tool} export does not validate against its schema: " + "; ".join(problems))


def _write_yaml(path: Path, document: dict[str, Any], header: str) -> Path:
    import yaml

    path.write_text(header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120))
    return path


def _finish(r: ex.Resolved, directory: Path, target: str, files: list[Path], commands: list[str],
            unsupported: Unsupported) -> ex.Exported:
    tool = TOOLS[target]
    files.append(ex.write_accelerate_config(r, directory))
    (directory / "unsupported.txt").write_text(ex.unsupported_text(tool, unsupported))
    files.append(directory / "unsupported.txt")
    readme = [f"{r.method.name} on {r.config.model.name_or_path} ({r.stage.name}) for {tool}, exported by nbtune",
              "", "Run it from this folder:", *[f"  {c}" for c in commands],
              *([f"on each of the {r.config.distributed.nodes} nodes, with NODE_RANK and MAIN_NODE_ADDRESS (node 0's "
                 "address) set."] if r.config.distributed.nodes > 1 else []), "",
              "data/ holds the rows, rendered as nbtune renders them; unsupported.txt lists what "
              f"{tool} cannot express."]
    (directory / "README.txt").write_text("\n".join(readme) + "\n")
    files.append(directory / "README.txt")
    return ex.Exported(directory, target, files, f"cd {directory.name} && {commands[0]}", unsupported)


# ----- axolotl -----------------------------------------------------------------------------------------------

AXOLOTL_LORA = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "target_modules": "lora_target_modules", "use_dora": "peft_use_dora", "use_rslora": "peft_use_rslora"}
AXOLOTL_TRACKERS = {"tensorboard": {"use_tensorboard": True}, "wandb": {"use_wandb": True},
                    "mlflow": {"use_mlflow": True}, "trackio": {"use_trackio": True}, "comet_ml": {"use_comet": True}}


def write_axolotl(r: ex.Resolved, directory: Path) -> ex.Exported:
    """axolotl.yaml, data/, nbtune_rewards.py (grpo), deepspeed.json (zero2/zero3), accelerate_config.yaml."""
    from nbtune.export_schemas import AXOLOTL

    model_files: list[Path] = []
    doc: dict[str, Any] = {"base_model": _model_path(r, directory, model_files)}
    m = r.config.model
    if m.revision:
        doc["model_revision"] = m.revision
    doc["trust_remote_code"] = m.trust_remote_code
    unsupported = _common_unsupported(r, "axolotl")
    doc.update(_axolotl_method(r, unsupported))
    files = [*model_files, *_axolotl_data(r, directory, doc)]
    doc.update(_axolotl_training(r, directory, unsupported))
    _check(doc, AXOLOTL, "axolotl")
    files.insert(0, _write_yaml(directory / "axolotl.yaml", doc, "# axolotl config written by nbtune export "
                                "(run from this folder: paths are relative)\n"))
    d = r.config.distributed
    commands = (["axolotl train axolotl.yaml"] if d.strategy == "none"
                else [ex.launch_command(r.config, "-m axolotl.cli.train axolotl.yaml")])
    return _finish(r, directory, "axolotl", files, commands, unsupported)


def _axolotl_method(r: ex.Resolved, unsupported: Unsupported) -> dict[str, Any]:
    if r.peft is not None:
        if r.peft["class"] != "LoraConfig":
            _refuse_method(r, "axolotl", "lora, qlora, full fine-tuning and chosen parameters")
        values, missing = _lora_values(r, "axolotl", AXOLOTL_LORA)
        unsupported += missing
        out: dict[str, Any] = {"adapter": "qlora" if r.quantization else "lora"}
        if r.quantization:
            q = r.quantization
            out["load_in_4bit"] = True
            bnb = {"bnb_4bit_quant_type": q["bnb_4bit_quant_type"],
                   "bnb_4bit_use_double_quant": q["bnb_4bit_use_double_quant"]}
            if q["compute_dtype"] != "auto":
                bnb["bnb_4bit_compute_dtype"] = {"fp32": "float32", "fp16": "float16",
                                                 "bf16": "bfloat16"}[q["compute_dtype"]]
            out["bnb_config_kwargs"] = bnb
        return {**out, **values}
    rule = ex.trainable_rule(r.all_parameters, r.trainable or [])
    if rule is None:
        return {}  # full fine-tuning: no adapter
    modules, endings = rule
    patterns = [f"^{re.escape(module)}(\\..*)?$" for module in modules]
    patterns += [f".*\\.{re.escape(ending)}$" for ending in endings]
    return {"unfrozen_parameters": patterns}


def _axolotl_data(r: ex.Resolved, directory: Path, doc: dict[str, Any]) -> list[Path]:
    stage = r.stage.name
    if stage == "sft":
        def rows(source: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{"segments": [{"label": trained, "text": text} for text, trained in supervised_pieces(r, row)]}
                    for row in source]
        kind: Any = "input_output"
        doc["train_on_inputs"] = False  # the segments' labels say what trains
    elif stage == "dpo":
        def rows(source: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [preference_texts(r, row) for row in source]
        kind = {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected",
                "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}
    elif stage == "kto":
        def rows(source: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return unpaired(r, source)
        kind = {"field_prompt": "prompt", "field_completion": "completion", "field_label": "label",
                "prompt_format": "{prompt}", "completion_format": "{completion}"}
    else:
        from nbtune.stage_grpo import example

        def rows(source: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [example(r.fmt, row) for row in source]
        kind = "nbtune_rewards.rows"
    files = [ex.write_jsonl(directory / "data" / "train.jsonl", rows(r.train_rows))]
    doc["datasets"] = [{"path": "data/train.jsonl", "ds_type": "json", "split": "train", "type": kind}]
    if r.eval_rows:
        files.append(ex.write_jsonl(directory / "data" / "eval.jsonl", rows(r.eval_rows)))
        doc["test_datasets"] = [{"path": "data/eval.jsonl", "ds_type": "json", "split": "train",
                                 "type": copy.deepcopy(kind)}]  # its own copy: no YAML anchor
    doc["dataset_prepared_path"] = "prepared"
    if stage == "grpo":
        files.append(_write_rewards(directory))
        if r.conversational and r.chat_template:
            doc.update(chat_template="jinja", chat_template_jinja=r.chat_template)
    return files


def _write_rewards(directory: Path) -> Path:
    """nbtune_rewards.py: nbtune's built-in rewards as axolotl's GRPO calls them, and the rows' (identity)
    transform."""
    import textwrap

    from nbtune import rewards
    from nbtune.export_script import reward_source

    wrappers = "\n\n\n".join(f'''def {fn.__name__}_reward(prompts, completions, reference, **kwargs):
    """training.rewards {name}: nbtune's reward of each completion against its reference."""
    return {fn.__name__}([completion_text(c) for c in completions], reference)''' for name, fn in rewards._BUILT_IN.items())
    text = f'''"""nbtune's built-in GRPO rewards for axolotl (trl.reward_funcs: nbtune_rewards.<name>_reward), written by
nbtune export; run axolotl from this folder so that it imports this module."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


{textwrap.dedent(reward_source())}


def completion_text(completion):
    """A completion as text: TRL gives chat completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


{wrappers}


def rows(cfg, *args, **kwargs):
    """The dataset transform: the rows are written as GRPO reads them (prompt, reference, other columns)."""
    def transform_fn(example, tokenizer=None):
        return example
    return transform_fn, {{}}
'''
    compile(text, "nbtune_rewards.py", "exec")
    path = directory / "nbtune_rewards.py"
    path.write_text(text)
    return path


def _axolotl_training(r: ex.Resolved, directory: Path, unsupported: Unsupported) -> dict[str, Any]:
    c, t, a = r.config, r.config.training, r.arguments
    out: dict[str, Any] = {"output_dir": "./output", "sequence_len": c.data.max_length,
                           "sample_packing": bool(t.packing and r.stage.name == "sft"),
                           "micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps":
                           t.gradient_accumulation_steps, "eval_batch_size": a["per_device_eval_batch_size"],
                           "num_epochs": float(t.epochs), "learning_rate": c.learning_rate,
                           "lr_scheduler": SCHEDULERS[t.scheduler], "warmup_ratio": t.warmup_ratio,
                           "weight_decay": t.weight_decay, "optimizer": a["optim"], "max_grad_norm": t.max_grad_norm,
                           "seed": t.seed, "logging_steps": t.log_every, "gradient_checkpointing":
                           t.gradient_checkpointing, "save_total_limit": 1}
    if t.max_steps:
        out["max_steps"] = t.max_steps
    if a.get("optim_args"):
        out["optim_args"] = a["optim_args"]
    out.update(_axolotl_precision(c, unsupported))
    out.update({"sdpa": {"sdp_attention": True}, "eager": {"eager_attention": True},
                "flash_attention_2": {"flash_attention": True}}[c.model.attn_implementation])
    if r.eval_rows and t.eval_every:
        out.update(eval_strategy="steps", eval_steps=t.eval_every)
    elif r.eval_rows:
        out["eval_strategy"] = "epoch"
    if r.eval_rows:
        unsupported.append(("training.eval_every", "axolotl does not evaluate the untuned model before the first "
                                                   "step (nbtune's base eval loss)"))
    out.update({"save_strategy": "steps", "save_steps": t.checkpoint_every} if t.checkpoint_every
               else {"save_strategy": "no"})
    if t.compile:
        out["torch_compile"] = True
    if t.dropout is not None:
        from nbtune import models

        out["model_config"] = models._dropout_kwargs(c, t.dropout)
    for name in t.report_to:
        if name in AXOLOTL_TRACKERS:
            out.update(AXOLOTL_TRACKERS[name])
        else:
            unsupported.append(("training.report_to", f"{name}: axolotl has no switch for it; left out"))
    if t.loss_implementation == "liger" and r.stage.name == "sft":
        unsupported.append(("training.loss_implementation", "liger: left out; add axolotl's Liger plugin "
                                                            "(plugins: axolotl.integrations.liger.LigerPlugin)"))
    for name, value in t.extra_arguments.items():
        unsupported.append(("training.extra_arguments", f"{name}: {value!r}: axolotl does not pass TrainingArguments "
                                                        "through; left out"))
    out.update(_axolotl_stage(r))
    out.update(_axolotl_distributed(r, directory))
    return out


def _axolotl_precision(c: TuneConfig, unsupported: Unsupported) -> dict[str, Any]:
    p = c.training.precision
    if c.model.dtype != "auto":
        unsupported.append(("model.dtype", f"{c.model.dtype}: axolotl loads the weights in the training precision "
                                           "(bf16/fp16) or fp32; left out"))
    return {"auto": {"bf16": "auto"}, "bf16": {"bf16": True}, "fp16": {"fp16": True},
            "fp32": {"bf16": False, "fp16": False}}[p]


def _axolotl_stage(r: ex.Resolved) -> dict[str, Any]:
    t = r.config.training
    if r.stage.name in ("dpo", "kto"):
        return {"rl": r.stage.name, "rl_beta": t.beta}
    if r.stage.name == "grpo":
        return {"rl": "grpo", "trl": {
            "beta": t.beta, "num_generations": t.num_generations, "max_completion_length": t.max_completion_length,
            "temperature": t.temperature, "log_completions": False,
            "reward_funcs": [f"nbtune_rewards.{_reward_function(name)}_reward" for name in t.rewards]}}
    return {}


def _reward_function(name: str) -> str:
    from nbtune import rewards

    return rewards._BUILT_IN[name].__name__


def _axolotl_distributed(r: ex.Resolved, directory: Path) -> dict[str, Any]:
    d = r.config.distributed
    deepspeed = _deepspeed(r, directory)
    if deepspeed:
        return {"deepspeed": deepspeed}
    if d.strategy == "fsdp" and d.sharding != "hybrid":
        fsdp = {"offload_params": bool(d.cpu_offload), "reshard_after_forward": d.sharding == "full",
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT"}
        if r.decoder_layer_class:
            fsdp["transformer_layer_cls_to_wrap"] = r.decoder_layer_class
        return {"fsdp_version": 2, "fsdp_config": fsdp}
    return {}


# ----- LLaMA-Factory -----------------------------------------------------------------------------------------

LLAMAFACTORY_LORA = {"r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                     "target_modules": "lora_target", "use_dora": "use_dora", "use_rslora": "use_rslora"}
SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}


def write_llamafactory(r: ex.Resolved, directory: Path) -> ex.Exported:
    """llamafactory.yaml, data/ with dataset_info.json, deepspeed.json (zero2/zero3), accelerate_config.yaml."""
    from nbtune.export_schemas import LLAMAFACTORY, LLAMAFACTORY_DATASET_INFO, with_fields

    m, t = r.config.model, r.config.training
    model_files: list[Path] = []
    doc: dict[str, Any] = {"model_name_or_path": _model_path(r, directory, model_files)}
    if m.revision:
        doc["model_revision"] = m.revision
    doc["trust_remote_code"] = m.trust_remote_code
    doc["flash_attn"] = {"sdpa": "sdpa", "eager": "disabled", "flash_attention_2": "fa2"}[m.attn_implementation]
    doc.update(stage=r.stage.name, do_train=True)
    unsupported = _common_unsupported(r, "LLaMA-Factory")
    doc.update(_llamafactory_method(r, unsupported))
    files, info = _llamafactory_data(r, directory, doc)
    files = [*model_files, *files]
    _check(info, LLAMAFACTORY_DATASET_INFO, "LLaMA-Factory dataset_info.json")
    doc.update(_llamafactory_training(r, directory, unsupported))
    _check(doc, with_fields(LLAMAFACTORY, list(t.extra_arguments)), "LLaMA-Factory")
    files.insert(0, _write_yaml(directory / "llamafactory.yaml", doc, "# LLaMA-Factory config written by nbtune "
                                "export (run from this folder: paths are relative)\n"))
    d = r.config.distributed
    if d.strategy == "none":
        commands = ["llamafactory-cli train llamafactory.yaml"]
    elif d.strategy == "fsdp":
        # LLaMA-Factory's FSDP recipe: accelerate with its config, running the checkout's src/train.py
        commands = [ex.launch_command(r.config, "LLaMA-Factory/src/train.py llamafactory.yaml")]
    else:
        # LLaMA-Factory's own launcher (torchrun); several nodes read NODE_RANK and MAIN_NODE_ADDRESS
        nodes = ' NODE_RANK="$NODE_RANK" MASTER_ADDR="$MAIN_NODE_ADDRESS"' if d.nodes > 1 else ""
        commands = [f"FORCE_TORCHRUN=1 NNODES={d.nodes} NPROC_PER_NODE={d.processes}{nodes} "
                    "llamafactory-cli train llamafactory.yaml"]
    return _finish(r, directory, "llamafactory", files, commands, unsupported)


def _llamafactory_method(r: ex.Resolved, unsupported: Unsupported) -> dict[str, Any]:
    forms = "lora, qlora, full fine-tuning and freezing all but the top or bottom layers"
    if r.peft is not None:
        if r.peft["class"] != "LoraConfig":
            _refuse_method(r, "LLaMA-Factory", forms)
        values, missing = _lora_values(r, "LLaMA-Factory", LLAMAFACTORY_LORA)
        unsupported += missing
        if isinstance(values.get("lora_target"), list):
            values["lora_target"] = ",".join(values["lora_target"])
        out: dict[str, Any] = {"finetuning_type": "lora", **values}
        if r.quantization:
            q = r.quantization
            out.update(quantization_bit=4, quantization_method="bnb", quantization_type=q["bnb_4bit_quant_type"],
                       double_quantization=q["bnb_4bit_use_double_quant"])
            if q["compute_dtype"] != "auto":
                unsupported.append(("method.compute_dtype", f"{q['compute_dtype']}: LLaMA-Factory computes in the "
                                                            "training precision; left out"))
        return out
    rule = ex.trainable_rule(r.all_parameters, r.trainable or [])
    if rule is None:
        return {"finetuning_type": "full"}
    return _llamafactory_freeze(r, unsupported, forms)


def _llamafactory_freeze(r: ex.Resolved, unsupported: Unsupported, forms: str) -> dict[str, Any]:
    """LLaMA-Factory's freeze tuning trains whole layers, the last N (or first N), plus named modules outside
    them; a method whose trained parameters are not of that shape is refused."""
    if len(r.layer_stacks) != 1:
        _refuse_method(r, "LLaMA-Factory", forms)
    stack, count = r.layer_stacks[0]
    chosen = set(r.trainable or [])

    def layer_of(name: str) -> int | None:
        match = re.match(re.escape(stack) + r"\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    layers = {i: [n for n in r.all_parameters if layer_of(n) == i] for i in range(count)}
    trained = sorted(i for i, names in layers.items() if names and all(n in chosen for n in names))
    partial = [i for i, names in layers.items() if i not in trained and any(n in chosen for n in names)]
    n = len(trained)
    if partial or trained not in (list(range(count - n, count)), list(range(n))):
        _refuse_method(r, "LLaMA-Factory", forms)
    outside = sorted({name.split(".")[-2] for name in chosen if layer_of(name) is None and "." in name})
    out: dict[str, Any] = {"finetuning_type": "freeze", "freeze_trainable_modules": "all",
                           "freeze_trainable_layers": n if trained == list(range(count - n, count)) else -n}
    if outside:
        out["freeze_extra_modules"] = ",".join(outside)
        frozen = [name for name in r.all_parameters if name not in chosen]
        caught = [m for m in outside if any(m in name for name in frozen)]
        if caught:
            unsupported.append(("method.train_head", f"LLaMA-Factory matches freeze_extra_modules by substring: "
                                                     f"{', '.join(caught)} also trains parameters nbtune keeps "
                                                     "frozen (e.g. every layer's norms)"))
    return out


def _llamafactory_data(r: ex.Resolved, directory: Path, doc: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
    stage = r.stage.name
    entry: dict[str, Any] = {"formatting": "sharegpt", "tags": dict(SHAREGPT_TAGS)}
    if stage == "sft":
        rows = _turns
        entry["columns"] = {"messages": "messages"}
    elif stage == "dpo":
        rows = _ranked
        entry.update(ranking=True, columns={"messages": "messages", "chosen": "chosen", "rejected": "rejected"})
    else:
        rows = _tagged
        entry["columns"] = {"messages": "messages", "kto_tag": "kto_tag"}
    files = [ex.write_jsonl(directory / "data" / "train.jsonl", rows(r, r.train_rows))]
    info = {"nbtune_train": {"file_name": "train.jsonl", **entry}}
    doc.update(dataset="nbtune_train", dataset_dir="data", template="empty", cutoff_len=r.config.data.max_length)
    if r.eval_rows:
        files.append(ex.write_jsonl(directory / "data" / "eval.jsonl", rows(r, r.eval_rows)))
        info["nbtune_eval"] = {"file_name": "eval.jsonl", **entry}
        doc["eval_dataset"] = "nbtune_eval"
    path = directory / "data" / "dataset_info.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    files.append(path)
    return files, info


def _turns(r: ex.Resolved, source: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's pieces as alternating turns (LLaMA-Factory trains the assistant's): consecutive pieces of one
    kind joined, an empty user turn first where the row starts trained, an untrained tail (after the last
    trained piece, so no loss is on it) left out."""
    out = []
    for row in source:
        turns: list[list[Any]] = []
        for text, trained in supervised_pieces(r, row):
            if turns and turns[-1][1] == trained:
                turns[-1][0] += text
            else:
                turns.append([text, trained])
        if turns and turns[0][1]:
            turns.insert(0, ["", False])
        if turns and not turns[-1][1]:
            turns.pop()
        out.append({"messages": [{"role": "assistant" if trained else "user", "content": text}
                                 for text, trained in turns]})
    return out


def _ranked(r: ex.Resolved, source: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in source:
        t = preference_texts(r, row)
        out.append({"messages": [{"role": "user", "content": t["prompt"]}],
                    "chosen": {"role": "assistant", "content": t["chosen"]},
                    "rejected": {"role": "assistant", "content": t["rejected"]}})
    return out


def _tagged(r: ex.Resolved, source: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": u["prompt"]}, {"role": "assistant", "content": u["completion"]}],
             "kto_tag": u["label"]} for u in unpaired(r, source)]


def _llamafactory_training(r: ex.Resolved, directory: Path, unsupported: Unsupported) -> dict[str, Any]:
    c, t, a = r.config, r.config.training, r.arguments
    out: dict[str, Any] = {
        "train_on_prompt": c.data.train_on == "all", "packing": bool(t.packing and r.stage.name == "sft"),
        "output_dir": "output", "logging_steps": t.log_every, "report_to": list(t.report_to) or "none",
        "per_device_train_batch_size": t.micro_batch_size, "gradient_accumulation_steps":
        t.gradient_accumulation_steps, "per_device_eval_batch_size": a["per_device_eval_batch_size"],
        "learning_rate": c.learning_rate, "num_train_epochs": float(t.epochs), "lr_scheduler_type":
        SCHEDULERS[t.scheduler], "warmup_ratio": t.warmup_ratio, "weight_decay": t.weight_decay,
        "optim": a["optim"], "max_grad_norm": t.max_grad_norm, "seed": t.seed, "data_seed": t.seed,
        "disable_gradient_checkpointing": not t.gradient_checkpointing, "save_total_limit": 1,
        "logging_nan_inf_filter": False}
    if out["packing"]:
        out["neat_packing"] = True  # each example attends only to itself, as nbtune packs
    if t.max_steps:
        out["max_steps"] = t.max_steps
    if a.get("optim_args"):
        out["optim_args"] = a["optim_args"]
    if r.stage.name in ("dpo", "kto"):
        out["pref_beta"] = t.beta
        if r.stage.name == "dpo":
            out["pref_loss"] = "sigmoid"
    out.update(_llamafactory_precision(c, unsupported))
    if r.eval_rows:
        out.update(eval_strategy="steps" if t.eval_every else "epoch", eval_on_start=True)
        if t.eval_every:
            out["eval_steps"] = t.eval_every
    out.update({"save_strategy": "steps", "save_steps": t.checkpoint_every} if t.checkpoint_every
               else {"save_strategy": "no"})
    if t.compile:
        out["torch_compile"] = True
    if t.loss_implementation == "liger" and r.stage.name == "sft":
        out["enable_liger_kernel"] = True
    if t.dropout is not None:
        unsupported.append(("training.dropout", f"{t.dropout}: LLaMA-Factory has no model dropout field; the "
                                                "model's own dropout is kept"))
    out.update(dict(t.extra_arguments))  # LLaMA-Factory's training arguments are transformers' own
    deepspeed = _deepspeed(r, directory)
    if deepspeed:
        out["deepspeed"] = deepspeed
    elif r.config.distributed.strategy == "fsdp":
        unsupported.append(("distributed.strategy", "fsdp: LLaMA-Factory takes FSDP from accelerate's config; "
                                                    "launch it with accelerate_config.yaml (README.txt)"))
    return out


def _llamafactory_precision(c: TuneConfig, unsupported: Unsupported) -> dict[str, Any]:
    p = c.training.precision
    if p == "auto":
        unsupported.append(("training.precision", "auto: written as bf16 (a GPU of today); set fp16: true and "
                                                  "bf16: false for GPUs without bf16"))
    if c.model.dtype != "auto":
        unsupported.append(("model.dtype", f"{c.model.dtype}: LLaMA-Factory loads the weights for the training "
                                           "precision; left out"))
    return {"auto": {"bf16": True}, "bf16": {"bf16": True}, "fp16": {"fp16": True},
            "fp32": {"bf16": False, "fp16": False}}[p]
